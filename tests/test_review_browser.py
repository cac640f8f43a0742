"""The review page in a real headless chromium (Debian's, driven by Playwright) against the real
`sdprep review` command: what a person does with the mouse and keyboard reaches the files, and
Undo takes the dataset back byte for byte."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from review_support import Server, browser_problem, chromium, tree

from sdprep.dataset import split_tags
from sdprep.prep.tag import TagOptions, run_tag
from sdprep.taggers.rules import CaptionRules, caption_from_scores

PROBLEM = browser_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


@pytest.fixture
def dataset(review_dataset: Path) -> Path:
    return review_dataset


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, errors


def wait_until(check: Callable[[], object], what: str, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status_says(page, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)", arg=text, timeout=15000
    )


def caption(root: Path, stem: str) -> str:
    return (root / f"{stem}.txt").read_text()


def scores(root: Path, image: str) -> dict:
    return json.loads((root / f"{image}.json").read_text())["sdprep"]["wd14"]


def test_edit_bulk_remove_recaption_paint_then_undo_everything(dataset, page, tiny_wd14):
    before = tree(dataset)
    with Server(dataset) as server:
        page.goto(server.url)
        page.wait_for_selector(".cell img")
        assert page.locator("#count").inner_text() == "12 images"
        assert page.locator(".cell").count() == 12

        # a caption is an editable field: Enter saves it
        field = page.locator('.cell[data-path="a_landscape.jpg"] input.caption')
        field.fill("mytoken, solo, smile")
        field.press("Enter")
        wait_until(lambda: caption(dataset, "a_landscape") == "mytoken, solo, smile\n", "the caption file")
        # ... and so does leaving it
        field = page.locator('.cell[data-path="b_portrait.png"] input.caption')
        field.fill("mytoken, portrait")
        page.locator("#search").click()
        wait_until(lambda: caption(dataset, "b_portrait") == "mytoken, portrait\n", "the caption on blur")

        # bulk: remove a tag from every image that has it (whole tags: "light blue eyes" stays)
        page.fill("#bulk-tag", "blue eyes")
        page.select_option("#bulk-scope", "all")
        page.click("#bulk-remove")
        status_says(page, 'remove "blue eyes"')
        texts = {p.name: p.read_text() for p in dataset.glob("*.txt")}
        assert not any("blue eyes" in split_tags(t) for t in texts.values())
        assert all("light blue eyes" in texts[f"extra_{i:02d}.txt"] for i in range(4))

        # the threshold slider: a live preview with a per-image diff, then apply
        page.click("#btn-recaption")
        page.wait_for_function("document.getElementById('rc-summary').textContent.includes('would change')")
        page.locator("#rc-general").fill("0.6")
        page.wait_for_function("document.getElementById('rc-general-value').textContent === '0.60'")
        page.wait_for_function("!document.getElementById('rc-apply').disabled")
        would = int(page.locator("#rc-summary").inner_text().split()[0])
        assert 0 < would == page.locator("#rc-changes li").count()
        assert page.locator("#rc-changes .chip.removed").count() > 0
        copy = Path(
            shutil.copytree(dataset, dataset.parent / "copy", ignore=shutil.ignore_patterns(".sdprep"))
        )
        assert tree(copy) == tree(dataset)  # nothing written by the preview
        page.click("#rc-apply")
        status_says(page, f"re-captioned {would} image")
        # what `sdprep tag` writes with that threshold (tag's recorded merge: append)
        run_tag(
            copy, TagOptions(model=str(tiny_wd14), rules=CaptionRules(general_threshold=0.6), merge="append")
        )
        assert {k: v for k, v in tree(dataset).items() if k.endswith(".txt")} == {
            k: v for k, v in tree(copy).items() if k.endswith(".txt")
        }
        page.select_option("#rc-merge", "replace")  # the tags alone: the one score rule
        c_square = page.locator('#rc-changes li[data-path="c_square.webp"]')
        c_square.locator(".chip.removed").get_by_text("nazuna", exact=True).wait_for()  # the trigger goes
        want = caption_from_scores(scores(dataset, "c_square.webp"), CaptionRules(general_threshold=0.6))
        assert set(c_square.locator(".chip.added").all_inner_texts()) <= set(want.split(", "))
        assert "nazuna" not in want.split(", ")
        page.click("#panel-recaption button.close")

        # paint on a mask in the detail view, save it: masks/<stem>.png at the image's size
        page.dblclick('.cell[data-path="a_landscape.jpg"] .thumb')
        page.wait_for_function(
            "document.getElementById('paint').width === 768 && document.getElementById('full').complete"
        )
        page.locator("#m-size").fill("60")
        box = page.locator("#paint").bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.3, y)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * k), y)
        page.mouse.up()
        page.click("#m-save")
        status_says(page, "saved masks/a_landscape.png (768 x 512)")
        with Image.open(dataset / "masks" / "a_landscape.png") as m:
            assert m.mode == "L" and m.size == (768, 512)
            assert m.getpixel((384, 256)) == 255 and m.getpixel((10, 10)) == 0 and m.getpixel((384, 20)) == 0
        page.keyboard.press("Escape")

        # Undo, one step per change, back to the dataset as it was
        for _ in range(5):
            page.click("#btn-undo")
            status_says(page, "undone: review")
            page.evaluate("document.getElementById('status').textContent = ''")
        page.wait_for_function("document.getElementById('btn-undo').disabled")
        assert tree(dataset) == before


def test_keyboard_filters_exclude_and_rules_preview(dataset, page):
    before = tree(dataset)
    with Server(dataset) as server:
        page.goto(server.url)
        page.wait_for_selector(".cell img")
        cols = page.evaluate("state.cols")
        assert cols > 1
        page.locator("#grid").focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowDown")
        focused = page.locator(".cell.focus")
        assert focused.get_attribute("data-index") == str(1 + cols)
        page.keyboard.press("Space")
        assert page.locator(".cell.selected").count() == 1
        assert page.locator("#sel-count").inner_text() == "1 selected"
        name = focused.get_attribute("data-path")
        page.keyboard.press("Enter")
        page.wait_for_selector("#detail:not([hidden])")
        assert page.locator("#d-name").inner_text() == name
        page.keyboard.press("ArrowRight")
        page.wait_for_function("n => document.getElementById('d-name').textContent !== n", arg=name)
        assert page.locator("#d-facts").inner_text().count("bucket") == 1
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail", state="hidden")

        # filters: a tag (with its count), has mask, text
        item = page.locator('#tag-list li[data-tag="light blue eyes"]')
        assert item.locator("b").inner_text() == "4"
        item.click()
        page.wait_for_function("document.getElementById('count').textContent === '4 images'")
        page.locator('#tag-list li[data-tag="light blue eyes"]').click()
        page.wait_for_function("document.getElementById('count').textContent === '12 images'")
        page.check("#f-mask")
        page.wait_for_function("document.getElementById('count').textContent === '2 images'")
        page.uncheck("#f-mask")
        page.wait_for_function("document.getElementById('count').textContent === '12 images'")
        page.check("#f-problems")
        page.wait_for_function("document.getElementById('count').textContent !== '12 images'")
        page.wait_for_selector('.cell[data-path="g_tiny.png"]')
        shown = page.locator(".cell").evaluate_all("cs => cs.map(c => c.dataset.path)")
        assert "g_tiny.png" in shown and len(shown) < 12
        page.uncheck("#f-problems")
        page.fill("#search", "extra")
        page.wait_for_function("document.getElementById('count').textContent === '4 images'")

        # exclude with the keyboard: moved aside with its companions
        page.locator("#grid").focus()
        page.keyboard.press("x")
        status_says(page, "1 image moved to excluded/")
        assert (dataset / "excluded" / "extra_00.png").exists() and not (dataset / "extra_00.png").exists()
        page.wait_for_function("document.getElementById('count').textContent === '3 images'")

        # a rules file: per-image diff first, then apply
        page.click("#btn-rules")
        page.fill("#ru-text", 'remove = ["smile", "1girl"]\n[monochrome]\nenabled = false\n')
        page.click("#ru-preview")
        page.wait_for_function("document.getElementById('ru-summary').textContent.includes('would change')")
        assert page.locator("#ru-changes .chip.removed", has_text="1girl").count() > 0
        assert all("1girl" in split_tags(p.read_text()) for p in dataset.glob("extra_0[123].txt"))
        page.click("#ru-apply")
        status_says(page, "clean rules applied")
        assert not any("1girl" in split_tags(p.read_text()) for p in dataset.glob("*.txt"))
        page.click("#panel-rules button.close")
        page.click("#btn-undo")
        status_says(page, "undone: clean")
    # the exclusion is undone by the command line, as any sdprep change
    res = subprocess.run(
        [str(Path(sys.executable).with_name("sdprep")), "undo", str(dataset)], capture_output=True
    )
    assert res.returncode == 0, res.stderr
    assert tree(dataset) == before


def test_thumbnails_are_cached_in_sdprep_state(dataset, page):
    with Server(dataset) as server:
        page.goto(server.url)
        # all 12 cells, each image loaded ([].every is true before the grid renders)
        page.wait_for_function(
            "(() => { const imgs = [...document.querySelectorAll('.cell img')];"
            " return imgs.length === 12 && imgs.every(i => i.complete && i.naturalWidth); })()"
        )
        cached = sorted((dataset / ".sdprep" / "thumbs").glob("*.jpg"))
        assert len(cached) == 12
        with Image.open(io.BytesIO(cached[0].read_bytes())) as im:
            assert max(im.size) <= 256


def test_a_late_detail_answer_does_not_replace_the_newer_image(dataset, page):
    """Two quick ArrowRight presses answered out of order: the view keeps the newer image's info."""
    from urllib.parse import quote

    with Server(dataset) as server:
        page.goto(server.url)
        page.wait_for_selector(".cell img")
        page.locator("#grid").focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#detail:not([hidden])")
        first, second = page.evaluate("[entryAt(1).path, entryAt(2).path]")
        held = []

        def hold_first(route) -> None:
            if f"path={quote(first)}" in route.request.url:
                held.append(route)
            else:
                route.continue_()

        page.route("**/api/item?*", hold_first)
        page.keyboard.press("ArrowRight")
        for _ in range(300):  # (Playwright runs the route handler only while the test calls it)
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the first request was never made"
        page.keyboard.press("ArrowRight")
        page.wait_for_function("n => document.getElementById('d-name').textContent === n", arg=second)
        with page.expect_response(lambda r: f"path={quote(first)}" in r.url):
            held[0].continue_()
        page.evaluate("() => call('/api/status')")  # a later round trip: the late answer is handled
        assert page.locator("#d-name").inner_text() == second
        assert page.evaluate("[state.detail.index, state.focus, state.detail.info.path]") == [2, 2, second]
        expected = page.evaluate("p => call('/api/item', { params: { path: p } })", second)["caption"]
        assert page.locator("#d-caption").input_value() == expected
