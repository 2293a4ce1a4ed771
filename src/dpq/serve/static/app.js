// dpq search page: no build step, no dependencies. Talks to the JSON API of the same app.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SHOWN = 1000;
const state = {
  stats: null,
  bits: null,
  k: 24,
  // {kind: "file", file, name} or {kind: "id", id}; plus ownLabel (the item's label, or the
  // model's prediction for an upload, once the answer says it) and ownText (how it reads).
  query: null,
  labelChoice: "@own", // "@own": the query's own label; "": unknown; else a class name
  includeQuery: false, // item queries: keep the item itself among its results
  filter: { labels: [], match: "any" },
  results: [],
  tieGroups: new Map(), // start rank -> {start, end, distance, complete}
  distanceScale: 1, // the largest |distance| shown: below 1e-4 of it a distance prints as 0
  lastAnswer: null,
  previousRanks: null, // Map id -> rank at the previously shown code length
  requestNumber: 0,
};

// ------------------------------------------------------------------ helpers

// An error stays on the page until the next action (or until dismissed).
function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
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

const threeDigits = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 3 });

function isInnerProduct() {
  return Boolean(state.stats && state.stats.search_mode === "ip");
}

// A distance as the page prints it: 3 significant digits, no exponents; a Euclidean distance
// below zero (a rounding error) or below 1e-4 of the largest one shown reads 0.
function formatNumber(distance) {
  const ip = isInnerProduct();
  const value = ip ? -distance : Math.max(0, distance);
  if (Math.abs(value) < 1e-4 * (state.distanceScale || 1)) return "0";
  return threeDigits.format(value);
}

function formatScore(distance) {
  return `${isInnerProduct() ? "score" : "dist"} ${formatNumber(distance)}`;
}

function plural(count, word) {
  return `${count.toLocaleString("en-US")} ${word}${count === 1 ? "" : "s"}`;
}

// ------------------------------------------------------------------ setup

async function loadStats() {
  const stats = await api("/stats");
  state.stats = stats;
  state.bits = stats.default_bits;
  const modelHash = stats.model ? (stats.model.weights_sha256 || stats.model.name || "").slice(0, 8) : "";
  $("facts").innerHTML =
    `<b>${stats.items.toLocaleString()}</b> items<span class="extra"> · ${stats.num_levels} × ${stats.codebook_size} codewords` +
    ` · codebooks <b>${escapeHtml(stats.codebook_sha256.slice(0, 8))}</b>` +
    (stats.model ? ` · model <b>${escapeHtml(modelHash)}</b>` : "") + "</span>";
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
  buildFilter(stats);
  showNotice(stats.warnings || []);
  showQueryLabel();
  if (!stats.accepts.includes("image")) {
    $("drop-hint").innerHTML = "<strong>No model loaded</strong><span>search by clicking items</span>";
    $("choose-button").disabled = true;
  }
  showBits();
}

function buildFilter(stats) {
  const classes = stats.labels ? stats.classes || [] : [];
  $("filter").hidden = !classes.length;
  $("filter-match").hidden = !stats.multi_label;
  const box = $("filter-labels");
  box.innerHTML = "";
  for (const name of classes) {
    const label = document.createElement("label");
    label.className = "chip";
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = name;
    input.addEventListener("change", filterChanged);
    label.append(input, document.createTextNode(name));
    box.appendChild(label);
  }
}

function filterChanged() {
  state.filter.labels = [...$("filter-labels").querySelectorAll("input:checked")].map((i) => i.value);
  const checked = document.querySelector("input[name='filter-match']:checked");
  state.filter.match = checked ? checked.value : "any";
  $("filter-count").textContent = state.filter.labels.length ? `(${state.filter.labels.length})` : "";
  newRanking();
}

function showNotice(warnings) {
  const notice = $("notice");
  notice.hidden = !warnings.length;
  if (!warnings.length) return;
  $("notice-title").textContent =
    `This index's codes look degenerate (${plural(warnings.length, "warning")}): rankings hold large ties`;
  const list = $("notice-list");
  list.innerHTML = "";
  for (const text of warnings) {
    const item = document.createElement("li");
    item.textContent = text;
    list.appendChild(item);
  }
}

function showBits() {
  for (const button of $("bits").children) {
    const checked = Number(button.dataset.bits) === state.bits;
    button.setAttribute("aria-checked", String(checked));
    button.tabIndex = checked ? 0 : -1; // one tab stop: arrows move within the group
  }
  const bytes = state.stats.bytes_per_item[String(state.bits)];
  $("bytes-note").textContent = `${bytes} bytes / item`;
}

// ------------------------------------------------------------------ the query and its label

function queryLabel() {
  if (!state.query) return null;
  if (state.labelChoice === "@own") return state.query.ownLabel;
  return state.labelChoice === "" ? null : state.labelChoice;
}

// The label select and the caption say where the query's label comes from.
function showQueryLabel() {
  const query = state.query;
  const own = $("own-label");
  const hasOwn = Boolean(query && query.ownLabel !== null && query.ownLabel !== undefined);
  const pending = Boolean(query && query.pending);
  own.hidden = !hasOwn && !pending;
  own.textContent = hasOwn ? query.ownText : pending ? "predicting…" : "";
  $("label-select").value = state.labelChoice === "@own" && own.hidden ? "" : state.labelChoice;
  let note = "Precision counts results with the query's label.";
  if (query && state.labelChoice === "@own" && hasOwn) {
    note = query.kind === "file"
      ? "The model's prediction: choose the right label if it is wrong."
      : "The item's own label.";
  } else if (query && state.labelChoice !== "@own" && state.labelChoice !== "") {
    note = "The label you chose.";
  }
  $("label-note").textContent = note;
  if (!query) return;
  if (query.kind === "file") {
    const guess = query.pending ? "predicting…" : query.ownText;
    setCaption(guess ? `${query.name} · ${guess}` : query.name);
  } else {
    setCaption(`item ${query.id} · ${labelText(query.ownLabel)}`);
  }
}

function setQueryFile(file) {
  if (!file) return;
  clearError();
  if (!state.stats.accepts.includes("image")) {
    showError("This service was started without a model: it cannot search by image.");
    return;
  }
  const name = file.name || "pasted image";
  state.query = { kind: "file", file, name, ownLabel: null, ownText: null, pending: true };
  state.labelChoice = "@own";
  state.previousRanks = null;
  const image = $("query-image");
  image.src = URL.createObjectURL(file);
  image.alt = `Query: your image ${name}`;
  image.hidden = false;
  $("drop-hint").hidden = true;
  $("include-query").disabled = true;
  showQueryLabel();
  history.replaceState(null, "", location.pathname);
  search();
}

function setQueryItem(id, label, imageUrl) {
  clearError();
  const known = label !== null && label !== undefined;
  state.query = {
    kind: "id", id, ownLabel: known ? label : null, ownText: known ? `item's label: ${labelText(label)}` : null,
  };
  state.labelChoice = "@own";
  state.previousRanks = null;
  const image = $("query-image");
  if (imageUrl) {
    image.src = imageUrl;
    image.alt = `Query: item ${id}` + (known ? `, labelled ${labelText(label)}` : "");
    image.hidden = false;
    $("drop-hint").hidden = true;
  } else {
    image.hidden = true;
    $("drop-hint").hidden = false;
  }
  $("include-query").disabled = false;
  showQueryLabel();
  history.replaceState(null, "", `#id=${id}&bits=${state.bits}`);
  search();
}

// What an image query's answer says the model predicts becomes the upload's own label.
function takePrediction(query, answered) {
  if (query.kind !== "file" || !query.pending) return;
  query.pending = false;
  const predicted = answered ? answered.predicted_label : undefined;
  if (predicted === undefined || predicted === null) {
    if (state.labelChoice === "@own") state.labelChoice = "";
  } else {
    const probability = answered.predicted_probability;
    query.ownLabel = predicted;
    query.ownText = `predicted: ${labelText(predicted)}` +
      (typeof probability === "number" ? `, ${probability.toFixed(2)}` : "");
  }
  showQueryLabel();
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

// A search whose ranking is not comparable to the one shown (no movement badges).
function newRanking() {
  state.previousRanks = null;
  search();
}

// ------------------------------------------------------------------ searching

function searchRequest(offset) {
  const filter = state.filter.labels.length
    ? { labels: state.filter.labels, match: state.filter.match } : null;
  if (state.query.kind === "file") {
    const form = new FormData();
    form.append("file", state.query.file);
    form.append("k", String(state.k));
    form.append("bits", String(state.bits));
    form.append("offset", String(offset));
    if (filter) form.append("filter", JSON.stringify(filter));
    return { method: "POST", body: form };
  }
  const body = {
    id: state.query.id, k: state.k, bits: state.bits, offset, exclude_query: !state.includeQuery,
  };
  if (filter) body.filter = filter;
  return {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
}

async function search(append = false) {
  if (!state.query) return;
  clearError();
  const number = ++state.requestNumber;
  const query = state.query;
  const offset = append ? state.results.length : 0;
  $("results").setAttribute("aria-busy", "true");
  $("status").textContent = "Searching…";
  if (!append && !state.results.length) showSkeleton();
  try {
    const body = await api("/search", searchRequest(offset));
    if (number !== state.requestNumber) return; // a newer search is on its way
    takePrediction(query, body.query);
    state.results = append ? state.results.concat(body.results) : body.results;
    if (!append) state.tieGroups = new Map();
    for (const group of body.tie_groups || []) state.tieGroups.set(group.start, group);
    state.lastAnswer = body;
    render(body);
  } catch (error) {
    if (number !== state.requestNumber) return;
    failed(error, append);
  } finally {
    if (number === state.requestNumber) $("results").setAttribute("aria-busy", "false");
  }
}

// A failed search leaves nothing of the previous answer on the page (a failed "Show more"
// keeps the results shown so far), and its error stays until the next action.
function failed(error, append) {
  if (state.query.kind === "file") takePrediction(state.query, null);
  if (!append) {
    state.results = [];
    state.tieGroups = new Map();
    state.previousRanks = null;
    $("results").innerHTML = "";
    $("results-title").textContent = "The search failed";
    $("status").textContent = "Nothing to show: see the error below.";
    $("more-button").hidden = true;
    $("announce").textContent = "The search failed.";
    showPrecision();
  } else {
    $("status").textContent = "Showing more failed.";
  }
  showError(error.message);
}

function showSkeleton() {
  const list = $("results");
  list.innerHTML = "";
  for (let i = 0; i < Math.min(state.k, 12); i++) {
    const item = document.createElement("li");
    item.className = "result skeleton";
    item.setAttribute("aria-hidden", "true");
    item.innerHTML = '<div class="nothumb thumb"></div><div class="meta"><span class="label">&nbsp;</span><span class="dist">&nbsp;</span></div>';
    list.appendChild(item);
  }
}

// ------------------------------------------------------------------ results

function shownGroups() {
  const shown = state.results.length;
  return [...state.tieGroups.values()]
    .filter((g) => g.start < shown && g.end > 0 && g.end - g.start > 1)
    .sort((a, b) => a.start - b.start);
}

function render(body) {
  const results = state.results;
  state.distanceScale = Math.max(0, ...results.map((r) => Math.abs(r.distance))) || 1;
  const groups = shownGroups();
  const list = $("results");
  list.innerHTML = "";
  let box = null;
  let group = null;
  results.forEach((result, rank) => {
    const inGroup = groups.find((g) => g.start <= rank && rank < g.end) || null;
    if (inGroup !== group) {
      group = inGroup;
      box = group ? tieBox(group, groups.indexOf(group), results.length) : null;
      if (box) list.appendChild(box);
    }
    const item = card(result, rank);
    if (box) {
      item.classList.add("tied");
      item.setAttribute("aria-describedby", box.dataset.noteId);
      box.querySelector("ol").appendChild(item);
    } else {
      list.appendChild(item);
    }
  });
  const shown = results.length;
  const what = state.query.kind === "id" ? `item ${state.query.id}` : "your image";
  const among = state.filter.labels.length
    ? ` ${state.filter.match === "all" ? "with all of" : "among"} ${state.filter.labels.join(", ")}` : "";
  $("results-title").textContent = shown
    ? `${shown} nearest to ${what}${among}` : `Nothing${among} to show for ${what}`;
  const matching = body.matching === null || body.matching === undefined
    ? "" : ` · ${body.matching.toLocaleString("en-US")} match the filter`;
  $("status").textContent =
    `${body.bits}-bit codes · ${body.total.toLocaleString()} items searched in ${body.took_ms.toFixed(1)} ms${matching}`;
  $("more-button").hidden = body.results.length < body.k || shown >= MAX_SHOWN;
  $("announce").textContent =
    `${plural(shown, "result")}, ${groups.length ? plural(groups.length, "tie group") : "no ties"}`;
  showPrecision();
}

// A box around the results of one tie group, with a note saying what the tie means.
function tieBox(group, number, shown) {
  const box = document.createElement("li");
  box.className = "tie-group";
  const note = document.createElement("p");
  note.className = "tie-note";
  note.id = `tie-note-${number}`;
  box.dataset.noteId = note.id;
  const size = group.end - group.start;
  const count = group.complete ? plural(size, "item") : `at least ${plural(size, "item")}`;
  const onPage = Math.min(group.end, shown) - Math.max(group.start, 0);
  const ranks = `ranks ${group.start + 1}–${group.end}${group.complete ? "" : "+"}`;
  const partly = onPage < size || !group.complete ? `, ${onPage} shown` : "";
  const at = `${isInnerProduct() ? "score" : "distance"} ${formatNumber(group.distance)}`;
  note.innerHTML = `<b>Tied at ${escapeHtml(at)}</b>: ${escapeHtml(ranks)} ` +
    `(${escapeHtml(count)}${escapeHtml(partly)}), order among them is arbitrary`;
  const members = document.createElement("ol");
  members.className = "tie-members";
  box.append(note, members);
  return box;
}

function card(result, rank) {
  const item = document.createElement("li");
  item.className = "result";
  item.tabIndex = 0;
  item.dataset.id = result.id;
  const match = sameLabel(queryLabel(), result.label);
  if (match === true) item.classList.add("match");
  if (match === false) item.classList.add("miss");
  const picture = result.image_url
    ? `<img class="thumb" loading="lazy" alt="" src="${result.image_url}">`
    : `<div class="nothumb" aria-hidden="true">#${result.id}</div>`;
  item.innerHTML =
    `${picture}<span class="rank" aria-hidden="true">${rank + 1}</span>` +
    (match === null ? "" : '<span class="dot" aria-hidden="true"></span>') +
    `<div class="meta"><span class="label"></span><span class="dist">${formatScore(result.distance)}</span></div>`;
  item.querySelector(".label").textContent = labelText(result.label);
  const description = `rank ${rank + 1}: item ${result.id}, ${labelText(result.label)}, ${formatScore(result.distance)}`;
  item.setAttribute("aria-label", description);
  item.title = `${description} (distance ${result.distance})`;
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
  item.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(); }
  });
  return item;
}

function showPrecision() {
  const box = $("precision");
  const label = queryLabel();
  if (label === null || label === undefined || !state.results.length) {
    box.hidden = true;
    return;
  }
  const judged = state.results.filter((r) => r.label !== null && r.label !== undefined);
  const hits = judged.filter((r) => sameLabel(label, r.label)).length;
  const value = judged.length ? hits / judged.length : 0;
  box.hidden = false;
  $("precision-value").textContent = value.toFixed(2);
  $("precision-note").textContent = `precision · ${hits}/${judged.length} “${labelText(label)}”`;
  const circumference = 2 * Math.PI * 15.5;
  $("precision-arc").style.strokeDasharray = `${value * circumference} ${circumference}`;
}

function relabel() {
  if (!state.results.length) return;
  for (const item of $("results").querySelectorAll(".result")) {
    const result = state.results.find((r) => String(r.id) === item.dataset.id);
    const match = result ? sameLabel(queryLabel(), result.label) : null;
    item.classList.toggle("match", match === true);
    item.classList.toggle("miss", match === false);
    let dot = item.querySelector(".dot");
    if (match === null && dot) dot.remove();
    if (match !== null && !dot) {
      dot = document.createElement("span");
      dot.className = "dot";
      dot.setAttribute("aria-hidden", "true");
      item.appendChild(dot);
    }
  }
  showPrecision();
}

// ------------------------------------------------------------------ events

// Radio-group keys: arrows move and select (wrapping), Home and End go to the ends.
function bitsKeys(event) {
  const lengths = state.stats ? state.stats.code_lengths : [];
  const at = lengths.indexOf(state.bits);
  const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
  let next = null;
  if (event.key in moves) next = (at + moves[event.key] + lengths.length) % lengths.length;
  else if (event.key === "Home") next = 0;
  else if (event.key === "End") next = lengths.length - 1;
  if (next === null || at < 0) return;
  event.preventDefault();
  setBits(lengths[next]);
  $("bits").querySelector(`[data-bits='${lengths[next]}']`).focus();
}

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
    if (file) setQueryFile(file); else showError("Drop an image file (JPEG, PNG, WebP, …).");
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData || {}).files || []].find((f) => f.type.startsWith("image/"));
    if (file) setQueryFile(file);
  });
  $("query-image").addEventListener("error", () => { // no broken-image icon over the hint
    $("query-image").hidden = true;
    $("drop-hint").hidden = false;
  });
  $("random-button").addEventListener("click", async () => {
    clearError();
    try {
      const item = await api("/items/random");
      setQueryItem(item.id, item.label, item.image_url);
    } catch (error) { showError(error.message); }
  });
  $("bits").addEventListener("keydown", bitsKeys);
  $("k-select").addEventListener("change", (event) => {
    state.k = Number(event.target.value);
    newRanking();
  });
  $("label-select").addEventListener("change", (event) => {
    state.labelChoice = event.target.value;
    showQueryLabel();
    relabel();
  });
  $("include-query").addEventListener("change", (event) => {
    state.includeQuery = event.target.checked;
    if (state.query && state.query.kind === "id") newRanking();
  });
  for (const radio of document.querySelectorAll("input[name='filter-match']")) {
    radio.addEventListener("change", filterChanged);
  }
  $("filter-clear").addEventListener("click", () => {
    for (const box of $("filter-labels").querySelectorAll("input:checked")) box.checked = false;
    filterChanged();
  });
  $("error-close").addEventListener("click", clearError);
  $("more-button").addEventListener("click", () => search(true));
  if (window.matchMedia("(max-width: 820px)").matches) { // phones: results first
    $("options").open = false;
    $("notice").open = false;
  }
}

async function start() {
  wire();
  try {
    await loadStats();
  } catch (error) {
    $("facts").textContent = "service unreachable";
    showError(error.message);
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
    } catch (error) { showError(error.message); }
  }
}

start();
