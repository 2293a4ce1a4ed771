// dpq search page: no build step, no dependencies. Talks to the JSON API of the same app.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  stats: null,
  bits: null,
  k: 24,
  query: null,        // {kind: "file", file} or {kind: "id", id}
  queryLabel: null,   // label used for precision (from the item, or chosen by the user)
  results: [],
  previousRanks: null, // Map id -> rank at the previously shown code length
  busy: false,
  requestNumber: 0,
};

// ------------------------------------------------------------------ helpers

function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 5000);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    let detail = body && body.detail !== undefined ? body.detail : response.statusText;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function labelText(label) {
  if (label === null || label === undefined) return "—";
  return Array.isArray(label) ? (label.length ? label.join(", ") : "—") : String(label);
}

function sameLabel(a, b) {
  if (a === null || a === undefined || b === null || b === undefined) return null;
  const left = Array.isArray(a) ? a.map(String) : [String(a)];
  const right = Array.isArray(b) ? b.map(String) : [String(b)];
  return left.some((x) => right.includes(x));
}

function formatScore(distance) {
  const ip = state.stats && state.stats.search_mode === "ip";
  const value = ip ? -distance : distance;
  const size = Math.abs(value);
  let text;
  if (size < 1e-6) text = "0";
  else if (size < 1e-3) text = value.toExponential(2);
  else if (size >= 100) text = value.toFixed(1);
  else text = value.toPrecision(3);
  return ip ? `score ${text}` : `dist ${text}`;
}

// ------------------------------------------------------------------ setup

async function loadStats() {
  const stats = await api("/stats");
  state.stats = stats;
  state.bits = stats.default_bits;
  const modelHash = stats.model ? (stats.model.weights_sha256 || stats.model.name || "").slice(0, 8) : "";
  $("facts").innerHTML =
    `<b>${stats.items.toLocaleString()}</b> items · ${stats.num_levels} × ${stats.codebook_size} codewords` +
    ` · codebooks <b>${escapeHtml(stats.codebook_sha256.slice(0, 8))}</b>` +
    (stats.model ? ` · model <b>${escapeHtml(modelHash)}</b>` : "");
  const group = $("bits");
  group.innerHTML = "";
  for (const bits of stats.code_lengths) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.bits = bits;
    button.setAttribute("role", "radio");
    button.innerHTML = `${bits}<small> bit</small>`;
    button.addEventListener("click", () => setBits(bits));
    group.appendChild(button);
  }
  const select = $("label-select");
  for (const name of stats.classes || []) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.appendChild(option);
  }
  select.disabled = !stats.labels;
  if (!stats.accepts.includes("image")) {
    $("drop-hint").innerHTML = "<strong>No model loaded</strong><span>search by clicking items</span>";
    $("choose-button").disabled = true;
  }
  showBits();
}

function showBits() {
  for (const button of $("bits").children) {
    button.setAttribute("aria-checked", String(Number(button.dataset.bits) === state.bits));
  }
  const bytes = state.stats.bytes_per_item[String(state.bits)];
  $("bytes-note").textContent = `${bytes} bytes / item`;
}

// ------------------------------------------------------------------ queries

function setQueryFile(file) {
  if (!file) return;
  if (!state.stats.accepts.includes("image")) {
    toast("This service was started without a model: it cannot search by image.");
    return;
  }
  state.query = { kind: "file", file };
  state.queryLabel = $("label-select").value || null;
  state.previousRanks = null;
  const image = $("query-image");
  image.src = URL.createObjectURL(file);
  image.hidden = false;
  $("drop-hint").hidden = true;
  setCaption(file.name || "pasted image");
  history.replaceState(null, "", location.pathname);
  search();
}

function setQueryItem(id, label, imageUrl) {
  state.query = { kind: "id", id };
  state.queryLabel = label === undefined ? null : label;
  state.previousRanks = null;
  const image = $("query-image");
  if (imageUrl) {
    image.src = imageUrl;
    image.hidden = false;
    $("drop-hint").hidden = true;
  } else {
    image.hidden = true;
    $("drop-hint").hidden = false;
  }
  setCaption(`item ${id} · ${labelText(label)}`);
  const select = $("label-select");
  select.value = typeof label === "string" ? label : "";
  history.replaceState(null, "", `#id=${id}&bits=${state.bits}`);
  search();
}

function setCaption(text) {
  const caption = $("query-caption");
  caption.textContent = text;
  caption.hidden = false;
}

function setBits(bits) {
  if (bits === state.bits) return;
  state.previousRanks = new Map(state.results.map((r, i) => [r.id, i]));
  state.bits = bits;
  showBits();
  if (state.query && state.query.kind === "id") {
    history.replaceState(null, "", `#id=${state.query.id}&bits=${bits}`);
  }
  if (state.query) search();
}

async function search(append = false) {
  if (!state.query) return;
  const number = ++state.requestNumber;
  const offset = append ? state.results.length : 0;
  state.busy = true;
  $("results").setAttribute("aria-busy", "true");
  $("status").textContent = "Searching…";
  if (!append && !state.results.length) showSkeleton();
  let request;
  if (state.query.kind === "file") {
    const form = new FormData();
    form.append("file", state.query.file);
    form.append("k", String(state.k));
    form.append("bits", String(state.bits));
    form.append("offset", String(offset));
    request = { method: "POST", body: form };
  } else {
    request = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: state.query.id, k: state.k, bits: state.bits, offset }),
    };
  }
  try {
    const body = await api("/search", request);
    if (number !== state.requestNumber) return; // a newer search is on its way
    state.results = append ? state.results.concat(body.results) : body.results;
    render(body, append);
  } catch (error) {
    if (number !== state.requestNumber) return;
    $("status").textContent = "The search failed.";
    if (!append) $("results").innerHTML = "";
    toast(error.message);
  } finally {
    if (number === state.requestNumber) {
      state.busy = false;
      $("results").setAttribute("aria-busy", "false");
    }
  }
}

function showSkeleton() {
  const list = $("results");
  list.innerHTML = "";
  for (let i = 0; i < Math.min(state.k, 12); i++) {
    const item = document.createElement("li");
    item.className = "result skeleton";
    item.innerHTML = '<div class="nothumb thumb"></div><div class="meta"><span class="label">&nbsp;</span><span class="dist">&nbsp;</span></div>';
    list.appendChild(item);
  }
}

// ------------------------------------------------------------------ results

function render(body, append) {
  const list = $("results");
  if (!append) list.innerHTML = "";
  const start = append ? list.children.length : 0;
  body.results.slice(0).forEach((result, i) => list.appendChild(card(result, start + i)));
  const shown = state.results.length;
  const what = state.query.kind === "id" ? `item ${state.query.id}` : "your image";
  $("results-title").textContent = `${shown} nearest to ${what}`;
  $("status").textContent =
    `${body.bits}-bit codes · ${body.total.toLocaleString()} items searched in ${body.took_ms.toFixed(1)} ms`;
  $("more-button").hidden = body.results.length < body.k || shown >= 1000;
  showPrecision();
}

function card(result, rank) {
  const item = document.createElement("li");
  item.className = "result";
  item.tabIndex = 0;
  item.dataset.id = result.id;
  const match = sameLabel(state.queryLabel, result.label);
  if (match === true) item.classList.add("match");
  if (match === false) item.classList.add("miss");
  const picture = result.image_url
    ? `<img class="thumb" loading="lazy" alt="item ${result.id}" src="${result.image_url}">`
    : `<div class="nothumb">#${result.id}</div>`;
  item.innerHTML =
    `${picture}<span class="rank">${rank + 1}</span>` +
    (match === null ? "" : '<span class="dot"></span>') +
    `<div class="meta"><span class="label"></span><span class="dist">${formatScore(result.distance)}</span></div>`;
  item.querySelector(".label").textContent = labelText(result.label);
  item.title = `item ${result.id} · ${labelText(result.label)} · distance ${result.distance}`;
  if (state.previousRanks) {
    const before = state.previousRanks.get(result.id);
    const badge = document.createElement("span");
    if (before === undefined) {
      badge.className = "move new";
      badge.textContent = "new";
    } else if (before > rank) {
      badge.className = "move up";
      badge.textContent = `▲${before - rank}`;
    } else if (before < rank) {
      badge.className = "move down";
      badge.textContent = `▼${rank - before}`;
    }
    if (badge.className) item.appendChild(badge);
  }
  const open = () => {
    setQueryItem(result.id, result.label, result.image_url);
    window.scrollTo({ top: 0, behavior: "smooth" });
  };
  item.addEventListener("click", open);
  item.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
  return item;
}

function showPrecision() {
  const box = $("precision");
  if (state.queryLabel === null || !state.results.length) {
    box.hidden = true;
    return;
  }
  const judged = state.results.filter((r) => r.label !== null && r.label !== undefined);
  const hits = judged.filter((r) => sameLabel(state.queryLabel, r.label)).length;
  const value = judged.length ? hits / judged.length : 0;
  box.hidden = false;
  $("precision-value").textContent = value.toFixed(2);
  $("precision-note").textContent = `precision · ${hits}/${judged.length} “${labelText(state.queryLabel)}”`;
  const circumference = 2 * Math.PI * 15.5;
  $("precision-arc").style.strokeDasharray = `${value * circumference} ${circumference}`;
}

// ------------------------------------------------------------------ events

function wire() {
  const zone = $("dropzone");
  const input = $("file-input");
  zone.addEventListener("click", () => { if (!$("choose-button").disabled) input.click(); });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  $("choose-button").addEventListener("click", () => input.click());
  input.addEventListener("change", () => { setQueryFile(input.files[0]); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (event) => {
    const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) setQueryFile(file); else toast("Drop an image file (JPEG, PNG, WebP, …).");
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData || {}).files || []].find((f) => f.type.startsWith("image/"));
    if (file) setQueryFile(file);
  });
  $("random-button").addEventListener("click", async () => {
    try {
      const item = await api("/items/random");
      setQueryItem(item.id, item.label, item.image_url);
    } catch (error) { toast(error.message); }
  });
  $("k-select").addEventListener("change", (event) => {
    state.k = Number(event.target.value);
    state.previousRanks = null;
    search();
  });
  $("label-select").addEventListener("change", (event) => {
    state.queryLabel = event.target.value || null;
    if (state.results.length) {
      const list = $("results");
      list.innerHTML = "";
      state.results.forEach((r, i) => list.appendChild(card(r, i)));
      showPrecision();
    }
  });
  $("more-button").addEventListener("click", () => search(true));
}

async function start() {
  wire();
  try {
    await loadStats();
  } catch (error) {
    $("facts").textContent = "service unreachable";
    toast(error.message);
    return;
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("bits") && state.stats.code_lengths.includes(Number(hash.get("bits")))) {
    state.bits = Number(hash.get("bits"));
    showBits();
  }
  if (hash.has("id")) {
    try {
      const item = await api(`/items/${encodeURIComponent(hash.get("id"))}`);
      setQueryItem(item.id, item.label, item.image_url);
    } catch (error) { toast(error.message); }
  }
}

start();
