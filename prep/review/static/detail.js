// sdprep review: the detail view (full image, facts, stored scores, bucket crop) and the mask
// brush. Loaded after app.js, whose helpers (call, url, say, fail, chip, state...) it uses.
"use strict";

// -- the detail view --------------------------------------------------------------------------

const paint = $("paint");
const pctx = paint.getContext("2d", { willReadFrequently: true });
const mask = { dirty: false, exists: false, started: false, drawing: false, last: null };
// Which detail view is current: each open and close takes a new number, and an answer for an
// older one (two quick ArrowRight presses answered out of order) is dropped.
let detailSeq = 0;
let maskSeq = 0;

async function openDetail(i) {
  if (mask.dirty && !confirm("Discard the unsaved mask?")) return;
  setFocus(i);
  const index = state.focus;
  const entry = entryAt(index);
  if (!entry) return;
  const seq = ++detailSeq;
  let info;
  try {
    info = await call("/api/item", { params: { path: entry.path } });
  } catch (err) {
    if (seq === detailSeq) fail(err);
    return;
  }
  if (seq !== detailSeq) return; // another image was opened meanwhile (or the view closed)
  state.detail = { index, info };
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
  detailSeq++;
  maskSeq++;
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
  const seq = ++maskSeq;
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
    if (seq !== maskSeq) return; // another image's mask is being shown now
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
