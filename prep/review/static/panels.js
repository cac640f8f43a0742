// sdprep review: the re-captioning and rules panels, each a per-image diff before Apply.
// Loaded after app.js, whose helpers (call, url, say, fail, chip, state...) it uses.
"use strict";

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
    li.title = (c.old === null ? "(no caption)" : c.old) + "\n\u2192 " + c.new;
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
