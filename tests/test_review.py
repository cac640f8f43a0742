"""`sdprep review` without a browser: the editor's journalled writes, the server's token, address
and lock rules, and Ctrl-C. The page itself is driven in a real chromium in test_review_browser.py."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from review_support import Server, tree

from sdprep.dataset import Item, read_sidecar, sdprep_meta, split_tags
from sdprep.errors import DatasetError, JournalError
from sdprep.fileops import undo
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.review.edits import Editor, Recaption
from sdprep.prep.review.index import Filter, Index
from sdprep.prep.rules import CleanRules
from sdprep.prep.tag import TagOptions, run_tag
from sdprep.taggers.rules import CaptionRules, caption_from_scores


@pytest.fixture
def dataset(review_dataset: Path) -> Path:
    return review_dataset


def editor(root: Path) -> Editor:
    index = Index(root, recursive=False)
    index.scan()
    return Editor(index)


def test_index_reads_captions_masks_labels_and_the_reports_problems(dataset):
    index = Index(dataset, recursive=False)
    index.scan()
    assert len(index.entries) == 12
    tiny = index.get("g_tiny.png")
    assert any(p.startswith("small for SDXL") for p in tiny.problems)
    assert [e.rel for e in index.query(Filter(mask=True))] == ["b_portrait.png", "extra_01.png"]
    assert {e.rel for e in index.query(Filter(mono=True))} >= {"d_greyscale.png"}
    assert [e.rel for e in index.query(Filter(tag="light_blue_eyes"))] == [
        f"extra_{i:02d}.png" for i in range(4)
    ]
    assert [e.rel for e in index.query(Filter(text="EXTRA_03"))] == ["extra_03.png"]
    counts = dict(index.tag_counts(index.query(Filter())))
    assert counts["nazuna"] == 12 and counts["light blue eyes"] == 4  # the trigger clean placed
    from PIL import Image

    Image.new("L", (832, 640), 0).save(dataset / "masks" / "extra_01.png")
    index.refresh(["extra_01.png"])
    assert "mask is empty (all black)" in index.get("extra_01.png").problems


def test_every_edit_is_one_journalled_step_and_undo_restores_the_tree(dataset):
    before = tree(dataset)
    ed = editor(dataset)
    ed.set_caption("a_landscape.jpg", "mytoken, solo,\nsmile")
    assert (dataset / "a_landscape.txt").read_text() == "mytoken, solo, smile\n"
    # `captions remove` semantics: whole tags, "blue eyes" leaves "light blue eyes"
    having = [p for p in dataset.glob("*.txt") if "blue eyes" in split_tags(p.read_text())]
    assert 0 < len(having) < 12
    assert ed.edit_tags("remove", "blue eyes") == len(having)
    assert "light blue eyes" in (dataset / "extra_00.txt").read_text()
    assert "blue eyes" not in (dataset / "c_square.txt").read_text()
    assert ed.edit_tags("rename", "light blue eyes", "cyan eyes", ["extra_00.png"]) == 1
    assert (dataset / "extra_00.txt").read_text().startswith("nazuna, 1girl, solo, cyan eyes, outdoors, ")
    assert "light blue eyes" in (dataset / "extra_02.txt").read_text()  # not selected
    assert ed.edit_tags("add", "approved", rels=["extra_02.png", "extra_03.png"]) == 2
    assert (dataset / "extra_02.txt").read_text().endswith(", approved\n")
    assert ed.exclude(["extra_01.png"]) == 1
    assert not (dataset / "extra_01.png").exists() and not (dataset / "masks" / "extra_01.png").exists()
    assert (dataset / "excluded" / "extra_01.png").exists() and (
        dataset / "excluded" / "masks" / "extra_01.png"
    ).exists()
    assert ed.index.get("extra_01.png") is None
    assert ed.last_operation() == "review exclude extra_01.png"
    for _ in range(5):
        ed.undo()
    assert tree(dataset) == before
    with pytest.raises(JournalError, match="nothing to undo"):
        ed.undo()


def test_recaption_writes_what_sdprep_tag_writes_from_the_same_scores(dataset, tmp_path, tiny_wd14):
    ed = editor(dataset)
    ed.set_caption("extra_03.png", "my own caption")  # a hand edit: tag appends onto it
    rules = CaptionRules(general_threshold=0.5, character_threshold=0.3)
    copy = Path(shutil.copytree(dataset, tmp_path / "copy"))
    opts = Recaption(general_threshold=0.5, character_threshold=0.3)
    preview = ed.recaption(opts)
    assert preview["without_scores"] == 0 and preview["count"] > 0 and not preview["applied"]
    assert tree(dataset) == tree(copy)  # a preview writes nothing
    ed.recaption(opts, apply=True)
    # `sdprep tag` with those thresholds (and the merge it recorded) on the copy: the same bytes
    result = run_tag(copy, TagOptions(model=str(tiny_wd14), rules=rules, merge="append"))
    assert result.details["inferred"] == 0
    captions = {k: v for k, v in tree(dataset).items() if k.endswith(".txt")}
    assert captions == {k: v for k, v in tree(copy).items() if k.endswith(".txt")}
    assert captions["extra_03.txt"].startswith(b"my own caption, ")
    assert ed.recaption(opts)["count"] == 0  # applied: nothing left to change
    # the tags alone: the one score rule (taggers/rules.py)
    ed.recaption(Recaption(general_threshold=0.7, merge="replace"), apply=True)
    for item in (Item(p) for p in sorted(dataset.glob("*.*")) if p.suffix in (".png", ".jpg", ".webp")):
        record = sdprep_meta(read_sidecar(item))["wd14"]
        want = caption_from_scores(record, CaptionRules(general_threshold=0.7))
        assert item.caption_path.read_text() == want + "\n", item.name
    appended = ed.recaption(Recaption(general_threshold=0.2, merge="append"))
    assert appended["count"] > 0 and all(not c["removed"] and c["added"] for c in appended["changes"])


def test_rules_preview_is_clean_dry_run_and_apply_is_clean(dataset, tmp_path):
    ed = editor(dataset)
    text = 'trigger = ["nzn"]\nremove = ["pink hair"]\n[monochrome]\nenabled = false\n'
    before = tree(dataset)
    preview = ed.rules(text)
    assert tree(dataset) == before and preview["count"] == 12
    b = next(c for c in preview["changes"] if c["path"] == "b_portrait.png")
    assert "pink hair" in b["removed"] and b["new"].startswith("nzn, ")
    # the same as `sdprep clean` on a copy
    copy = Path(shutil.copytree(dataset, tmp_path / "copy"))
    run_clean(copy, CleanOptions(CleanRules(trigger=("nzn",), remove=("pink hair",), monochrome=_off())))
    applied = ed.rules(text, apply=True)
    assert applied["count"] == 12
    assert {k: v for k, v in tree(dataset).items() if k.endswith(".txt")} == {
        k: v for k, v in tree(copy).items() if k.endswith(".txt")
    }
    # a project file: its [stages.clean.rules] and [rules]
    project = (
        '[project]\ndataset = "x"\n[rules]\nremove = ["smile"]\n[stages.clean.rules]\ntrigger = ["nzn"]\n'
    )
    changes = ed.rules(project + "monochrome = { enabled = false }\n")["changes"]
    assert any("smile" in c["removed"] for c in changes)
    assert not any("smile" in split_tags(c["new"]) for c in changes)
    ed.undo()
    assert tree(dataset) == before


def _off():
    from sdprep.prep.monochrome import MonochromeSettings

    return MonochromeSettings(enabled=False)


def test_mask_is_saved_at_the_image_size_and_a_wrong_size_is_refused(dataset):

    from PIL import Image

    ed = editor(dataset)
    painted = Image.new("RGB", (768, 512), (0, 0, 0))
    painted.paste((255, 255, 255), (100, 100, 300, 300))
    buf = io.BytesIO()
    painted.save(buf, "PNG")
    path = ed.save_mask("a_landscape.jpg", buf.getvalue())
    assert path == dataset / "masks" / "a_landscape.png"
    with Image.open(path) as m:
        assert (
            m.mode == "L"
            and m.size == (768, 512)
            and m.getpixel((150, 150)) == 255
            and m.getpixel((10, 10)) == 0
        )
    assert ed.index.get("a_landscape.jpg").mask
    small = io.BytesIO()
    Image.new("L", (10, 10)).save(small, "PNG")
    with pytest.raises(DatasetError, match="the painted mask is 10x10, the image 768x512"):
        ed.save_mask("a_landscape.jpg", small.getvalue())
    with pytest.raises(DatasetError, match="not a PNG"):
        ed.save_mask("a_landscape.jpg", b"nonsense")
    ed.undo()
    assert not path.exists() and ed.index.get("a_landscape.jpg").mask is False


# -- the server -----------------------------------------------------------------------------------


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from sdprep.lock import dataset_lock
    with dataset_lock(sys.argv[1], "clean"):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def _hold_lock(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(10)


def test_token_host_header_lock_per_write_and_ctrl_c(dataset):
    with Server(dataset) as server:
        assert server.host == "127.0.0.1"
        for path in ("/", "/api/items", "/static/app.js", "/thumb?path=a_landscape.jpg"):
            status, body = server.api(path, token=False)
            assert status == 403 and "token" in body, path
        assert server.api("/api/items?token=wrong", token=False)[0] == 403
        status, page = server.api("/")
        assert status == 200 and f"/static/app.js?token={server.token}" in page
        status, items = server.api("/api/items?limit=5")
        assert status == 200 and items["total"] == 12 and len(items["items"]) == 5
        # a page on another origin that resolves to 127.0.0.1 (DNS rebinding) names another Host
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", f"/api/items?token={server.token}", headers={"Host": "attacker.example"})
        assert conn.getresponse().status == 403
        # the lock is held per write only: a command may run meanwhile, and the page's write waits
        holder = _hold_lock(dataset)
        try:
            status, err = server.api("/api/caption", {"path": "a_landscape.jpg", "caption": "x"})
            assert status == 409 and "is being changed by another sdprep command" in err["error"]
            assert (dataset / "a_landscape.txt").read_text() != "x\n"
        finally:
            _release(holder)
        status, saved = server.api("/api/caption", {"path": "a_landscape.jpg", "caption": "x"})
        assert (
            status == 200 and saved["caption"] == "x" and (dataset / "a_landscape.txt").read_text() == "x\n"
        )
        assert server.api("/api/caption", {"path": "../etc/passwd", "caption": "x"})[0] == 400
        status, err = server.api("/api/recaption", {"general_threshold": "high"})
        assert status == 400 and err["error"] == "recaption.general_threshold: expected a number, got 'high'"
        code, output = server.stop()
    assert code == 0 and output.rstrip().endswith("review: stopped")
    # and `sdprep undo` reverses what the page wrote
    assert undo(dataset)[0].startswith("review caption a_landscape.jpg")


def test_refuses_to_start_while_another_command_holds_the_dataset(dataset):
    holder = _hold_lock(dataset)
    try:
        res = subprocess.run(
            [str(Path(sys.executable).with_name("sdprep")), "review", str(dataset), "--no-browser"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        _release(holder)
    assert res.returncode == 1
    assert "is being changed by another sdprep command (pid" in res.stdout + res.stderr


def _outside_address() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_not_reachable_on_other_addresses_unless_host_is_given(dataset):
    ip = _outside_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to try")
    with Server(dataset) as server:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ip, server.port), timeout=5).close()
        assert server.api("/api/status")[0] == 200
    with Server(dataset, "--host", "0.0.0.0") as server:
        assert any("anyone who can reach it" in line for line in server.output)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://{ip}:{server.port}/api/status", timeout=10)
        assert exc.value.code == 403  # reachable, but only with the token
        with urllib.request.urlopen(
            f"http://{ip}:{server.port}/api/status?token={server.token}", timeout=10
        ) as r:
            assert json.loads(r.read())["images"] == 12


def test_opens_the_page_in_the_users_browser_unless_told_not_to(dataset, tmp_path):
    seen = tmp_path / "opened.txt"
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\necho "$1" >> {seen}\n')
    opener.chmod(0o755)
    with Server(dataset, browser=f"{opener} %s") as server:
        wait = 0.0
        while not seen.exists() and wait < 15:
            time.sleep(0.1)
            wait += 0.1
        assert seen.read_text().split() == [server.url]
    seen.unlink()
    with Server(dataset) as server:  # --no-browser
        time.sleep(1)
        assert server.api("/api/status")[0] == 200
    assert not seen.exists()


def test_recursive_dataset_subfolder_images_masks_and_exclusion(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for folder in ("10_nazuna", "5_other"):
        (root / folder).mkdir(parents=True)
        Image.new("RGB", (1024, 1024), (200, 30, 30)).save(root / folder / "001.png")
        (root / folder / "001.txt").write_text("nazuna, solo\n")
    before = tree(root)
    index = Index(root, recursive=True)
    index.scan()
    assert sorted(index.entries) == ["10_nazuna/001.png", "5_other/001.png"]
    ed = Editor(index)
    buf = io.BytesIO()
    Image.new("L", (1024, 1024), 255).save(buf, "PNG")
    assert ed.save_mask("5_other/001.png", buf.getvalue()) == root / "5_other" / "masks" / "001.png"
    assert ed.exclude(["5_other/001.png"]) == 1
    assert (root / "excluded" / "5_other" / "001.png").exists()
    assert (root / "excluded" / "5_other" / "masks" / "001.png").exists()
    index.scan()
    assert sorted(index.entries) == ["10_nazuna/001.png"]  # excluded/ is not read as images
    ed.undo()
    ed.undo()
    assert tree(root) == before
