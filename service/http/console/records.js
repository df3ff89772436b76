/* SOWA inspection console: the pages on inspection records (loaded after app.js, whose helpers they use, and
 * under the same rules: no inline script or style, data as text, class names through classPath/classHash).
 *
 *   #/history            every record, newest first, filtered; a record opens with its image and heatmap
 *   #/review             the parts to review, flagged and borderline first: g = good, d = defective, s = skip
 *   #/quality/NAME       how the class's threshold does on reviewed parts, the suggested threshold, the drift
 */
"use strict";

const DRIFT_ALERT = 0.5;  // docker/prometheus-alerts.yml's level for sowa_score_drift_ks
const pct = (v) => (v === null || v === undefined ? "—" : `${(100 * v).toFixed(1)}%`);

// -- page: quality ------------------------------------------------------------------------------------------------------
async function pageQuality(main, name) {
  main.append(el("h2", { text: "Quality" }));
  const { field, classes } = await classSelect(name, (v) => { location.hash = classHash("quality", v); });
  if (!classes.length) { main.append(el("p", { text: "No class is registered yet." })); return; }
  if (!name) name = classes[0].name;
  field.querySelector("select").value = name;
  const target = el("input", { type: "number", id: "escape-target", min: "0", max: "100", step: "0.1",
                               placeholder: "best F1" });
  const body = el("div", { id: "quality" });
  const form = el("form", { class: "inline", id: "quality-form", onsubmit: guard(async (ev) => {
    ev.preventDefault();
    await load();
  }) }, field, el("div", { class: "field" }, el("label", { for: "escape-target", text: "Escape-rate target (%)" }), target),
  el("button", { type: "submit", text: "Compute" }));
  main.append(form, el("p", { class: "muted", text: "Without a target the suggestion is the threshold with the best F1 " +
    "on the reviewed parts; with one, the threshold with the fewest false calls whose escape rate stays within it." }), body);

  async function load() {
    const q = new URLSearchParams();
    if (target.value !== "") q.set("escape_target", String(parseFloat(target.value) / 100));
    const f = await api(classPath(name, `/quality${q.toString() ? `?${q}` : ""}`));
    body.replaceChildren(...qualityFigures(f, name, load));
    main.dataset.threshold = String(f.threshold);
  }
  await load();
}

function confusionRows(c) {
  return [["Flagged defective (caught)", c.tp], ["Passed defective (escapes)", c.fn], ["Flagged good (false calls)", c.fp],
          ["Passed good", c.tn], ["Escape rate", pct(c.escape_rate)], ["False-call rate", pct(c.false_call_rate)],
          ["Precision", pct(c.precision)], ["Recall", pct(c.recall)], ["F1", fmt(c.f1, 3)]];
}

function qualityFigures(f, name, reload) {
  const out = [];
  out.push(el("p", { id: "reviewed-count", text: `${f.reviewed} reviewed part${f.reviewed === 1 ? "" : "s"} scored with the ` +
    `current shots: ${f.defective} defective, ${f.good} good` +
    (f.other_calibration ? ` (${f.other_calibration} reviewed before the shots changed are left out)` : "") + "." }));
  const cols = [["In force", f.at_threshold], ["Suggested", f.suggested]];
  if (f.escape_target !== null && f.best_f1) cols.push(["Best F1", f.best_f1]);
  const head = el("tr", {}, el("th", { scope: "col", text: "" }),
                  cols.map(([label, c]) => el("th", { scope: "col", text: c ? `${label}: ${fmt(c.threshold)}` : `${label}: —` })));
  const rows = confusionRows(f.at_threshold).map(([label], i) => el("tr", {}, el("th", { scope: "row", text: label }),
    cols.map(([, c]) => el("td", { class: "num", text: c ? String(confusionRows(c)[i][1]) : "—" }))));
  out.push(el("table", { id: "quality-table" }, el("caption", { text: "What each threshold does on the reviewed parts (defective = positive)" }),
    el("thead", {}, head), el("tbody", {}, rows)));
  if (f.suggested) {
    const apply = el("button", { type: "button", id: "apply", text: `Apply ${fmt(f.suggested.threshold)}`, onclick: guard(async () => {
      apply.disabled = true;
      const info = await api(classPath(name), { method: "PATCH", json: { threshold: f.suggested.threshold } });
      setStatus(`Applied: threshold ${fmt(info.threshold)} (calibrated ${fmt(info.calibrated_threshold)})`, "ok");
      await reload();
    }) });
    out.push(el("div", { class: "controls" }, el("span", { id: "suggested", dataset: { threshold: f.suggested.threshold },
      text: `Suggested threshold ${fmt(f.suggested.threshold)} (${f.suggested.rule === "best_f1" ? "best F1" : "fewest false calls within the escape target"})` }),
      allowed("operate", "Applying a threshold", apply)));
  } else {
    out.push(el("p", { id: "suggested", class: "muted", text: "No suggestion yet: review at least one good and one defective part." }));
  }
  out.push(el("h3", { text: "Drift of the passed parts from the calibration" }), driftChart(f.drift));
  return out;
}

function driftChart(d) {
  const now = d.ks === null ? `Not enough passed parts yet (${d.parts} of ${d.min_parts}).`
    : `Now: KS D+ ${fmt(d.ks, 3)} (p ${d.p_value < 0.001 ? "< 0.001" : fmt(d.p_value, 3)}) over the last ${d.parts} passed parts; ` +
      `the alert fires above ${DRIFT_ALERT} when it is not chance.`;
  const summary = el("p", { id: "drift-now", text: now });
  if (!d.series.length) return el("div", {}, summary);
  const W = 1100, H = 220, L = 48, R = 16, T = 12, B = 36;
  const n = d.series.length;
  const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i / (n - 1)) * (W - L - R));
  const y = (v) => H - B - v * (H - T - B);
  const path = d.series.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p.ks).toFixed(1)}`).join(" ");
  const dots = d.series.map((p, i) => svg("circle", { class: `dot${p.ks > DRIFT_ALERT ? " high" : ""}`, cx: x(i), cy: y(p.ks), r: 4 },
    svg("title", { text: `until ${new Date(p.until * 1000).toLocaleString()}: D+ ${fmt(p.ks, 3)} over ${p.parts} parts` })));
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((v) => svg("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end", text: String(v) }));
  const chart = svg("svg", { id: "drift-chart", viewBox: `0 0 ${W} ${H}`, role: "img",
                             "aria-label": `KS D+ (how far the scores rose) of the last ${n} windows of ${d.window} passed parts, oldest first` },
    svg("line", { class: "axis-line", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svg("line", { class: "alert-line", x1: L, x2: W - R, y1: y(DRIFT_ALERT), y2: y(DRIFT_ALERT) }),
    svg("text", { class: "axis", x: W / 2, y: H - 8, "text-anchor": "middle", text: `windows of ${d.window} passed parts, oldest to newest` }),
    ...ticks, svg("path", { class: "drift-line", d: path }), ...dots);
  return el("figure", { class: "chart" }, chart, summary);
}

// -- records: shared -----------------------------------------------------------------------------------------------------
const RECORD_PAGE = 50;
const when = (t) => new Date(t * 1000).toLocaleString();

// a record's thumbnail (the heatmap over the part, as kept), fetched with the key in a header, as a blob: URL
async function recordThumb(r, size = 64) {
  if (!r.thumbnail_kept) return el("span", { class: "no-thumb muted", text: "no image kept" });
  const url = URL.createObjectURL(await api(`/records/${encodeURIComponent(r.id)}/thumbnail`, { as: "blob" }));
  return el("img", { class: "record-thumb", src: url, width: size, height: size, alt: `heatmap of ${r.filename || r.id}` });
}

function reviewText(r) {
  return r.review ? `${r.review}${r.review_note ? `: ${r.review_note}` : ""}` : "";
}

// -- page: history -------------------------------------------------------------------------------------------------------
async function pageHistory(main) {
  main.append(el("h2", { text: "History" }));
  const classes = await allClasses();
  const input = (id, label, attrs = {}) => {
    const node = el("input", { id, autocomplete: "off", ...attrs });
    return [node, el("div", { class: "field" }, el("label", { for: id, text: label }), node)];
  };
  const cls = el("select", { id: "history-class" }, el("option", { value: "", text: "any" }),
                 classes.map((c) => el("option", { value: c.name, text: c.name })));
  const verdict = el("select", { id: "history-verdict" }, el("option", { value: "", text: "any" }),
                     el("option", { value: "fail", text: "flagged" }), el("option", { value: "pass", text: "passed" }));
  const [part, partField] = input("history-part", "Part id", { maxlength: "128" });
  const [station, stationField] = input("history-station", "Station", { maxlength: "128" });
  const [tag, tagField] = input("history-tag", "Tag", { maxlength: "64" });
  const reviewed = el("select", { id: "history-reviewed" }, el("option", { value: "", text: "any" }),
                      el("option", { value: "false", text: "not yet" }), el("option", { value: "good", text: "good" }),
                      el("option", { value: "defective", text: "defective" }));
  const [since, sinceField] = input("history-since", "From", { type: "datetime-local" });
  const [until, untilField] = input("history-until", "Before", { type: "datetime-local" });
  const filters = () => {
    const q = new URLSearchParams();
    for (const [k, v] of [["class_name", cls.value], ["verdict", verdict.value], ["part_id", part.value.trim()],
                          ["station", station.value.trim()], ["tag", tag.value.trim()]]) if (v) q.set(k, v);
    if (reviewed.value === "false") q.set("reviewed", "false");
    else if (reviewed.value) q.set("review", reviewed.value);
    for (const [k, node] of [["since", since], ["until", until]]) if (node.value) q.set(k, String(new Date(node.value).getTime() / 1000));
    return q;
  };
  const tbody = el("tbody", {});
  const count = el("span", { id: "history-count" });
  const more = el("button", { type: "button", id: "history-more", class: "secondary", text: "Load more" });
  const detail = el("section", { id: "record-detail", "aria-live": "polite" });
  let next = null, query = filters();
  const load = async (fresh) => {
    const q = new URLSearchParams(query);
    q.set("limit", String(RECORD_PAGE));
    if (!fresh && next) q.set("before", next);
    const page = await api(`/records?${q}`);
    if (fresh) tbody.replaceChildren();
    tbody.append(...await Promise.all(page.records.map((r) => historyRow(r, detail))));
    next = page.next;
    more.hidden = next === null;
    count.textContent = tbody.rows.length ? `${tbody.rows.length} record${tbody.rows.length === 1 ? "" : "s"} shown, newest first` : "No record matches.";
  };
  more.addEventListener("click", guard(async () => {
    more.disabled = true;
    try { await load(false); } finally { more.disabled = false; }
  }));
  const form = el("form", { class: "inline", id: "history-filters", onsubmit: guard(async (ev) => {
    ev.preventDefault();
    query = filters();
    await load(true);
  }) }, el("div", { class: "field" }, el("label", { for: "history-class", text: "Class" }), cls),
  el("div", { class: "field" }, el("label", { for: "history-verdict", text: "Verdict" }), verdict),
  partField, stationField, tagField, el("div", { class: "field" }, el("label", { for: "history-reviewed", text: "Review" }), reviewed),
  sinceField, untilField, el("button", { type: "submit", text: "Filter" }));
  main.append(form, el("table", { class: "records", id: "history" },
    el("caption", { text: "Every inspection: what the station said, with which threshold, and its review" }),
    el("thead", {}, el("tr", {}, ["", "Time", "Class", "Part", "Station", "Verdict", "Score", "Threshold", "Review", ""].map((h) => el("th", { scope: "col", text: h })))),
    tbody), el("p", { class: "more" }, count, " ", more), detail);
  await load(true);
}

async function historyRow(r, detail) {
  const open = el("button", { type: "button", class: "secondary open-record", text: "Open",
                              "aria-label": `Open the record of ${r.part_id || r.filename || r.id}`,
                              onclick: guard(() => showRecord(r.id, detail)) });
  return el("tr", { dataset: { id: r.id, anomalous: r.is_anomalous } },
    el("td", {}, await recordThumb(r, 48)), el("td", { class: "num", text: when(r.time) }), el("td", { text: r.class_name }),
    el("td", { class: "part-id", text: r.part_id || "" }), el("td", { text: r.station || "" }),
    el("td", {}, verdictBadge(r.is_anomalous)), el("td", { class: "num", text: fmt(r.score) }),
    el("td", { class: "num", text: `${fmt(r.threshold)}${r.threshold_per_request ? " (this request)" : ""}` }),
    el("td", { class: "review", text: reviewText(r) }), el("td", {}, open));
}

async function showRecord(id, box) {
  const r = await api(`/records/${encodeURIComponent(id)}`);
  const pics = [];
  if (r.image_kept && r.thumbnail_kept) {
    const [image, heat] = await Promise.all([api(`/records/${encodeURIComponent(id)}/image`, { as: "blob" }),
                                            api(`/records/${encodeURIComponent(id)}/thumbnail`, { as: "blob" })]);
    pics.push(el("figure", { class: "kept" }, el("img", { id: "record-image", src: URL.createObjectURL(image), alt: `part ${r.part_id || r.filename || r.id}` }),
                 el("figcaption", { text: "as sent" })),
              el("figure", { class: "kept" }, el("img", { id: "record-heatmap", src: URL.createObjectURL(heat), alt: "its heatmap" }),
                 el("figcaption", { text: "heatmap" })));
  } else {
    pics.push(el("p", { class: "muted", text: "No image kept for this part (passed parts are sampled; old images go first)." }));
  }
  const facts = [["Record", r.id], ["Time", when(r.time)], ["Class", r.class_name], ["Part id", r.part_id || "—"],
                 ["Station", r.station || "—"], ["Tags", (r.tags || []).join(", ") || "—"], ["File", r.filename || "—"],
                 ["Verdict", r.is_anomalous ? "ANOMALOUS" : "normal"], ["Score", fmt(r.score)],
                 ["Threshold", `${fmt(r.threshold)}${r.threshold_per_request ? " (this request's)" : ""}`],
                 ["Text score", fmt(r.text_score)], ["Regions", String((r.regions || []).length)],
                 ["Model", r.model], ["Class revision (shots)", r.revision], ["Review", reviewText(r) || "not reviewed"]];
  const note = el("p", { class: "note", id: "record-note", "aria-live": "polite" });
  // a good part (reviewed so, or not yet reviewed) with its upload kept can become a shot of its class in one call
  const asShot = r.image_kept && r.review !== "defective" ? allowed("operate", "Adding a part as a shot", el("button", {
    type: "button", id: "add-shot", class: "secondary", text: "Good part: add as a shot", onclick: guard(async () => {
      asShot.disabled = true;
      const out = await api(`/records/${encodeURIComponent(r.id)}/shot`, { method: "POST" });
      const p = out.previous;
      const msg = `Shots ${p.shots} → ${out.class_info.shots}; calibrated threshold ${fmt(p.calibrated_threshold)} → ` +
                  `${fmt(out.calibration.threshold)}. The class's earlier records were scored with other shots.`;
      note.textContent = msg;
      setStatus(msg, "ok");
    }) })) : null;
  box.replaceChildren(el("h3", { text: `Record ${r.id}` }), el("div", { class: "recent" }, pics), asShot, note,
    el("dl", { class: "facts wide", id: "record-facts" }, facts.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])));
  box.scrollIntoView({ block: "nearest" });
}

// -- page: review --------------------------------------------------------------------------------------------------------
// flagged parts first (highest score first), then passed parts nearest the threshold: the ones a person should see
function reviewOrder(records) {
  const margin = (r) => Math.abs(r.score - r.threshold);
  return [...records].sort((a, b) => (b.is_anomalous - a.is_anomalous) ||
                                     (a.is_anomalous ? b.score - a.score : margin(a) - margin(b)));
}

async function pageReview(main) {
  main.append(el("h2", { text: "Review" }));
  const refused = allowed("operate", "Reviewing parts", null);
  if (refused) { main.append(refused); return; }
  const classes = await allClasses();
  const cls = el("select", { id: "review-class" }, el("option", { value: "", text: "any" }),
                 classes.map((c) => el("option", { value: c.name, text: c.name })));
  const list = el("ol", { class: "review-queue", id: "review-queue" });
  const left = el("p", { id: "review-left", "aria-live": "polite" });
  main.append(el("form", { class: "inline", onsubmit: guard(async (ev) => { ev.preventDefault(); await load(); }) },
    el("div", { class: "field" }, el("label", { for: "review-class", text: "Class" }), cls),
    el("button", { type: "submit", text: "Load" })),
  el("p", { class: "muted", text: "Flagged parts first, then passed parts nearest their threshold. Keys: g = good, " +
            "d = defective, s = skip (on the part in focus; the next one takes focus)." }), left, list);

  async function load() {
    const q = new URLSearchParams({ reviewed: "false", limit: "200" });
    if (cls.value) q.set("class_name", cls.value);
    const page = await api(`/records?${q}`);
    const items = await Promise.all(reviewOrder(page.records).map(reviewItem));
    list.replaceChildren(...items);
    count();
    if (items.length) items[0].focus();
  }
  function count() {
    const n = list.querySelectorAll("li:not(.done)").length;
    left.textContent = n ? `${n} part${n === 1 ? "" : "s"} to review.` : "Nothing left to review.";
  }
  function advance(li, done) {
    li.classList.add(done ? "done" : "skipped");  // a skipped part stays in the count: it is still to review
    let next = li.nextElementSibling;
    while (next && (next.classList.contains("done") || next.classList.contains("skipped"))) next = next.nextElementSibling;
    count();
    (next || left).focus();
  }
  async function review(li, r, verdict) {
    await api(`/records/${encodeURIComponent(r.id)}/review`, { method: "POST", json: { verdict } });
    li.dataset.review = verdict;
    li.querySelector(".review-state").textContent = `reviewed: ${verdict}`;
    advance(li, true);
  }
  async function reviewItem(r) {
    const li = el("li", { tabindex: "0", dataset: { id: r.id, anomalous: r.is_anomalous },
                          "aria-label": `${r.is_anomalous ? "flagged" : "passed"} part ${r.part_id || r.filename || r.id}, score ${fmt(r.score)}` });
    const act = (verdict) => guard(() => (verdict === "skip" ? advance(li, false) : review(li, r, verdict)));
    li.append(await recordThumb(r, 96),
      el("div", { class: "review-facts" },
        el("p", {}, verdictBadge(r.is_anomalous), " ", el("span", { class: "part-id", text: r.part_id || r.filename || r.id })),
        el("p", { class: "muted", text: `${r.class_name} · score ${fmt(r.score)} vs ${fmt(r.threshold)} · ${when(r.time)}${r.station ? ` · ${r.station}` : ""}` }),
        el("p", { class: "review-state" })),
      el("div", { class: "row-buttons" },
        el("button", { type: "button", class: "secondary", text: "Good (g)", onclick: act("good") }),
        el("button", { type: "button", class: "secondary", text: "Defective (d)", onclick: act("defective") }),
        el("button", { type: "button", class: "secondary", text: "Skip (s)", onclick: act("skip") })));
    li.addEventListener("keydown", (e) => {
      if (e.target !== li || e.ctrlKey || e.metaKey || e.altKey) return;
      const verdict = { g: "good", d: "defective", s: "skip" }[e.key];
      if (verdict) { e.preventDefault(); act(verdict)(); }
    });
    return li;
  }
  await load();
}
