/* SOWA inspection console: plain JS, no build step, no network beyond this service.
 *
 * Pages (the URL hash): #/classes, #/class/NAME, #/inspect/NAME, #/threshold/NAME, #/health, #/audit (admins);
 * records.js (loaded after this file) adds #/history, #/review and #/quality/NAME; models.js (after it) #/models.
 * The API key, when the service has one, is asked for once, kept in sessionStorage and sent as X-API-Key.
 * What the key may do comes from GET /auth/me: a control its role does not reach is not shown, and a line says
 * which role it needs (`allowed(role, what, control)`).
 *
 * Rules every page keeps: the service answers with a Content-Security-Policy of `default-src 'self'`
 * (service/http/protections.py), so a violation is a bug that tests/service/http/test_console_browser.py fails on:
 * - no inline script: no <script> without src, no onclick="..." attributes; handlers with addEventListener (or
 *   `on...` keys of el(), which does that);
 * - no inline style: no <style>, no style="..." attributes (el()'s `style` takes an object of CSS properties and
 *   sets them through the CSSOM, which the policy allows); classes in style.css otherwise;
 * - data as text, never markup: textContent or el()'s `text`, never innerHTML;
 * - a class name from the URL or the API goes into a path through classPath() (encodeURIComponent) and into a
 *   hash through classHash(); route() refuses a hash whose name does not match CLASS_NAME;
 * - images: 'self', data: and blob: URLs only; requests: this service only.
 */
"use strict";

const KEY_STORE = "sowa-api-key";
const BASE = location.pathname.replace(/\/ui(\/.*)?$/, "");  // the service's root, also behind a path prefix
const CLASS_NAME = /^[a-z0-9][a-z0-9_.-]{0,63}$/;

let config = { api_key_required: false, heat_ramp: [], audit_actions: [] };
// the heatmap colour ramp's RGB stops, as the service's thumbnails and `sowa demo` use it: from /ui/config.json,
// read by start() before any page renders
let RAMP = [];
let pageCleanup = null;
let me = null;  // GET /auth/me: the key's name, role, classes and `may` for each role

const classPath = (name, rest = "") => `/classes/${encodeURIComponent(name)}${rest}`;
const classHash = (page, name) => `#/${page}/${encodeURIComponent(name)}`;

// -- small helpers ----------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "style") {  // through the CSSOM: a style="..." attribute would break the policy
      if (typeof v !== "object") throw new TypeError("el(): style takes an object of CSS properties");
      for (const [p, val] of Object.entries(v)) node.style.setProperty(p, val);
    }
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) if (c) node.append(c);
  return node;
}

const fmt = (x, d = 4) => (x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(d));
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function setStatus(text, kind = "info") {
  const box = document.getElementById("status");
  box.textContent = text;
  box.className = kind;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
}

function verdictBadge(anomalous) {
  return el("span", { class: `badge ${anomalous ? "bad" : "good"}`, text: anomalous ? "ANOMALOUS" : "normal" });
}

// -- what this key may do --------------------------------------------------------------------------------------
const may = (role) => !me || Boolean(me.may[role]);

// `control` where the key's role reaches `role`, else a line saying why it is missing
function allowed(role, what, control) {
  if (may(role)) return control;
  return el("p", { class: "needs-role", dataset: { needs: role } },
            `${what} needs the ${role} role; this key has ${me.role}.`);
}

// -- the API ----------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.set("X-API-Key", key);
  if (opts.json !== undefined) {
    headers.set("Content-Type", "application/json");
    opts = { ...opts, body: JSON.stringify(opts.json) };
  }
  const response = await fetch(BASE + path, { ...opts, headers });
  if (response.status === 401 && config.api_key_required) {
    sessionStorage.removeItem(KEY_STORE);
    await askKey("The service refused that key; enter it again.");
    return api(path, opts);
  }
  const type = response.headers.get("content-type") || "";
  if (response.ok && opts.as === "blob") return response.blob();
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const err = (body && body.error) || {};
    throw new ApiError(response.status, err.code || "http_error", err.message || `HTTP ${response.status}`);
  }
  return body;
}

function askKey(message = "") {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").textContent = message;
  return new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      if (!input.value) return;
      sessionStorage.setItem(KEY_STORE, input.value);
      input.value = "";
      form.removeEventListener("submit", submit);
      dialog.close();
      document.getElementById("forget-key").hidden = false;
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", (e) => e.preventDefault(), { once: true });  // nothing works without it
    dialog.showModal();
    input.focus();
  });
}

// -- file drop zones ----------------------------------------------------------------------------------------------
function dropZone(id, label, onFiles) {
  const input = el("input", { type: "file", id, multiple: true, accept: "image/*", class: "visually-hidden",
                              onchange: () => { if (input.files.length) onFiles([...input.files]); } });
  const zone = el("label", { for: id, class: "drop", tabindex: "-1" },
                  el("strong", { text: label }), el("span", { text: "Drop image files here, or press to choose" }));
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) zone.addEventListener(ev, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/") || !f.type);
    if (files.length) onFiles(files);
  });
  return el("div", { class: "drop-wrap" }, input, zone);
}

// every class (name order), a page of GET /classes at a time
async function allClasses() {
  const classes = [];
  let after = null;
  do {
    const page = await api(`/classes?limit=1000${after === null ? "" : `&after=${encodeURIComponent(after)}`}`);
    classes.push(...page.classes);
    after = page.next;
  } while (after !== null);
  return classes;
}

async function classSelect(current, onChange, zeroShot = false) {
  const classes = await allClasses();
  const select = el("select", { id: "class-select", onchange: () => onChange(select.value) },
                    zeroShot ? el("option", { value: "", text: "(none: zero-shot)" }) : null,
                    classes.map((c) => el("option", { value: c.name, text: c.name, selected: c.name === current })));
  return { select, classes, field: el("div", { class: "field" }, el("label", { for: "class-select", text: "Class" }),
                                      select) };
}

// -- page: classes --------------------------------------------------------------------------------------------------
const CLASS_PAGE = 50;  // rows per request: thumbnails included, a page is about 50 * 4 KiB of JSON

async function pageClasses(main) {
  main.append(el("h2", { text: "Classes" }));
  const name = el("input", { id: "new-class", autocomplete: "off", placeholder: "e.g. widget-a", required: true,
                             "aria-describedby": "new-class-help" });
  const newClass = el("form", { class: "inline", onsubmit: (e) => {
    e.preventDefault();
    if (!CLASS_NAME.test(name.value)) { setStatus("A class name is 1-64 of a-z, 0-9, _ . - (starting with a letter or digit)", "error"); return; }
    location.hash = classHash("class", name.value);
  } }, el("label", { for: "new-class", text: "New class" }), name, el("button", { type: "submit", text: "Open" }),
  el("small", { id: "new-class-help", text: "then register a few good parts as its shots" }));
  main.append(allowed("operate", "Registering a class", newClass));
  // one request per page of CLASS_PAGE classes: the list carries each row's first shot and last kept results
  const page = (after) => api(`/classes?limit=${CLASS_PAGE}&recent=4&thumbnails=true` +
                              (after === null ? "" : `&after=${encodeURIComponent(after)}`));
  const first = await page(null);
  if (!first.classes.length) { main.append(el("p", { text: "No class is registered yet." })); return; }
  const tbody = el("tbody", {});
  const count = el("span", { id: "classes-count" });
  const more = el("button", { type: "button", id: "more-classes", class: "secondary", text: "Show more classes" });
  let next = null;
  const show = (body) => {
    tbody.append(...body.classes.map(classRow));
    next = body.next;
    count.textContent = `${tbody.rows.length} of ${body.total} shown`;
    more.hidden = next === null;
  };
  more.addEventListener("click", async () => {
    more.disabled = true;
    try { show(await page(next)); } finally { more.disabled = false; }
  });
  main.append(el("table", { class: "classes" },
    el("caption", { text: "Registered classes, each with its first shot; the last results are the last kept ones, heatmap over them" }),
    el("thead", {}, el("tr", {}, ["Class", "Shots", "Threshold", "Calibrated", "Bank (vectors · bytes)", "Last results", ""]
      .map((h) => el("th", { scope: "col", text: h })))),
    tbody),
    el("p", { class: "more" }, count, " ", more));
  show(first);
}

function classRow(c) {
  const recent = c.recent_results || [];
  return el("tr", { dataset: { class: c.name } },
    el("th", { scope: "row" }, el("a", { href: classHash("class", c.name), class: "class-link" },
      c.first_shot_thumbnail ? el("img", { src: `data:image/jpeg;base64,${c.first_shot_thumbnail}`, alt: "", width: 40, height: 40, class: "shot-thumb" }) : null,
      el("span", { text: c.name }))),
    el("td", { class: "num shots", text: c.shots }),
    el("td", { class: "num" }, fmt(c.threshold), c.threshold_overridden ? el("span", { class: "tag", text: "override" }) : null),
    el("td", { class: "num", text: fmt(c.calibrated_threshold) }),
    el("td", { class: "num", text: `${c.bank_vectors} · ${bytes(c.bank_bytes)}` }),
    el("td", {}, el("div", { class: "thumbs" }, recent.length ? recent.map((r) => el("figure", {},
      el("img", { src: `data:image/jpeg;base64,${r.thumbnail}`, alt: `${r.filename}: ${r.is_anomalous ? "anomalous" : "normal"}`, width: 48, height: 48 }),
      el("figcaption", {}, verdictBadge(r.is_anomalous)))) : el("span", { class: "muted", text: "none kept" }))),
    el("td", {}, el("a", { href: classHash("inspect", c.name), text: "Inspect" }), " ",
       el("a", { href: classHash("threshold", c.name), text: "Threshold" })));
}

// -- shots ---------------------------------------------------------------------------------------------------------------
async function shotThumbs(name, limit = 64) {
  const { shots } = await api(classPath(name, "/shots"));
  return Promise.all(shots.slice(0, limit).map(async ({ sha256 }) => ({
    sha256, url: URL.createObjectURL(await api(classPath(name, `/shots/${sha256}?thumbnail=true`), { as: "blob" })),
  })));
}

// -- page: a class ----------------------------------------------------------------------------------------------------
function classFacts(info) {
  const facts = [["Shots", info.shots], ["Threshold", `${fmt(info.threshold)}${info.threshold_overridden ? " (override)" : ""}`],
                 ["Calibrated threshold", fmt(info.calibrated_threshold)], ["Pixel threshold", fmt(info.pixel_threshold, 3)],
                 ["Bank", `${info.bank_vectors} vectors, ${bytes(info.bank_bytes)}`],
                 ["Updated", new Date(info.updated * 1000).toLocaleString()]];
  return el("dl", { class: "facts", id: "class-facts" }, facts.map(([k, v]) => [el("dt", { text: k }),
    el("dd", { text: v, dataset: { fact: k.toLowerCase().replaceAll(" ", "-") } })]));
}

async function pageClass(main, name) {
  if (!CLASS_NAME.test(name)) throw new ApiError(422, "invalid_request", `invalid class name '${name}'`);
  main.append(el("h2", {}, "Class ", el("code", { text: name })));
  const factsBox = el("div", { id: "facts-box" });
  main.append(factsBox);
  // from the list, not GET /classes/NAME: a class not registered yet is no error (a 404 would log one)
  const known = (await allClasses()).find((c) => c.name === name);
  factsBox.append(known ? classFacts(known) : el("p", { text: "Not registered yet: register its first shots below." }));
  const gallery = el("div", { class: "shots", id: "shots" });
  const remove = el("button", { type: "button", id: "delete-shots", class: "secondary", disabled: true,
                                text: "Delete the unticked shots" });
  const showShots = async () => {
    const thumbs = await shotThumbs(name);
    gallery.replaceChildren(...thumbs.map(({ sha256, url }, i) => el("figure", { class: "shot", dataset: { sha256 } },
      el("img", { src: url, alt: `shot ${i + 1}`, width: 96, height: 96 }),
      el("figcaption", {}, el("input", { type: "checkbox", id: `keep-${sha256}`, checked: true,
                                         onchange: () => { remove.disabled = !gallery.querySelector("input:not(:checked)"); } }),
         el("label", { for: `keep-${sha256}`, text: `keep shot ${i + 1}` })))));
    remove.disabled = true;
  };
  remove.addEventListener("click", guard(async () => {
    const keepers = [...gallery.querySelectorAll("figure.shot")].filter((f) => f.querySelector("input").checked);
    const dropped = gallery.querySelectorAll("figure.shot").length - keepers.length;
    if (!keepers.length) { setStatus("A class needs at least one shot: tick one to keep.", "error"); return; }
    remove.disabled = true;
    setStatus(`Deleting ${dropped} shot${dropped > 1 ? "s" : ""}: registering the other ${keepers.length} as the new set…`);
    const form = new FormData();
    for (const f of keepers) {  // the stored PNGs themselves: the same shots, the same hashes
      form.append("images", await api(classPath(name, `/shots/${f.dataset.sha256}`), { as: "blob" }), `${f.dataset.sha256}.png`);
    }
    form.append("mode", "replace");
    const info = await api(classPath(name, "/shots"), { method: "POST", body: form });
    factsBox.replaceChildren(classFacts(info));
    await showShots();
    setStatus(`Deleted ${dropped}: ${info.shots} shots, threshold ${fmt(info.threshold)}`, "ok");
  }));
  if (known) {
    main.append(el("section", { "aria-labelledby": "stored-title" },
      el("h3", { id: "stored-title", text: may("operate") ? "Its shots (untick to delete)" : "Its shots" }), gallery,
      allowed("operate", "Deleting shots", remove)));
    await showShots();
    if (!may("operate")) for (const box of gallery.querySelectorAll("input")) box.disabled = true;
  }
  let files = [];
  const list = el("ul", { class: "files", id: "shot-list", "aria-live": "polite" });
  const register = el("button", { type: "submit", id: "register", disabled: true, text: "Register shots" });
  const mode = (value, text, checked) => el("label", { class: "radio" },
    el("input", { type: "radio", name: "mode", value, checked }), text);
  const submitShots = guard(async () => {
    const form = new FormData();
    for (const f of files) form.append("images", f, f.name);
    form.append("mode", main.querySelector("input[name=mode]:checked").value);
    register.disabled = true;
    setStatus(`Registering ${files.length} shots…`);
    try {
      const info = await api(classPath(name, "/shots"), { method: "POST", body: form });
      factsBox.replaceChildren(classFacts(info));
      if (!gallery.isConnected) {
        factsBox.after(el("section", { "aria-labelledby": "stored-title" },
          el("h3", { id: "stored-title", text: "Its shots (untick to delete)" }), gallery, remove));
      }
      await showShots();
      setStatus(`Registered: ${info.shots} shots, threshold ${fmt(info.threshold)}`, "ok");
      files = [];
      list.replaceChildren();
    } finally { register.disabled = files.length === 0; }
  });
  main.append(el("section", { "aria-labelledby": "shots-title" },
    el("h3", { id: "shots-title", text: "Register shots: good parts of the product" }),
    allowed("operate", "Registering shots", el("form", { onsubmit: (e) => { e.preventDefault(); submitShots(); } },
      dropZone("shot-files", "Shots", (chosen) => {
        files = files.concat(chosen);
        list.replaceChildren(...files.map((f) => el("li", { text: f.name })));
        register.disabled = false;
      }),
      list,
      el("fieldset", {}, el("legend", { text: "How" }), mode("append", "Add to the shots", true),
         mode("replace", "Replace all shots with these (the others are deleted)", false)),
      register))),
  el("p", {}, el("a", { href: classHash("inspect", name), text: "Inspect parts of this class" }), " · ",
     el("a", { href: classHash("threshold", name), text: "Its threshold" })));
}

// -- heatmaps -----------------------------------------------------------------------------------------------------------
function rampColor(v) {
  const pos = Math.min(Math.max(v, 0), 1) * (RAMP.length - 1);
  const lo = Math.min(Math.floor(pos), RAMP.length - 2);
  const t = pos - lo;
  return RAMP[lo].map((c, i) => c * (1 - t) + RAMP[lo + 1][i] * t);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("image did not load"));
    img.src = src;
  });
}

async function heatCanvas(heatmap) {
  const grey = await loadImage(`data:image/png;base64,${heatmap.data}`);
  const canvas = el("canvas", { class: "heat", width: heatmap.width, height: heatmap.height, "aria-hidden": "true" });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(grey, 0, 0);
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const lut = Array.from({ length: 256 }, (_, g) => rampColor(g / 255));
  for (let i = 0; i < px.data.length; i += 4) {
    const [r, g, b] = lut[px.data[i]];
    px.data[i] = r; px.data[i + 1] = g; px.data[i + 2] = b; px.data[i + 3] = 255;
  }
  ctx.putImageData(px, 0, 0);
  return canvas;
}

function legend(scale) {
  const stops = RAMP.map((c, i) => `rgb(${c.join(",")}) ${(100 * i) / (RAMP.length - 1)}%`).join(",");
  return el("figure", { class: "legend", "aria-label": "Heatmap colour scale" },
    el("div", { class: "ramp", style: { background: `linear-gradient(to right, ${stops})` } }),
    el("figcaption", {}, el("span", { text: "0" }),
       el("span", { text: `pixel threshold${scale ? ` (${fmt(scale / 2, 2)})` : ""}: regions start` }),
       el("span", { text: scale ? fmt(scale, 2) : "2 × threshold" })));
}

// -- page: inspect ------------------------------------------------------------------------------------------------------
async function pageInspect(main, name) {
  main.append(el("h2", { text: "Inspect" }));
  const { field, classes } = await classSelect(name, (v) => { location.hash = v ? classHash("inspect", v) : "#/inspect"; }, true);
  if (!name && classes.length) name = classes[0].name;
  const keep = el("input", { type: "checkbox", id: "keep", checked: true });
  const opacity = el("input", { type: "range", id: "opacity", min: 0, max: 100, value: 50,
                                oninput: () => main.style.setProperty("--heat-opacity", opacity.value / 100) });
  main.style.setProperty("--heat-opacity", 0.5);
  const results = el("div", { class: "cards", id: "results", "aria-live": "polite" });
  const scaleBox = el("div", { id: "legend-box" }, legend(null));
  main.append(el("div", { class: "controls" }, field,
    el("div", { class: "field" }, keep, el("label", { for: "keep", text: "Keep the results (for the threshold page and “this one is good”)" })),
    el("div", { class: "field" }, el("label", { for: "opacity", text: "Heatmap opacity" }), opacity)),
    dropZone("inspect-files", "Parts to inspect", guard((files) => inspect(files))), scaleBox, results);
  main.querySelector("#class-select").value = name || "";

  async function inspect(files) {
    const cls = main.querySelector("#class-select").value;
    const form = new FormData();
    for (const f of files) form.append("images", f, f.name);
    if (cls) form.append("class_name", cls);
    if (cls && keep.checked) form.append("keep", "true");
    form.append("heatmap", "png");
    setStatus(`Scoring ${files.length} image${files.length > 1 ? "s" : ""}…`);
    const body = await api("/predict", { method: "POST", body: form });
    const cards = await Promise.all(body.results.map((r, i) => resultCard(files[i], r, cls)));
    results.prepend(...cards);
    const scale = body.results[0] && body.results[0].heatmap ? body.results[0].heatmap.scale[1] : null;
    scaleBox.replaceChildren(legend(scale));
    const bad = body.results.filter((r) => r.is_anomalous).length;
    setStatus(`Scored ${body.results.length}: ${bad} anomalous, ${body.results.length - bad} normal`, "ok");
  }
}

async function resultCard(file, r, cls) {
  const url = URL.createObjectURL(file);
  const image = el("img", { src: url, alt: `${r.filename}`, class: "part" });
  const stage = el("div", { class: "stage", style: { "aspect-ratio": `${r.heatmap.width} / ${r.heatmap.height}` } }, image);
  stage.append(await heatCanvas(r.heatmap));
  const boxes = svg("svg", { class: "boxes", viewBox: `0 0 ${r.heatmap.width} ${r.heatmap.height}`,
                             preserveAspectRatio: "none", "aria-hidden": "true" },
                    r.regions.map(({ box: [x0, y0, x1, y1] }) => svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0 })));
  stage.append(boxes);
  const pct = (v) => `${(100 * v).toFixed(1)}%`;
  const meter = el("div", { class: "meter", role: "img",
                            "aria-label": `score ${fmt(r.score)} against threshold ${fmt(r.threshold)}` },
                   el("div", { class: `fill ${r.is_anomalous ? "bad" : "good"}`, style: { width: pct(r.score) } }),
                   el("div", { class: "mark", style: { left: pct(r.threshold) } }));
  const note = el("p", { class: "note", "aria-live": "polite" });
  const good = r.result_id ? allowed("operate", "Adding a result as a shot", el("button", { type: "button", class: "mark-good secondary", text: "This one is good: add as a shot",
    onclick: guard(async () => {
      good.disabled = true;
      try {
        const out = await api(classPath(cls, "/shots/from-results"), { method: "POST", json: { result_ids: [r.result_id] } });
        const p = out.previous;
        const msg = `Shots ${p.shots} → ${out.class_info.shots}; calibrated threshold ${fmt(p.calibrated_threshold)} → ` +
                    `${fmt(out.calibration.threshold)}` + (out.class_info.threshold_overridden ? ` (override ${fmt(out.class_info.threshold)} stays)` : "");
        note.textContent = msg;
        setStatus(msg, "ok");
      } catch (e) { good.disabled = false; throw e; }
    }) })) : null;
  return el("article", { class: "card", dataset: { filename: r.filename, anomalous: r.is_anomalous, resultId: r.result_id || "" } },
    el("h3", { text: r.filename }), stage,
    el("p", {}, verdictBadge(r.is_anomalous), ` score ${fmt(r.score)} · threshold ${fmt(r.threshold)} · ${r.regions.length} region${r.regions.length === 1 ? "" : "s"}`),
    meter, good, note);
}

// -- page: threshold ---------------------------------------------------------------------------------------------------
async function pageThreshold(main, name) {
  main.append(el("h2", { text: "Threshold" }));
  const { field, classes } = await classSelect(name, (v) => { location.hash = classHash("threshold", v); });
  if (!classes.length) { main.append(el("p", { text: "No class is registered yet." })); return; }
  if (!name) name = classes[0].name;
  main.append(el("div", { class: "controls" }, field));
  field.querySelector("select").value = name;
  const [scores, kept] = await Promise.all([api(classPath(name, "/scores?bins=30")),
                                            api(classPath(name, "/results?limit=500&thumbnails=true"))]);
  let t = scores.threshold;
  const h = scores.histogram;
  const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
  const W = 1100, H = 280, L = 48, R = 16, T = 44, B = 40;
  const x = (v) => L + ((v - lo) / (hi - lo)) * (W - L - R);
  const xInv = (px) => lo + ((px - L) / (W - L - R)) * (hi - lo);
  const maxCount = Math.max(1, ...h.shots, ...h.recent);
  const y = (c) => H - B - (c / maxCount) * (H - T - B);
  const bars = [];
  for (let i = 0; i < h.shots.length; i++) {
    const x0 = x(h.edges[i]), w = (x(h.edges[i + 1]) - x0) / 2;
    if (h.shots[i]) bars.push(svg("rect", { class: "bar shots", x: x0, y: y(h.shots[i]), width: Math.max(w - 1, 1), height: H - B - y(h.shots[i]) },
      svg("title", { text: `${h.shots[i]} shots in [${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])})` })));
    if (h.recent[i]) bars.push(svg("rect", { class: "bar recent", x: x0 + w, y: y(h.recent[i]), width: Math.max(w - 1, 1), height: H - B - y(h.recent[i]) },
      svg("title", { text: `${h.recent[i]} recent results in [${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])})` })));
  }
  const ticks = [];
  for (let i = 0; i <= 5; i++) {
    const v = lo + ((hi - lo) * i) / 5;
    ticks.push(svg("line", { class: "tick", x1: x(v), x2: x(v), y1: H - B, y2: H - B + 5 }),
               svg("text", { class: "axis", x: x(v), y: H - B + 18, "text-anchor": "middle", text: fmt(v, 3) }));
  }
  const line = svg("line", { class: "threshold", y1: T - 8, y2: H - B });
  const knob = svg("rect", { class: "knob", y: T - 22, width: 16, height: 18, rx: 3 });
  const label = svg("text", { class: "knob-label", y: T - 26, "text-anchor": "middle" });
  const handle = svg("g", { class: "handle", tabindex: "0", role: "slider", "aria-label": "Threshold",
                            "aria-valuemin": fmt(lo), "aria-valuemax": fmt(hi) }, line, knob, label);
  const chart = svg("svg", { id: "chart", viewBox: `0 0 ${W} ${H}`, role: "group",
                             "aria-label": "Histogram of the shots' leave-one-out scores and the recent scores, with the threshold" },
    svg("line", { class: "axis-line", x1: L, x2: W - R, y1: H - B, y2: H - B }),
    svg("text", { class: "axis", x: W / 2, y: H - 4, "text-anchor": "middle", text: "score" }),
    svg("text", { class: "axis", x: 12, y: T + 10, text: `${maxCount}` }),
    ...ticks, ...bars,
    svg("line", { class: "calibrated", x1: x(scores.calibrated_threshold), x2: x(scores.calibrated_threshold), y1: T, y2: H - B },
        svg("title", { text: `calibrated threshold ${fmt(scores.calibrated_threshold)}` })),
    handle);
  const number = el("input", { type: "number", id: "threshold-input", step: "0.0001", min: "0.0001", max: "0.9999",
                               onchange: () => { const v = parseFloat(number.value); if (!Number.isNaN(v)) update(v); } });
  const summary = el("p", { id: "summary", "aria-live": "polite" });
  const grid = el("div", { class: "recent", id: "recent" }, kept.results.map((r) => el("figure", { class: "kept", dataset: { id: r.id, score: r.score } },
    el("img", { src: `data:image/jpeg;base64,${r.thumbnail}`, alt: r.filename, width: 96, height: 96 }),
    el("figcaption", {}, el("span", { class: "badge" }), el("span", { class: "num", text: fmt(r.score) })))));
  const save = el("button", { type: "button", id: "save", text: "Save", onclick: guard(async () => {
    const info = await api(classPath(name), { method: "PATCH", json: { threshold: t } });
    saved = info.threshold;
    setStatus(`Saved: threshold ${fmt(info.threshold)} (calibrated ${fmt(info.calibrated_threshold)})`, "ok");
    update(t);
  }) });
  const reset = el("button", { type: "button", id: "reset", class: "secondary", text: "Reset to calibrated", onclick: guard(async () => {
    const info = await api(classPath(name), { method: "PATCH", json: { threshold: null } });
    saved = info.threshold;
    setStatus(`Reset: threshold ${fmt(info.threshold)}, the calibrated one`, "ok");
    update(info.threshold);
  }) });
  let saved = scores.threshold;
  main.append(el("figure", { class: "chart" }, chart,
    el("figcaption", { class: "chart-legend" }, el("span", { class: "swatch shots" }), "shots (leave-one-out) ",
       el("span", { class: "swatch recent" }), "recent results ", el("span", { class: "swatch calibrated" }),
       `calibrated ${fmt(scores.calibrated_threshold)} `, el("span", { class: "swatch threshold" }), "threshold (drag, or focus and use the arrow keys)")),
    el("div", { class: "controls" }, el("div", { class: "field" }, el("label", { for: "threshold-input", text: "Threshold" }), number),
       allowed("operate", "Saving a threshold", el("div", { class: "row-buttons" }, save, reset))), summary,
    el("h3", { text: `Recent results (${kept.results.length} kept), labelled at this threshold` }),
    kept.results.length ? grid : el("p", { class: "muted", text: "None kept yet: inspect parts with “keep” on." }));
  if (!scores.calibration.shots_recorded) {
    main.append(el("p", { class: "muted", text: "This class was calibrated before per-shot scores were kept: register a shot again to see them." }));
  }

  function update(v) {
    t = Math.min(Math.max(v, 0.0001), 0.9999);
    const px = x(Math.min(Math.max(t, lo), hi));
    line.setAttribute("x1", px); line.setAttribute("x2", px);
    knob.setAttribute("x", px - 8); label.setAttribute("x", px); label.textContent = fmt(t);
    handle.setAttribute("aria-valuenow", fmt(t)); handle.setAttribute("aria-valuetext", `threshold ${fmt(t)}`);
    chart.dataset.threshold = String(t);
    if (document.activeElement !== number) number.value = fmt(t);
    let flagged = 0;
    for (const fig of grid.children) {
      const bad = parseFloat(fig.dataset.score) > t;
      flagged += bad;
      fig.dataset.anomalous = bad;
      const badge = fig.querySelector(".badge");
      badge.className = `badge ${bad ? "bad" : "good"}`;
      badge.textContent = bad ? "ANOMALOUS" : "normal";
    }
    const shotsAbove = scores.shots.filter((s) => s.score > t).length;
    summary.textContent = `At ${fmt(t)}: ${flagged} of ${kept.results.length} recent results anomalous, ` +
      `${shotsAbove} of ${scores.shots.length} shots above it. Saved: ${fmt(saved)}` + (Math.abs(t - saved) > 1e-12 ? " (unsaved change)" : "");
  }

  let dragging = false;
  const toValue = (event) => {
    const pt = chart.createSVGPoint();
    pt.x = event.clientX; pt.y = event.clientY;
    return xInv(pt.matrixTransform(chart.getScreenCTM().inverse()).x);
  };
  chart.addEventListener("pointerdown", (e) => { dragging = true; chart.setPointerCapture(e.pointerId); handle.focus(); update(toValue(e)); });
  chart.addEventListener("pointermove", (e) => { if (dragging) update(toValue(e)); });
  chart.addEventListener("pointerup", () => { dragging = false; });
  handle.addEventListener("keydown", (e) => {
    const step = (hi - lo) / (e.shiftKey ? 20 : 200);
    const moves = { ArrowLeft: -step, ArrowDown: -step, ArrowRight: step, ArrowUp: step };
    if (e.key in moves) { e.preventDefault(); update(t + moves[e.key]); }
    if (e.key === "Home") { e.preventDefault(); update(lo); }
    if (e.key === "End") { e.preventDefault(); update(hi); }
  });
  update(t);
}

// -- page: health --------------------------------------------------------------------------------------------------------
function parseProm(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const lm of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]] = lm[2];
    samples.push({ name: m[1], labels, value: parseFloat(m[3]) });
  }
  return samples;
}

function sum(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

async function pageHealth(main) {
  main.append(el("h2", { text: "Health" }));
  const box = el("dl", { class: "facts wide", id: "health" });
  const modelBox = el("p", { class: "muted", id: "model" });
  main.append(box, modelBox, el("p", { class: "muted", text: "From /readyz and the service's own /metrics, every 2 s; rates over the last interval." }));
  let last = null;
  async function poll() {
    const ready = await fetch(`${BASE}/readyz`).then((r) => r.json());
    const samples = parseProm(await api("/metrics"));
    const now = performance.now() / 1000;
    const cur = {
      t: now, requests: sum(samples, "sowa_requests_total", (l) => l.endpoint !== "/metrics"),
      images: sum(samples, "sowa_images_total"), batches: sum(samples, "sowa_batch_size_count"),
      batched: sum(samples, "sowa_batch_size_sum"),
    };
    const dt = last ? cur.t - last.t : null;
    const rate = (k) => (dt ? (cur[k] - last[k]) / dt : null);
    const recentBatch = last && cur.batches > last.batches ? (cur.batched - last.batched) / (cur.batches - last.batches) : null;
    const facts = [
      ["Ready", ready.ready ? "yes" : `no${ready.error ? `: ${ready.error}` : ""}`],
      ["Classes", `${ready.classes}${Object.keys(ready.refused_classes || {}).length ? `, ${Object.keys(ready.refused_classes).length} refused` : ""}`],
      ["Queue depth", `${sum(samples, "sowa_queue_depth")} images`],
      ["Mean batch size", `${fmt(cur.batches ? cur.batched / cur.batches : null, 2)} overall; ` +
                          (recentBatch === null ? "no batch in the last 2 s" : `${fmt(recentBatch, 2)} in the last 2 s`)],
      ["Batches", cur.batches],
      ["Requests/s", fmt(rate("requests"), 2)],
      ["Images/s", fmt(rate("images"), 2)],
      ["Bank memory", bytes(sum(samples, "sowa_bank_bytes"))],
    ];
    box.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }),
      el("dd", { text: String(v), dataset: { fact: k.toLowerCase().replaceAll(/[^a-z]+/g, "-") } })]));
    const info = samples.find((s) => s.name === "sowa_model_info");
    if (info) modelBox.textContent = `Model: ${info.labels.arch}, ${info.labels.image_size} px, ${info.labels.device} ${info.labels.dtype}, ` +
      `${info.labels.trained === "True" ? "trained" : "untrained"}, fingerprint ${info.labels.fingerprint}`;
    last = cur;
  }
  await poll();
  const timer = setInterval(() => poll().catch(showError), 2000);
  pageCleanup = () => clearInterval(timer);
}

// -- page: audit trail (admins) -------------------------------------------------------------------------------------
const AUDIT_PAGE = 50;

// before -> after in a few words; the full states are in the row's details
function auditChange(e) {
  const b = e.before || {}, a = e.after || {};
  const thr = (s) => `threshold ${fmt(s.threshold)}${s.threshold_override === null || s.threshold_override === undefined ? "" : " (override)"}`;
  const shotDiff = () => {
    const was = new Set(b.shots || []), now = new Set(a.shots || []);
    const added = [...now].filter((h) => !was.has(h)).length, removed = [...was].filter((h) => !now.has(h)).length;
    return `shots ${was.size} → ${now.size} (+${added} −${removed}); calibrated ${fmt(b.calibrated_threshold)} → ${fmt(a.calibrated_threshold)}`;
  };
  switch (e.action) {
    case "class.created": return `new class: ${a.shot_count} shots, ${thr(a)}`;
    case "shots.added": case "shots.replaced": return e.before && e.before.damaged ? `damaged class → ${a.shot_count} shots` : shotDiff();
    case "threshold.set": case "threshold.reset": return `${thr(b)} → ${thr(a)}; calibrated ${fmt(a.calibrated_threshold)}`;
    case "class.deleted": return b.damaged ? "damaged class → deleted" : `${b.shot_count} shots, ${thr(b)} → deleted`;
    case "key.added": return `new ${a.role} key${a.classes ? ` for classes ${a.classes}` : ""}`;
    case "key.revoked": return `${b.role || "?"} key → revoked`;
    case "record.reviewed": return `reviewed ${b.review || "(none)"} → ${a.review}${a.note ? `: ${a.note}` : ""}`;
    case "model.activated": return `active model ${b.active || "(none)"} → ${a.active}`;
    case "model.shadow": return e.after ? `shadow ${b.shadow || "(none)"} → ${a.shadow} on ${fmt(100 * a.share, 1)}% of the traffic`
      : `shadow ${b.shadow || "(none)"} → stopped`;
    default: return "";
  }
}

function auditRow(e) {
  const states = el("details", {}, el("summary", { text: "before / after" }),
    el("pre", { text: `before: ${JSON.stringify(e.before, null, 1)}\nafter: ${JSON.stringify(e.after, null, 1)}` }));
  return el("tr", { dataset: { id: e.id, action: e.action } },
    el("td", { class: "num", text: new Date(e.time * 1000).toLocaleString() }),
    el("td", { text: e.actor }), el("td", {}, el("code", { text: e.action })), el("td", { text: e.target }),
    el("td", { class: "change" }, el("span", { text: auditChange(e) }), states));
}

async function pageAudit(main) {
  main.append(el("h2", { text: "Audit trail" }));
  const refused = allowed("admin", "Reading the audit trail", null);
  if (refused) { main.append(refused); return; }
  const input = (id, label, attrs = {}) => {
    const node = el("input", { id, autocomplete: "off", ...attrs });
    return [node, el("div", { class: "field" }, el("label", { for: id, text: label }), node)];
  };
  const [actor, actorField] = input("audit-actor", "Who", { placeholder: "key name" });
  const [target, targetField] = input("audit-target", "Class or key");
  const [since, sinceField] = input("audit-since", "From", { type: "datetime-local" });
  const [until, untilField] = input("audit-until", "Before", { type: "datetime-local" });
  const action = el("select", { id: "audit-action" }, el("option", { value: "", text: "any" }),
                    config.audit_actions.map((a) => el("option", { value: a, text: a })));
  const filters = () => {
    const q = new URLSearchParams();
    for (const [k, v] of [["actor", actor.value.trim()], ["target", target.value.trim()], ["action", action.value]]) if (v) q.set(k, v);
    for (const [k, node] of [["since", since], ["until", until]]) if (node.value) q.set(k, String(new Date(node.value).getTime() / 1000));
    return q;
  };
  const tbody = el("tbody", {});
  const count = el("span", { id: "audit-count" });
  const more = el("button", { type: "button", id: "audit-more", class: "secondary", text: "Load more" });
  let next = null, query = filters();
  const load = async (fresh) => {
    const q = new URLSearchParams(query);
    q.set("limit", String(AUDIT_PAGE));
    if (!fresh && next) q.set("after", next);
    const page = await api(`/audit?${q}`);
    if (fresh) tbody.replaceChildren();
    tbody.append(...page.events.map(auditRow));
    next = page.next;
    more.hidden = next === null;
    count.textContent = tbody.rows.length ? `${tbody.rows.length} event${tbody.rows.length === 1 ? "" : "s"} shown, newest first` : "No event matches.";
  };
  more.addEventListener("click", guard(async () => {
    more.disabled = true;
    try { await load(false); } finally { more.disabled = false; }
  }));
  const exportAs = (format) => el("button", { type: "button", class: "secondary", id: `audit-export-${format}`,
    text: `Export ${format.toUpperCase()}`, onclick: guard(async () => {
      const q = new URLSearchParams(query);
      q.set("format", format);
      const url = URL.createObjectURL(await api(`/audit/export?${q}`, { as: "blob" }));  // the key goes in a header
      const link = el("a", { href: url, download: `sowa-audit.${format === "csv" ? "csv" : "jsonl"}` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    }) });
  const form = el("form", { class: "inline", id: "audit-filters", onsubmit: guard(async (ev) => {
    ev.preventDefault();
    query = filters();
    await load(true);
  }) }, actorField, el("div", { class: "field" }, el("label", { for: "audit-action", text: "Change" }), action),
  targetField, sinceField, untilField, el("button", { type: "submit", text: "Filter" }), exportAs("csv"), exportAs("jsonl"));
  main.append(form, el("table", { class: "audit", id: "audit" },
    el("caption", { text: "Every change: who made it (the key's name), when, and what it was before and after" }),
    el("thead", {}, el("tr", {}, ["Time", "Who", "Change", "Target", "Before → after"].map((h) => el("th", { scope: "col", text: h })))),
    tbody), el("p", { class: "more" }, count, " ", more));
  await load(true);
}

// -- routing -------------------------------------------------------------------------------------------------------------
function showError(e) {
  console.warn(e);
  setStatus(e instanceof ApiError ? `${e.message} (${e.code})` : String(e.message || e), "error");
}
window.addEventListener("unhandledrejection", (e) => showError(e.reason));  // shown, and still reported
const guard = (fn) => (...args) => Promise.resolve().then(() => fn(...args)).catch(showError);

async function route() {
  if (pageCleanup) { pageCleanup(); pageCleanup = null; }
  const [first, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const page = first || "classes";
  let arg = null;
  try { arg = decodeURIComponent(rest.join("/")); } catch { /* a malformed escape: refused below */ }
  const pages = { classes: pageClasses, class: pageClass, inspect: pageInspect, threshold: pageThreshold, health: pageHealth,
                  audit: pageAudit, history: pageHistory, review: pageReview, quality: pageQuality,  // these three: records.js
                  models: pageModels };  // models.js
  const render = pages[page] || pageClasses;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === (page === "class" ? "classes" : page)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  const fresh = el("main", { id: "main", tabindex: "-1", dataset: { page } });
  main.replaceWith(fresh);
  setStatus("");
  // a class name from the URL, checked before any page uses it (#/threshold/x%2F..%2Fbat would reach /classes/bat)
  if (![pageClasses, pageHealth, pageAudit, pageHistory, pageReview, pageModels].includes(render) && (arg === null || (arg !== "" && !CLASS_NAME.test(arg)))) {
    fresh.append(el("p", { class: "error", id: "bad-route", text: "That address names no valid class: a class name " +
                           "is 1-64 of a-z, 0-9, _ . - (starting with a letter or digit)." }));
    setStatus("Not a class name in the address", "error");
    return;
  }
  try {
    await render(fresh, arg);
    fresh.dataset.loaded = "true";
  } catch (e) { showError(e); }
}

async function start() {
  config = await fetch(`${BASE}/ui/config.json`).then((r) => r.json());
  RAMP = config.heat_ramp;
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  if (config.api_key_required && !sessionStorage.getItem(KEY_STORE)) await askKey();
  document.getElementById("forget-key").hidden = !config.api_key_required;
  me = await api("/auth/me");
  const who = document.getElementById("whoami");
  who.textContent = me.keys_required ? `key ${me.name}: ${me.role}${me.classes ? ` (classes ${me.classes})` : ""}` : "";
  who.hidden = !me.keys_required;
  document.getElementById("audit-link").hidden = !may("admin");  // #/audit says which role it needs
  window.addEventListener("hashchange", route);
  await route();
}

// deferred scripts run in order before DOMContentLoaded: records.js's and models.js's pages are defined by then
document.addEventListener("DOMContentLoaded", () => start().catch(showError));
