"""`make demo`: the whole pipeline on sample_data, offline, with tiny demo models (random weights).

Copies sample_data/images to demo_output/data (the originals are never touched), builds the tiny
demo tagger and tiny SDXL-architecture model under demo_output/models, then runs the stages that
exist. A real run passes real models; the demo's only show that the chain works end to end.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path("demo_output")


def main() -> int:
    t0 = time.time()
    src = REPO / "sample_data" / "images"
    data = OUT / "data"
    if data.exists():
        shutil.rmtree(data)
    shutil.copytree(src, data)
    models = OUT / "models"
    from sdprep.taggers.tiny import build_tiny_wd14

    build_tiny_wd14(models / "wd14-demo")
    from sdprep.train.tiny import build_tiny_sdxl

    build_tiny_sdxl(models / "sdxl-demo")
    from sdprep.dataset import discover
    from sdprep.images import image_size

    items = discover(data)
    print(f"demo dataset: {len(items)} images in {data}")
    for item in items:
        w, h = image_size(item.path)
        print(f"  {item.name:22s} {w}x{h}")
    print(f"demo models: {models}/wd14-demo, {models}/sdxl-demo (tiny, random weights: demo only)")
    print(f"demo finished in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
