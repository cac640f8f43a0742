// sdprep review: the page. Plain JavaScript, no library, nothing loaded from the network.
// The grid is virtual: only the rows in view exist in the DOM and only a few pages of entries are
// kept, so memory stays flat however far one scrolls through thousands of images.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const PAGE = 120; // entries per request
const KEEP_PAGES = 8; // pages kept around the view
const $ = (id) => document.getElementById(id);

const state = {
  total: 0,
  pages: new Map(), // page number -> entries
  loading: new Set(),
  generation: 0, // bumped when the filter or the data changes: late answers are dropped
  cells: new Map(), // index -> element
  cols: 1,
  cellW: 210,
  cellH: 336,
  focus: 0,
  anchor: 0,
  selected: new Set(),
  filter: { tag: "", q: "", mask: false, mono: false, problems: false },
  detail: null, // { index, entry, info }
};

// -- requests ---------------------------------------------------------------------------------

function url(path, params = {}) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "" && v !== false) u.searchParams.set(k, v === true ? "1" : v);
  }
  u.searchParams.set("token", TOKEN);
  return u.pathname + u.search;
}

async function call(path, { params = {}, body = null, raw = null, type = "application/json" } = {}) {
  const opts = body !== null || raw !== null
    ? { method: "POST", headers: { "Content-Type": type }, body: raw !== null ? raw : JSON.stringify(body) }
    : {};
  const res = await fetch(url(path, params), opts);
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (!res.ok) {
    const err = new Error(data.error || res.statusText);
    err.hint = data.hint;
    throw err;
  }
  return data;
}

let statusTimer = null;
function say(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.className = "show" + (error ? " error" : "");
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => (el.className = ""), error ? 9000 : 3000);
}

function fail(err) {
  say(err.message + (err.hint ? "\n" + err.hint : ""), true);
}

function filterParams() {
  const f = state.filter;
  return { tag: f.tag, q: f.q, mask: f.mask, mono: f.mono, problems: f.problems };
}

// -- data -------------------------------------------------------------------------------------

function entryAt(i) {
  const page = state.pages.get(Math.floor(i / PAGE));
  return page ? page[i % PAGE] : undefined;
}

async function loadPage(p) {
  if (state.pages.has(p) || state.loading.has(p)) return;
  const gen = state.generation;
  state.loading.add(p);
  try {
    const data = await call("/api/items", { params: { ...filterParams(), offset: p * PAGE, limit: PAGE } });
    if (gen !== state.generation) return;
    state.total = data.total;
    state.pages.set(p, data.items);
    render();
  } catch (err) {
    fail(err);
  } finally {
    state.loading.delete(p);
  }
}

function reload() {
  // the filter or the dataset changed: forget every page, fetch what is in view
  state.generation++;
  state.pages.clear();
  state.loading.clear();
  for (const cell of state.cells.values()) cell.remove();
  state.cells.clear();
  return call("/api/items", { params: { ...filterParams(), offset: 0, limit: PAGE } }).then((data) => {
    state.total = data.total;
    state.pages.set(0, data.items);
    state.focus = Math.min(state.focus, Math.max(0, state.total - 1));
    $("count").textContent = `${data.total} image${data.total === 1 ? "" : "s"}`;
    render();
    loadTags();
    loadStatus();
  }).catch(fail);
}

function updateEntry(entry) {
  // a changed image: replace its entry in the cached pages and redraw its cell
  for (const items of state.pages.values()) {
    const k = items.findIndex((e) => e.path === entry.path);
    if (k >= 0) items[k] = entry;
  }
  for (const [i, cell] of state.cells) {
    if (cell.dataset.path === entry.path) {
      cell.remove();
      state.cells.delete(i);
    }
  }
  render();
  loadTags();
  loadStatus();
}

// -- the grid ---------------------------------------------------------------------------------

const grid = $("grid");
const spacer = $("spacer");

function measure() {
  const css = getComputedStyle(document.documentElement);
  state.cellW = parseInt(css.getPropertyValue("--cell-w"), 10) || 210;
  state.cellH = parseInt(css.getPropertyValue("--cell-h"), 10) || 336;
  state.cols = Math.max(1, Math.floor((grid.clientWidth - 10) / state.cellW));
}

function render() {
  measure();
  const rows = Math.ceil(state.total / state.cols);
  spacer.style.height = rows * state.cellH + 10 + "px";
  const top = grid.scrollTop;
  const first = Math.max(0, Math.floor(top / state.cellH) - 1);
  const last = Math.min(rows - 1, Math.ceil((top + grid.clientHeight) / state.cellH) + 1);
  const from = first * state.cols;
  const to = Math.min(state.total, (last + 1) * state.cols);
  for (const [i, cell] of state.cells) {
    if (i < from || i >= to) {
      if (cell.contains(document.activeElement)) continue; // keep a caption being edited
      cell.remove();
      state.cells.delete(i);
    }
  }
  for (let i = from; i < to; i++) {
    const entry = entryAt(i);
    if (entry === undefined) {
      loadPage(Math.floor(i / PAGE));
      continue;
    }
    let cell = state.cells.get(i);
    if (cell && cell.dataset.path !== entry.path) {
      cell.remove();
      cell = undefined;
    }
    if (!cell) {
      cell = makeCell(entry, i);
      state.cells.set(i, cell);
      spacer.appendChild(cell);
    }
    cell.style.left = 5 + (i % state.cols) * state.cellW + "px";
    cell.style.top = 5 + Math.floor(i / state.cols) * state.cellH + "px";
    cell.classList.toggle("focus", i === state.focus);
    cell.classList.toggle("selected", state.selected.has(entry.path));
  }
  // forget pages far from the view (memory stays flat while scrolling)
  const keepFrom = Math.floor(from / PAGE) - KEEP_PAGES / 2;
  const keepTo = Math.floor(to / PAGE) + KEEP_PAGES / 2;
  for (const p of [...state.pages.keys()]) if (p < keepFrom || p > keepTo) state.pages.delete(p);
  $("sel-count").textContent = `${state.selected.size} selected`;
}

function chip(tag, cls = "") {
  const el = document.createElement("span");
  el.className = "chip" + (cls ? " " + cls : "");
  el.textContent = tag;
  el.title = "show only images with this tag";
  el.addEventListener("click", (ev) => {
    ev.stopPropagation();
    setTag(tag);
  });
  return el;
}

function makeCell(entry, i) {
  const cell = document.createElement("div");
  cell.className = "cell";
  cell.dataset.path = entry.path;
  cell.dataset.index = i;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.alt = entry.name;
  img.decoding = "async";
  img.src = url("/thumb", { path: entry.path, v: entry.v });
  thumb.appendChild(img);
  thumb.addEventListener("click", (ev) => clickCell(i, entry, ev));
  thumb.addEventListener("dblclick", () => openDetail(i));
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = entry.name;
  name.title = entry.path;
  meta.appendChild(name);
  if (entry.mask) meta.appendChild(badge("mask", "mask"));
  if (entry.mono) meta.appendChild(badge(entry.mono, ""));
  if (entry.problems.length) {
    const b = badge(`${entry.problems.length} problem${entry.problems.length > 1 ? "s" : ""}`, "problem");
    b.title = entry.problems.join("\n");
    meta.appendChild(b);
  }
  const chips = document.createElement("div");
  chips.className = "chips";
  for (const t of entry.tags) chips.appendChild(chip(t));
  const input = captionInput(entry);
  cell.append(thumb, meta, chips, input);
  return cell;
}

function badge(text, cls) {
  const b = document.createElement("span");
  b.className = "badge " + cls;
  b.textContent = text;
  return b;
}

function captionInput(entry, onSaved = updateEntry) {
  const input = document.createElement("input");
  input.className = "caption";
  input.value = entry.caption;
  input.spellcheck = false;
  input.setAttribute("aria-label", "caption of " + entry.name);
  wireCaption(input, () => entry, onSaved);
  return input;
}

function wireCaption(input, current, onSaved) {
  // Enter or leaving the field saves; Esc puts the saved text back
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      ev.preventDefault();
      input.blur();
    } else if (ev.key === "Escape") {
      input.value = current().caption;
      input.blur();
    }
    ev.stopPropagation();
  });
  input.addEventListener("blur", () => saveCaption(input, current(), onSaved));
}

async function saveCaption(input, entry, onSaved) {
  if (!entry || input.value === entry.caption) return;
  input.classList.add("saving");
  try {
    const saved = await call("/api/caption", { body: { path: entry.path, caption: input.value } });
    entry.caption = saved.caption;
    input.classList.replace("saving", "saved");
    say(`saved ${saved.name}`);
    onSaved(saved);
  } catch (err) {
    input.classList.remove("saving");
    fail(err);
  }
}

function clickCell(i, entry, ev) {
  if (ev.shiftKey) {
    selectRange(state.anchor, i);
  } else if (ev.ctrlKey || ev.metaKey) {
    toggle(entry.path);
    state.anchor = i;
  } else {
    state.selected = new Set([entry.path]);
    state.anchor = i;
  }
  setFocus(i);
}

function toggle(path) {
  if (state.selected.has(path)) state.selected.delete(path);
  else state.selected.add(path);
  render();
}

async function selectRange(a, b) {
  const data = await call("/api/paths", { params: filterParams() }).catch(fail);
  if (!data) return;
  const [lo, hi] = a < b ? [a, b] : [b, a];
  for (const p of data.paths.slice(lo, hi + 1)) state.selected.add(p);
  render();
}

function setFocus(i, scroll = true) {
  if (state.total === 0) return;
  state.focus = Math.max(0, Math.min(state.total - 1, i));
  if (scroll) {
    const row = Math.floor(state.focus / state.cols);
    const top = row * state.cellH;
    if (top < grid.scrollTop) grid.scrollTop = top;
    else if (top + state.cellH > grid.scrollTop + grid.clientHeight) {
      grid.scrollTop = top + state.cellH - grid.clientHeight + 10;
    }
  }
  render();
}

grid.addEventListener("scroll", () => requestAnimationFrame(render), { passive: true });
window.addEventListener("resize", () => requestAnimationFrame(render));

// -- tags and filters -------------------------------------------------------------------------

async function loadTags() {
  const data = await call("/api/tags", { params: filterParams() }).catch(fail);
  if (!data) return;
  const list = $("tag-list");
  const find = $("tag-search").value.trim().toLowerCase();
  list.replaceChildren();
  for (const [tag, n] of data.tags) {
    if (find && !tag.toLowerCase().includes(find)) continue;
    const li = document.createElement("li");
    li.dataset.tag = tag;
    li.className = tagKey(tag) === tagKey(state.filter.tag) ? "active" : "";
    const name = document.createElement("span");
    name.textContent = tag;
    const count = document.createElement("b");
    count.textContent = n;
    li.append(name, count);
    li.addEventListener("click", () => setTag(tagKey(tag) === tagKey(state.filter.tag) ? "" : tag));
    list.appendChild(li);
  }
  const active = $("tag-active");
  active.replaceChildren();
  if (state.filter.tag) {
    const c = chip(state.filter.tag + "  \u2715", "added");
    c.title = "show all images";
    c.onclick = () => setTag("");
    active.appendChild(c);
  }
}

function tagKey(tag) {
  return tag.replace(/\\([()])/g, "$1").replace(/_/g, " ").replace(/\s+/g, " ").trim().toLowerCase();
}

function setTag(tag) {
  state.filter.tag = tag;
  state.focus = 0;
  grid.scrollTop = 0;
  if (!$("detail").hidden) closeDetail();
  reload();
}

let searchTimer = null;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    state.filter.q = $("search").value.trim();
    state.focus = 0;
    grid.scrollTop = 0;
    reload();
  }, 200);
});
for (const [id, key] of [["f-mask", "mask"], ["f-mono", "mono"], ["f-problems", "problems"]]) {
  $(id).addEventListener("change", () => {
    state.filter[key] = $(id).checked;
    state.focus = 0;
    grid.scrollTop = 0;
    reload();
  });
}
$("tag-search").addEventListener("input", loadTags);

async function loadStatus() {
  const data = await call("/api/status").catch(() => null);
  if (!data) return;
  $("btn-undo").disabled = !data.last;
  $("btn-undo").title = data.last ? "undo: " + data.last : "nothing to undo";
}

// -- bulk edits -------------------------------------------------------------------------------

$("sel-all").onclick = async () => {
  const data = await call("/api/paths", { params: filterParams() }).catch(fail);
  if (!data) return;
  state.selected = new Set(data.paths);
  render();
};
$("sel-none").onclick = () => {
  state.selected.clear();
  render();
};

async function bulk(action) {
  const tag = $("bulk-tag").value.trim();
  const scope = $("bulk-scope").value;
  if (!tag) return say("name the tag first", true);
  if (scope === "selection" && state.selected.size === 0) return say("select images first (click, Space)", true);
  const body = { action, tag, new: $("bulk-new").value.trim(), paths: scope === "all" ? null : [...state.selected] };
  try {
    const data = await call("/api/tags", { body });
    say(`${action} "${tag}": ${data.changed} caption${data.changed === 1 ? "" : "s"} changed`);
    await reload();
  } catch (err) {
    fail(err);
  }
}
$("bulk-add").onclick = () => bulk("add");
$("bulk-remove").onclick = () => bulk("remove");
$("bulk-rename").onclick = () => bulk("rename");

async function exclude(paths) {
  if (!paths.length) return say("select images first (click, Space)", true);
  try {
    const data = await call("/api/exclude", { body: { paths } });
    for (const p of paths) state.selected.delete(p);
    say(`${data.moved} image${data.moved === 1 ? "" : "s"} moved to excluded/ (Undo brings them back)`);
    await reload();
  } catch (err) {
    fail(err);
  }
}
$("bulk-exclude").onclick = () => exclude([...state.selected]);

async function undo() {
  try {
    const data = await call("/api/undo", { body: {} });
    say(data.message);
    if (!$("detail").hidden) closeDetail();
    await reload();
  } catch (err) {
    fail(err);
  }
}
$("btn-undo").onclick = undo;

// -- the detail view --------------------------------------------------------------------------

const paint = $("paint");
const pctx = paint.getContext("2d", { willReadFrequently: true });
const mask = { dirty: false, exists: false, started: false, drawing: false, last: null };

async function openDetail(i) {
  if (mask.dirty && !confirm("Discard the unsaved mask?")) return;
  setFocus(i);
  const entry = entryAt(state.focus);
  if (!entry) return;
  let info;
  try {
    info = await call("/api/item", { params: { path: entry.path } });
  } catch (err) {
    return fail(err);
  }
  state.detail = { index: state.focus, info };
  $("detail").hidden = false;
  $("d-name").textContent = info.path;
  $("d-caption").value = info.caption;
  showChips(info);
  showFacts(info);
  const problems = $("d-problems");
  problems.replaceChildren(...info.problems.map((p) => Object.assign(document.createElement("li"), { textContent: p })));
  const body = $("d-scores").tBodies[0];
  body.replaceChildren();
  for (const [tag, score, cat] of info.scores) {
    const tr = document.createElement("tr");
    tr.className = cat;
    tr.innerHTML = "<td></td><td></td><td class=s></td>";
    tr.cells[0].textContent = tag;
    tr.cells[1].textContent = cat;
    tr.cells[2].textContent = score.toFixed(3);
    body.appendChild(tr);
  }
  $("d-scores").hidden = info.scores.length === 0;
  const img = $("full");
  img.onload = () => setupMask(info);
  img.src = url("/image", { path: info.path, v: info.v });
}

function showChips(info) {
  $("d-chips").replaceChildren(...info.tags.map((t) => chip(t)));
}

function showFacts(info) {
  const facts = [["size", info.size ? `${info.size[0]} x ${info.size[1]}` : "unreadable"]];
  if (info.bucket) {
    const b = info.bucket;
    facts.push(["bucket", b.dropped ? "dropped: " + b.dropped : `${b.size[0]} x ${b.size[1]}`]);
    facts.push(["resized", `${b.resized[0]} x ${b.resized[1]} (x${b.scale})`]);
    facts.push(["crop", b.crop.map((v) => Math.round(v)).join(", ")]);
  }
  facts.push(["mask", info.mask ? "masks/" + info.name.replace(/\.[^.]+$/, "") + ".png" : "none"]);
  if (info.monochrome) facts.push(["colour", info.monochrome.label || "?"]);
  if (info.model) facts.push(["WD14 model", info.model]);
  const r = Object.entries(info.rating || {}).sort((a, b) => b[1] - a[1])[0];
  if (r) facts.push(["rating", `${r[0]} (${r[1].toFixed(2)})`]);
  const dl = $("d-facts");
  dl.replaceChildren();
  for (const [k, v] of facts) {
    dl.append(Object.assign(document.createElement("dt"), { textContent: k }));
    dl.append(Object.assign(document.createElement("dd"), { textContent: v }));
  }
  const crop = $("crop");
  if (info.bucket && !info.bucket.dropped && info.size) {
    const [l, t, rr, bb] = info.bucket.crop;
    const [w, h] = info.size;
    Object.assign(crop.style, {
      display: "block", left: (l / w) * 100 + "%", top: (t / h) * 100 + "%",
      width: ((rr - l) / w) * 100 + "%", height: ((bb - t) / h) * 100 + "%",
    });
  } else {
    crop.style.display = "none";
  }
}

function closeDetail() {
  if (mask.dirty && !confirm("Discard the unsaved mask?")) return false;
  mask.dirty = false;
  $("detail").hidden = true;
  state.detail = null;
  $("full").removeAttribute("src");
  paint.width = paint.height = 1;
  grid.focus();
  return true;
}
$("d-close").onclick = closeDetail;
$("d-prev").onclick = () => openDetail(state.focus - 1);
$("d-next").onclick = () => openDetail(state.focus + 1);
$("d-exclude").onclick = async () => {
  const info = state.detail && state.detail.info;
  if (!info) return;
  mask.dirty = false;
  closeDetail();
  await exclude([info.path]);
};
wireCaption($("d-caption"), () => state.detail && state.detail.info, (saved) => {
  Object.assign(state.detail.info, saved);
  showChips(state.detail.info);
  updateEntry(saved);
});

// The mask is edited as a red layer over the image: opaque red where the mask is black (the loss
// ignores it), clear where it is white. Saving turns the layer back into a greyscale mask.
async function setupMask(info) {
  const [w, h] = info.size || [$("full").naturalWidth, $("full").naturalHeight];
  paint.width = w;
  paint.height = h;
  pctx.clearRect(0, 0, w, h);
  mask.dirty = false;
  mask.exists = info.mask;
  mask.started = info.mask;
  if (info.mask) {
    const m = new Image();
    m.src = url("/mask", { path: info.path, v: info.mv });
    await m.decode().catch(() => null);
    const tmp = document.createElement("canvas");
    tmp.width = w;
    tmp.height = h;
    const tctx = tmp.getContext("2d");
    tctx.drawImage(m, 0, 0, w, h);
    const data = tctx.getImageData(0, 0, w, h);
    const px = data.data;
    for (let k = 0; k < px.length; k += 4) {
      const a = 255 - px[k];
      px[k] = 220; px[k + 1] = 20; px[k + 2] = 20; px[k + 3] = a;
    }
    pctx.putImageData(data, 0, 0);
  }
  updateMaskButtons();
}

function updateMaskButtons() {
  $("m-save").disabled = !mask.dirty;
  $("m-revert").disabled = !mask.dirty;
}

function brushPoint(ev) {
  const r = paint.getBoundingClientRect();
  return [((ev.clientX - r.left) * paint.width) / r.width, ((ev.clientY - r.top) * paint.height) / r.height];
}

function stroke(from, to) {
  if (!mask.started) {
    // a new mask starts black (nothing trained) and the brush paints what is kept
    pctx.fillStyle = "rgb(220,20,20)";
    pctx.fillRect(0, 0, paint.width, paint.height);
    mask.started = true;
  }
  const erase = $("m-erase").checked;
  const scale = paint.width / paint.getBoundingClientRect().width;
  pctx.save();
  pctx.globalCompositeOperation = erase ? "source-over" : "destination-out";
  pctx.strokeStyle = pctx.fillStyle = "rgb(220,20,20)";
  pctx.lineCap = pctx.lineJoin = "round";
  pctx.lineWidth = Number($("m-size").value) * scale;
  pctx.beginPath();
  pctx.moveTo(from[0], from[1]);
  pctx.lineTo(to[0] + 0.01, to[1]);
  pctx.stroke();
  pctx.restore();
  mask.dirty = true;
  updateMaskButtons();
}

paint.addEventListener("pointerdown", (ev) => {
  if (paint.classList.contains("hidden")) return;
  paint.setPointerCapture(ev.pointerId);
  mask.drawing = true;
  mask.last = brushPoint(ev);
  stroke(mask.last, mask.last);
});
paint.addEventListener("pointermove", (ev) => {
  if (!mask.drawing) return;
  const p = brushPoint(ev);
  stroke(mask.last, p);
  mask.last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  paint.addEventListener(type, () => (mask.drawing = false));
}
$("m-size").addEventListener("input", () => ($("m-size-value").textContent = $("m-size").value));
$("m-show").addEventListener("change", () => paint.classList.toggle("hidden", !$("m-show").checked));
$("m-revert").onclick = () => state.detail && setupMask(state.detail.info);
$("m-save").onclick = async () => {
  const info = state.detail && state.detail.info;
  if (!info) return;
  const w = paint.width;
  const h = paint.height;
  const layer = pctx.getImageData(0, 0, w, h);
  const out = document.createElement("canvas");
  out.width = w;
  out.height = h;
  const octx = out.getContext("2d");
  const grey = octx.createImageData(w, h);
  for (let k = 0; k < layer.data.length; k += 4) {
    const v = 255 - layer.data[k + 3];
    grey.data[k] = grey.data[k + 1] = grey.data[k + 2] = v;
    grey.data[k + 3] = 255;
  }
  octx.putImageData(grey, 0, 0);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  try {
    const saved = await call("/api/mask", { params: { path: info.path }, raw: blob, type: "image/png" });
    mask.dirty = false;
    mask.exists = true;
    Object.assign(info, saved);
    updateMaskButtons();
    showFacts(info);
    say(`saved masks/${info.name.replace(/\.[^.]+$/, "")}.png (${w} x ${h})`);
    updateEntry(saved);
  } catch (err) {
    fail(err);
  }
};

// -- re-captioning from stored scores ---------------------------------------------------------

let rcTimer = null;
let rcSeq = 0;
function recaptionBody(apply) {
  return {
    general_threshold: Number($("rc-general").value),
    character_threshold: Number($("rc-character").value),
    mcut: $("rc-mcut").checked,
    merge: $("rc-merge").value,
    paths: $("rc-scope").value === "selection" ? [...state.selected] : null,
    apply,
  };
}

function showChanges(list, data) {
  list.replaceChildren();
  for (const c of data.changes) {
    const li = document.createElement("li");
    li.dataset.path = c.path;
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: c.path });
    li.appendChild(name);
    for (const t of c.removed) li.appendChild(chip(t, "removed"));
    for (const t of c.added) li.appendChild(chip(t, "added"));
    if (!c.removed.length && !c.added.length) li.appendChild(document.createTextNode(" (order)"));
    list.appendChild(li);
  }
  if (data.count > data.changes.length) {
    list.appendChild(Object.assign(document.createElement("li"), {
      textContent: `... and ${data.count - data.changes.length} more`,
    }));
  }
}

async function previewRecaption() {
  const seq = ++rcSeq;
  $("rc-general-value").textContent = Number($("rc-general").value).toFixed(2);
  $("rc-character-value").textContent = Number($("rc-character").value).toFixed(2);
  try {
    const data = await call("/api/recaption", { body: recaptionBody(false) });
    if (seq !== rcSeq) return;
    $("rc-summary").textContent = `${data.count} caption${data.count === 1 ? "" : "s"} would change` +
      (data.without_scores ? `; ${data.without_scores} images have no stored scores (run sdprep tag)` : "");
    $("rc-apply").disabled = data.count === 0;
    showChanges($("rc-changes"), data);
  } catch (err) {
    fail(err);
  }
}

function schedulePreview() {
  $("rc-apply").disabled = true;
  clearTimeout(rcTimer);
  rcTimer = setTimeout(previewRecaption, 150);
}
for (const id of ["rc-general", "rc-character"]) $(id).addEventListener("input", schedulePreview);
for (const id of ["rc-mcut", "rc-merge", "rc-scope"]) $(id).addEventListener("change", schedulePreview);
$("btn-recaption").onclick = () => {
  $("panel-recaption").hidden = false;
  previewRecaption();
};
$("rc-apply").onclick = async () => {
  $("rc-apply").disabled = true;
  try {
    const data = await call("/api/recaption", { body: recaptionBody(true) });
    say(`re-captioned ${data.count} image${data.count === 1 ? "" : "s"} (Undo reverts)`);
    await reload();
    previewRecaption();
  } catch (err) {
    fail(err);
  }
};

// -- rules preview ----------------------------------------------------------------------------

$("btn-rules").onclick = () => {
  $("panel-rules").hidden = false;
  $("ru-text").focus();
};
$("ru-file").addEventListener("change", async () => {
  const file = $("ru-file").files[0];
  if (file) $("ru-text").value = await file.text();
  $("ru-apply").disabled = true;
});
$("ru-text").addEventListener("input", () => ($("ru-apply").disabled = true));
async function runRules(apply) {
  $("ru-summary").textContent = apply ? "applying..." : "computing...";
  try {
    const data = await call("/api/rules", { body: { toml: $("ru-text").value, apply } });
    const verb = apply ? "changed" : "would change";
    $("ru-summary").textContent = `${data.count} caption${data.count === 1 ? "" : "s"} ${verb}` +
      (data.failed.length ? `; failed: ${data.failed.join("; ")}` : "");
    showChanges($("ru-changes"), data);
    $("ru-apply").disabled = apply || data.count === 0;
    if (apply) {
      say(`clean rules applied to ${data.count} captions (Undo reverts)`);
      await reload();
    }
  } catch (err) {
    $("ru-summary").textContent = "";
    fail(err);
  }
}
$("ru-preview").onclick = () => runRules(false);
$("ru-apply").onclick = () => runRules(true);

for (const panel of document.querySelectorAll(".panel")) {
  for (const b of panel.querySelectorAll("button.close")) b.onclick = () => (panel.hidden = true);
}
$("btn-help").onclick = () => ($("help").hidden = false);

// -- keyboard ---------------------------------------------------------------------------------

document.addEventListener("keydown", (ev) => {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  const panel = [...document.querySelectorAll(".panel")].find((p) => !p.hidden);
  if (ev.key === "Escape") {
    if (typing) return document.activeElement.blur();
    if (panel) return (panel.hidden = true);
    if (!$("detail").hidden) return closeDetail();
  }
  if (typing || panel) return;
  if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "z") {
    ev.preventDefault();
    return undo();
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const inDetail = !$("detail").hidden;
  const entry = entryAt(state.focus);
  const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -state.cols, ArrowDown: state.cols };
  if (ev.key in moves) {
    ev.preventDefault();
    if (inDetail) {
      if (ev.key === "ArrowLeft" || ev.key === "ArrowRight") openDetail(state.focus + moves[ev.key]);
      return;
    }
    setFocus(state.focus + moves[ev.key]);
  } else if (ev.key === " " && entry && !inDetail) {
    ev.preventDefault();
    toggle(entry.path);
    state.anchor = state.focus;
  } else if (ev.key === "Enter" && !inDetail) {
    ev.preventDefault();
    openDetail(state.focus);
  } else if (ev.key === "e") {
    ev.preventDefault();
    const input = inDetail ? $("d-caption") : state.cells.get(state.focus)?.querySelector("input.caption");
    if (input) input.focus();
  } else if (ev.key === "x" && entry) {
    ev.preventDefault();
    if (inDetail) $("d-exclude").click();
    else exclude([entry.path]);
  } else if (ev.key === "/") {
    ev.preventDefault();
    $("search").focus();
  } else if (ev.key === "?") {
    $("help").hidden = false;
  }
});

reload();
grid.focus();
