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
    if (gen === state.generation) fail(err);
  } finally {
    // after a reload, p may be loading again for the new generation: that request is not ours
    if (gen === state.generation) state.loading.delete(p);
  }
}

function reload() {
  // the filter or the dataset changed: forget every page, fetch what is in view
  state.generation++;
  state.pages.clear();
  state.loading.clear();
  for (const cell of state.cells.values()) cell.remove();
  state.cells.clear();
  const gen = state.generation;
  return call("/api/items", { params: { ...filterParams(), offset: 0, limit: PAGE } }).then((data) => {
    if (gen !== state.generation) return; // a newer filter's answer is (or will be) shown instead
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
