"""Take the README's screenshots of `sdprep review` with the real page in headless chromium.

Builds the 12-image review dataset the tests use (the sample images captioned by clean and the tiny
demo WD14 model, two masks), runs `sdprep review` on it and saves:
  docs/review-grid.png       the grid (two images selected, the tag list, the filters)
  docs/review-detail.png     the detail view of an image with its mask overlay, scores and crop
  docs/review-recaption.png  re-captioning from stored scores: the per-image diff of a threshold

    .venv/bin/python docs/make_review_screenshots.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "tests"))

from review_support import Server, browser_problem, chromium, make_review_dataset  # noqa: E402


def main() -> None:
    problem = browser_problem()
    if problem:
        raise SystemExit(f"cannot take screenshots: {problem}")
    from sdprep.taggers.tiny import build_tiny_wd14

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_wd14(Path(tmp) / "wd14")
        root = make_review_dataset(Path(tmp) / "nazuna", model)
        with Server(root) as server, chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(server.url)
            page.wait_for_function(
                "[...document.querySelectorAll('.cell img')].length === 12 &&"
                " [...document.querySelectorAll('.cell img')].every(i => i.complete && i.naturalWidth)"
            )
            page.click('.cell[data-path="c_square.webp"] .thumb')
            page.click('.cell[data-path="e_sepia.jpg"] .thumb', modifiers=["Control"])
            page.fill("#bulk-tag", "smile")
            page.wait_for_timeout(300)
            page.screenshot(path=str(DOCS / "review-grid.png"))

            page.dblclick('.cell[data-path="b_portrait.png"] .thumb')
            page.wait_for_function("document.getElementById('paint').width === 512")
            page.wait_for_timeout(500)
            page.screenshot(path=str(DOCS / "review-detail.png"))
            page.keyboard.press("Escape")

            page.click("#btn-recaption")
            page.locator("#rc-general").fill("0.55")
            page.wait_for_function("!document.getElementById('rc-apply').disabled")
            page.wait_for_timeout(300)
            page.screenshot(path=str(DOCS / "review-recaption.png"))
    for name in ("review-grid.png", "review-detail.png", "review-recaption.png"):
        print(f"wrote docs/{name} ({(DOCS / name).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
