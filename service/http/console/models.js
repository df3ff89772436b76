/* SOWA inspection console: the Models page, #/models (loaded after app.js and records.js, whose helpers it uses,
 * under the same rules: no inline script or style, data as text, names from the API through encodeURIComponent).
 *
 * Every stored model version (GET /models), which one serves, which is active (every replica's goal), which one
 * shadows; an activation being prepared on this replica, its progress polled each second while it runs; and the
 * shadow's report (GET /models/{version}/shadow-report): agreement and correlation with the serving model, the
 * shadow's latency, per class, and the parts on which they disagreed, each opening its record (records.js's
 * showRecord). Activate, Shadow, Stop shadow and Rollback need the admin role; they are not shown to other keys.
 */
"use strict";

const MODELS_FAST_MS = 1000;  // while a model is being prepared (to serve or to shadow)
const MODELS_SLOW_MS = 5000;  // otherwise: another replica or `sowa models` may change the state meanwhile
const PREP_RUNNING = (p) => p !== null && !["done", "failed", "cancelled"].includes(p.phase);
const modelPath = (version, rest = "") => `/models/${encodeURIComponent(version)}${rest}`;

// what the preparation's progress bar shows: loading is the start, every class rebuilt is the most of it
function prepFraction(p) {
  if (p.phase === "loading") return 0;
  if (p.phase === "rebuilding") return p.classes ? 0.05 + 0.85 * (p.classes_done / p.classes) : 0.05;
  if (p.phase === "warming") return 0.93;
  if (p.phase === "switching") return 0.97;
  return p.phase === "done" ? 1 : 0;
}

function prepText(p) {
  const what = `${p.version} (to ${p.purpose === "shadow" ? "shadow" : "serve"})`;
  const classes = `${p.classes_done} of ${p.classes} class${p.classes === 1 ? "" : "es"} ready` +
    ` (${p.fitted} bank${p.fitted === 1 ? "" : "s"} fitted here, the rest read from the store)`;
  const secs = `${fmt(p.seconds, 1)} s`;
  switch (p.phase) {
    case "done": return `${what}: done in ${secs}; ${classes}.`;
    case "failed": return `${what}: failed after ${secs}.`;
    case "cancelled": return `${what}: cancelled after ${secs} (another version was asked for).`;
    default: return `Preparing ${what}: ${p.phase}, ${classes}, ${secs} so far. The serving model answers meanwhile.`;
  }
}

function modelBadges(v) {
  return [v.serving ? el("span", { class: "badge model serving", text: "serving" }) : null,
          v.active ? el("span", { class: "badge model active", text: "active" }) : null,
          v.shadow ? el("span", { class: "badge model shadow", text: "shadow" }) : null];
}

async function pageModels(main) {
  main.append(el("h2", { text: "Models" }));
  const admin = may("admin");
  const stateBox = el("dl", { class: "facts wide", id: "models-state" });
  const prepBox = el("section", { id: "preparation", class: "preparation", "aria-live": "polite", hidden: true });
  const shadowPrepBox = el("section", { id: "shadow-preparation", class: "preparation", "aria-live": "polite",
                                        hidden: true });
  const share = el("input", { type: "number", id: "shadow-share", min: "0", max: "100", step: "any",
                              placeholder: "service default", "aria-describedby": "shadow-share-help" });
  const rollback = el("button", { type: "button", id: "rollback", class: "secondary", hidden: true });
  const controls = admin ? el("div", { class: "controls", id: "model-controls" },
    el("div", { class: "field" }, el("label", { for: "shadow-share", text: "Shadow share (%)" }), share),
    el("small", { id: "shadow-share-help", text: "of the answered requests a shadow scores as well" }), rollback)
    : allowed("admin", "Activating, shadowing or rolling back a model", null);
  const tbody = el("tbody", {});
  const reportBox = el("section", { id: "shadow-report", "aria-labelledby": "shadow-title" });
  const detail = el("section", { id: "record-detail", "aria-live": "polite" });
  main.append(stateBox, prepBox, shadowPrepBox, controls,
    el("table", { class: "models", id: "models" },
      el("caption", { text: "Stored model versions: the serving one answers requests, the active one is what every " +
                             "replica serves once prepared, a shadow scores a share of the traffic beside it" }),
      el("thead", {}, el("tr", {}, ["Version", "Fingerprint", "Input size", "Arch", "Weights", "Added", "Added by", ""]
        .map((h) => el("th", { scope: "col", text: h })))),
      tbody),
    reportBox, detail);

  let overview = null, shown = "", reportShown = "", timer = null, stopped = false, chain = 0;
  let watching = null;  // the version an action of this page asked for, to say when it serves

  // one admin action: confirmed first, its answer shown at once, then followed by polling
  const act = (question, call, done) => guard(async () => {
    if (!window.confirm(question)) return;
    for (const b of main.querySelectorAll("#models button, #rollback")) b.disabled = true;
    try {
      const body = await call();
      done(body);
      show(body);
    } finally {
      for (const b of main.querySelectorAll("#models button, #rollback")) b.disabled = false;
    }
    schedule(0);  // follow it at once, each second while it is prepared
  });

  const shareValue = () => {
    if (share.value === "") return {};
    const pct = parseFloat(share.value);
    if (!(pct >= 0 && pct <= 100)) throw new Error("The shadow share is a percentage from 0 to 100.");
    return { share: pct / 100 };
  };

  function versionRow(v) {
    const buttons = [];
    if (admin && !v.serving) {
      buttons.push(el("button", { type: "button", class: "activate", text: "Activate",
        "aria-label": `Activate ${v.version}`,
        onclick: act(`Serve ${v.version} instead of ${overview.serving}? Every replica prepares it (its classes' ` +
                     "banks rebuilt from the stored shots), then switches between two batches.",
                     () => api(modelPath(v.version, "/activate"), { method: "POST" }),
                     () => { watching = v.version; setStatus(`Activating ${v.version}…`); }) }));
    }
    if (admin && !v.serving && !v.shadow) {
      buttons.push(el("button", { type: "button", class: "secondary start-shadow", text: "Shadow",
        "aria-label": `Shadow ${v.version}`,
        onclick: guard(async () => {
          const json = shareValue();  // checked before the question
          const pct = json.share === undefined ? "the service's default share" : `${fmt(100 * json.share, 1)}%`;
          await act(`Shadow ${v.version}: score ${pct} of the answered requests with it as well, beside ` +
                    `${overview.serving}? Answers do not change.`,
                    () => api(modelPath(v.version, "/shadow"), { method: "POST", json }),
                    () => setStatus(`Shadowing ${v.version}: its report appears once its classes are prepared.`, "ok"))();
        }) }));
    }
    if (admin && v.shadow) {
      buttons.push(el("button", { type: "button", class: "secondary stop-shadow", text: "Stop shadow",
        "aria-label": `Stop shadowing ${v.version}`,
        onclick: act(`Stop shadowing ${v.version}? Its report is dropped.`,
                     () => api("/models/shadow", { method: "DELETE" }),
                     () => setStatus(`Stopped shadowing ${v.version}.`, "ok")) }));
    }
    return el("tr", { dataset: { version: v.version, fingerprint: v.fingerprint, serving: v.serving,
                                 active: v.active, shadow: v.shadow } },
      el("th", { scope: "row" }, el("span", { class: "model-version", text: v.version }), " ", modelBadges(v),
         v.trained ? null : el("span", { class: "tag", text: "untrained" })),
      el("td", {}, el("code", { class: "fingerprint", title: v.fingerprint, text: v.fingerprint.slice(0, 16) })),
      el("td", { class: "num", text: `${v.image_size} px` }), el("td", { text: v.arch }),
      el("td", { class: "num", text: bytes(v.bytes) }), el("td", { class: "num", text: when(v.added) }),
      el("td", { text: v.added_by }), el("td", {}, el("div", { class: "row-buttons" }, buttons)));
  }

  // the page after an action asked for `watching` and it serves (or its preparation ended otherwise)
  function announce(body) {
    if (watching === null) return;
    const p = body.preparation;
    if (body.serving === watching) { setStatus(`Now serving ${watching}.`, "ok"); watching = null; }
    else if (p && p.version === watching && p.phase === "failed") {
      setStatus(`${watching} was not activated: ${p.error}`, "error"); watching = null;
    }
  }

  // one preparation's box: what it is doing, its progress bar while it runs (and once done), its error
  function showPrep(box, p, prefix) {
    box.hidden = p === null;
    if (p === null) return;
    box.dataset.phase = p.phase;
    box.dataset.version = p.version;
    const bar = el("progress", { id: `${prefix}-progress`, max: "100", value: String(Math.round(100 * prepFraction(p))),
                                 "aria-label": `preparing ${p.version}` });
    box.replaceChildren(el("h3", { text: p.purpose === "shadow" ? "Shadow preparation on this replica"
                                                               : "Preparation on this replica" }),
      el("p", { id: `${prefix}-text`, class: p.phase === "failed" ? "error" : "", text: prepText(p) }),
      PREP_RUNNING(p) || p.phase === "done" ? bar : null,
      p.error ? el("p", { id: `${prefix}-error`, class: "error", text: p.error }) : null);
  }

  // the shadow's preparation while it matters: running, or failed for the version still asked to shadow
  const shadowPrep = (body) => {
    const p = body.shadow_preparation ?? null;
    return p !== null && (PREP_RUNNING(p) || (p.phase === "failed" && p.version === body.shadow)) ? p : null;
  };

  function show(body) {
    overview = body;
    showPrep(prepBox, body.preparation, "prep");
    showPrep(shadowPrepBox, shadowPrep(body), "shadow-prep");
    // the table and the state only when they changed: a redraw every poll would take the focus off a button
    const key = JSON.stringify([body.serving, body.active, body.previous, body.target, body.shadow, body.shadow_share,
                                body.versions]);
    if (key !== shown) {
      shown = key;
      const facts = [["Serving here", body.serving], ["Active", body.active || "—"],
                     ["Previous", body.previous || "— (nothing to roll back to)"],
                     ["Switching to", body.target || "—"],
                     ["Shadow", body.shadow ? `${body.shadow} on ${fmt(100 * body.shadow_share, 1)}% of the traffic` : "—"]];
      stateBox.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }),
        el("dd", { text: String(v), dataset: { fact: k.toLowerCase().replaceAll(/[^a-z]+/g, "-") } })]));
      tbody.replaceChildren(...body.versions.map(versionRow));
      rollback.hidden = !admin || body.previous === null;
      if (body.previous !== null) {
        rollback.textContent = `Roll back to ${body.previous}`;
        rollback.onclick = act(`Roll back: serve ${body.previous} again instead of ${body.serving}?`,
                               () => api("/models/rollback", { method: "POST" }),
                               () => { watching = body.previous; setStatus(`Rolling back to ${body.previous}…`); });
      }
    }
    announce(body);
  }

  async function showReport(version) {
    if (version === null) {
      reportShown = "";
      reportBox.replaceChildren(el("h3", { id: "shadow-title", text: "Shadow" }),
        el("p", { class: "muted", id: "no-shadow", text: "No version shadows the serving one." }));
      return true;
    }
    let r;
    try {
      r = await api(modelPath(version, "/shadow-report"));
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404) throw e;
      reportShown = "";
      reportBox.replaceChildren(el("h3", { id: "shadow-title", text: `Shadow: ${version}` }),
        el("p", { class: "muted", id: "shadow-waiting", text: e.message }));
      return false;  // being prepared: look again soon
    }
    const { latency_s: lat, ...rest } = r;
    const key = JSON.stringify(rest);  // latencies move with every image; the rest says whether anything changed
    if (key === reportShown) return true;
    reportShown = key;
    const ms = (s) => `${fmt(1000 * s, 1)} ms`;
    const facts = [["Compared with", r.serving], ["Share", `${fmt(100 * r.share, 1)}%`], ["Since", when(r.started)],
                   ["Images", `${r.scored} scored of ${r.sampled} sampled; ${r.dropped} dropped, ${r.failed} failed`],
                   ["Agreement", pct(r.agreement)], ["Correlation", fmt(r.correlation, 3)],
                   ["Latency", lat ? `p50 ${ms(lat.p50)}, p95 ${ms(lat.p95)}, mean ${ms(lat.mean)} over ${lat.samples} requests` : "—"]];
    const classes = Object.entries(r.classes);
    const disagreements = classes.flatMap(([name, c]) => c.disagreements.map((d) => ({ ...d, class_name: name })))
      .sort((a, b) => b.time - a.time);
    const verdict = (score, anomalous) => [fmt(score), " ", verdictBadge(anomalous)];
    reportBox.replaceChildren(el("h3", { id: "shadow-title", text: `Shadow: ${r.version} beside ${r.serving}` }),
      el("dl", { class: "facts wide", id: "shadow-facts" }, facts.map(([k, v]) => [el("dt", { text: k }),
        el("dd", { text: v, dataset: { fact: k.toLowerCase().replaceAll(/[^a-z]+/g, "-") } })])),
      classes.length ? el("table", { id: "shadow-classes" },
        el("caption", { text: "Per class: how often both models gave the same verdict, how their scores correlate, what each flagged" }),
        el("thead", {}, el("tr", {}, ["Class", "Images", "Agreement", "Correlation", `Flagged by ${r.serving}`,
                                      `Flagged by ${r.version}`, "Disagreements"].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, classes.map(([name, c]) => el("tr", { dataset: { class: name } },
          el("th", { scope: "row", text: name }), el("td", { class: "num", text: String(c.images) }),
          el("td", { class: "num", text: pct(c.agreement) }), el("td", { class: "num", text: fmt(c.correlation, 3) }),
          el("td", { class: "num", text: String(c.flagged_serving) }), el("td", { class: "num", text: String(c.flagged_shadow) }),
          el("td", { class: "num", text: String(c.disagreements.length) })))))
        : el("p", { class: "muted", id: "shadow-empty", text: "No image compared yet: the report fills as requests are answered." }),
      disagreements.length ? el("table", { id: "disagreements" },
        el("caption", { text: "The latest parts on which the two models disagreed (50 a class at most), newest first" }),
        el("thead", {}, el("tr", {}, ["Time", "Class", r.serving, r.version, ""].map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, disagreements.map((d) => el("tr", { dataset: { record: d.record_id || "" } },
          el("td", { class: "num", text: when(d.time) }), el("td", { text: d.class_name }),
          el("td", { class: "num" }, verdict(d.serving_score, d.serving_anomalous)),
          el("td", { class: "num" }, verdict(d.shadow_score, d.shadow_anomalous)),
          el("td", {}, d.record_id ? el("button", { type: "button", class: "secondary open-record", text: "Open record",
                                                    "aria-label": `Open the record ${d.record_id}`,
                                                    onclick: guard(() => showRecord(d.record_id, detail)) })
                                   : el("span", { class: "muted", text: "not recorded" }))))))
        : classes.length ? el("p", { class: "muted", id: "no-disagreements", text: "No disagreement so far." }) : "");
    return true;
  }

  async function refresh() {
    const body = await api("/models");
    show(body);
    const sp = shadowPrep(body);
    if (sp !== null && sp.phase === "failed") {  // it will not shadow here: its error is above, no report to wait for
      reportShown = "";
      reportBox.replaceChildren(el("h3", { id: "shadow-title", text: `Shadow: ${body.shadow}` }),
        el("p", { class: "error", id: "shadow-failed", text: `Not shadowing on this replica: ${sp.error}` }));
      return PREP_RUNNING(body.preparation) || (body.target !== null && body.target !== body.serving);
    }
    const reported = await showReport(body.shadow);
    return PREP_RUNNING(body.preparation) || (sp !== null && PREP_RUNNING(sp)) ||
      (body.target !== null && body.target !== body.serving) || !reported;
  }

  // one chain of polls: an action starts a new one at once, and the chain it replaces stops at its next turn
  function schedule(ms) {
    clearTimeout(timer);
    const mine = ++chain;
    timer = setTimeout(async () => {
      let busy = true;
      try { busy = await refresh(); } catch (e) { showError(e); }
      if (!stopped && mine === chain) schedule(busy ? MODELS_FAST_MS : MODELS_SLOW_MS);
    }, ms);
  }

  pageCleanup = () => { stopped = true; clearTimeout(timer); };  // before the first await: leaving stops the polls
  const busy = await refresh();
  if (!stopped) schedule(busy ? MODELS_FAST_MS : MODELS_SLOW_MS);
}
