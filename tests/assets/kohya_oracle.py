"""Regenerate kohya_bucket_facts.json: what kohya sd-scripts' own loader makes of `sdprep bucket` output.

Not a test and not part of sdprep: it runs kohya's code, which is never copied into this repository.
Two steps, in two environments:

    # 1. with sdprep (the repo's venv): build the scenario of tests/kohya_scenario.py and bucket it
    .venv/bin/python tests/assets/kohya_oracle.py build /tmp/oracle
    # 2. with kohya sd-scripts importable (its checkout on SD_SCRIPTS, its requirements installed):
    SD_SCRIPTS=/path/to/sd-scripts python tests/assets/kohya_oracle.py kohya /tmp/oracle \
        > tests/assets/kohya_bucket_facts.json

Step 2 loads each bucketed dataset.toml exactly as sdxl_train_network.py does (ConfigSanitizer(True,
True, masked_loss, True), BlueprintGenerator, generate_dataset_group_by_blueprint, make_buckets) from
OUT as the working folder, with and without --masked_loss, and records per image what kohya
registered (repeats, reg flag, caption, stored size, bucket, resized size, alpha_mask, mask file),
or the schema error. Facts recorded with sd-scripts 48d368fa, run in a copy of sdprep's venv plus
voluptuous, toml, imagesize, ftfy and einops; that commit imports torchvision (a CPU build matching
torch was not available: a stub with ToTensor/Normalize/Compose/InterpolationMode served, with
transformers told torchvision is absent), transformers' removed CLIPFeatureExtractor and its
lpw_stable_diffusion pipelines (stubbed: the dataset code does not use them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

CASES = {  # name -> sdprep bucket arguments after DATA -o OUT
    "alpha_reg": ["--token", "tok", "--reg", "{reg}"],
    "conditioning": ["--token", "tok", "--mask-form", "conditioning"],
}


def build(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kohya_scenario import CLI_SETTINGS, make_scenario

    from sdprep.cli import cli

    data, reg = make_scenario(folder / "src")
    for name, args in CASES.items():
        argv = [
            "bucket",
            str(data),
            "-o",
            str(folder / name),
            *[a.format(reg=reg) for a in args],
            *CLI_SETTINGS,
        ]
        cli.main(argv, standalone_mode=False)


def kohya(folder: Path) -> dict:
    sys.path.insert(0, os.environ["SD_SCRIPTS"])
    import logging

    logging.disable(logging.WARNING)
    import sdxl_train_network
    from library import config_util

    facts: dict = {"sd_scripts": os.environ.get("SD_SCRIPTS_COMMIT", "48d368fa"), "cases": {}}
    for name in CASES:
        out = (folder / name).resolve()
        for masked_loss in (False, True):
            os.chdir(out)
            argv = ["--pretrained_model_name_or_path", "x", "--dataset_config", "dataset.toml"]
            args = sdxl_train_network.setup_parser().parse_args(
                argv + (["--masked_loss"] if masked_loss else [])
            )
            key = f"{name}{'+masked_loss' if masked_loss else ''}"
            try:
                sanitizer = config_util.ConfigSanitizer(True, True, args.masked_loss, True)
                blueprint = config_util.BlueprintGenerator(sanitizer).generate(
                    config_util.load_user_config(args.dataset_config), args
                )
                group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
            except Exception as exc:  # noqa: BLE001 - the schema error is the fact
                facts["cases"][key] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            facts["cases"][key] = {"datasets": [_dataset(ds, out) for ds in group.datasets]}
    return facts


def _dataset(ds, out: Path) -> dict:
    inner = getattr(ds, "dreambooth_dataset_delegate", ds)
    images = []
    for key, info in inner.image_data.items():
        subset = inner.image_to_subset[key]
        cond = info.cond_img_path
        images.append(
            {
                "path": Path(os.path.abspath(info.absolute_path)).relative_to(out).as_posix(),
                "repeats": info.num_repeats,
                "is_reg": info.is_reg,
                "caption": info.caption,
                "size": list(info.image_size),
                "bucket": list(info.bucket_reso),
                "resized": list(info.resized_size),
                "alpha_mask": bool(getattr(subset, "alpha_mask", False)),
                "mask": Path(cond).relative_to(out).as_posix() if cond else None,
            }
        )
    return {
        "kind": type(ds).__name__,
        "num_train_images": ds.num_train_images,
        "num_reg_images": ds.num_reg_images,
        "images": sorted(images, key=lambda i: i["path"]),
    }


if __name__ == "__main__":
    step, where = sys.argv[1], Path(sys.argv[2])
    if step == "build":
        build(where)
    else:
        print(json.dumps(kohya(where), indent=1, ensure_ascii=False))
