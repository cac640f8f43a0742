"""`sdprep clean` on copies of sample_data: seed 003 reproduced, exact captions, undo, dry run, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from seed_tagpy import SEED_REMOVE, seed_clean_and_update_tags

from sdprep.cli import cli
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.rules import CleanRules
from sdprep.tags import remove_underscore


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp", ".bmp", ".gif"))


def write_tagger_captions(folder: Path, drop: tuple[str, ...] = ()) -> None:
    """Captions as kohya's WD14 script writes them (general tags, underscores removed, ", ")."""
    for image in images_of(folder):
        side = json.loads((folder / (image.name + ".json")).read_text())
        tags = [remove_underscore(t) for t in side["tags_general"] if t not in drop]
        image.with_suffix(".txt").write_text(", ".join(tags) + "\n")


def captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


def seed_args(folder: Path) -> list[str]:
    args = ["clean", str(folder), "--trigger", "nazuna"]
    for tag in SEED_REMOVE:
        args += ["--remove", tag]
    return args


@pytest.mark.parametrize("drop", [(), ("greyscale", "monochrome")], ids=["tagger-captions", "no-colour-tags"])
def test_seed_003_reproduced(cli_runner, sample_dataset: Path, tmp_path: Path, drop):
    write_tagger_captions(sample_dataset, drop)
    seed_copy = tmp_path / "seed"
    subprocess.run(["cp", "-a", str(sample_dataset), str(seed_copy)], check=True)
    for image in images_of(seed_copy):
        seed_clean_and_update_tags(image, image.with_suffix(".txt"))
    res = cli_runner.invoke(cli, seed_args(sample_dataset))
    assert res.exit_code == 0, res.output
    ours, seeds = captions(sample_dataset), captions(seed_copy)
    assert ours == {name: text + "\n" for name, text in seeds.items()}


def test_seed_captions_golden(cli_runner, sample_dataset: Path):
    write_tagger_captions(sample_dataset, ("greyscale", "monochrome"))
    assert cli_runner.invoke(cli, seed_args(sample_dataset)).exit_code == 0
    assert captions(sample_dataset) == {
        "a_landscape.txt": "nazuna, solo, smile, outdoors, sky, dress\n",
        "b_portrait.txt": "nazuna, solo, looking at viewer, simple background, white background, shirt, upper body\n",
        "c_square.txt": "nazuna, solo, red theme, smile, open mouth\n",
        "d_greyscale.txt": "nazuna, solo, long hair, simple background, greyscale\n",
        "e_sepia.txt": "nazuna, solo, brown theme, portrait, monochrome\n",
        "f_transparent.txt": "nazuna, solo, no background, transparent background\n",
        "g_tiny.txt": "nazuna, solo, chibi\n",
        "h_wide.txt": "nazuna, solo, night, night sky, star (sky), outdoors\n",
    }


def test_whole_tags_only_unlike_the_seed(sample_dataset: Path):
    (sample_dataset / "a_landscape.txt").write_text("1girl, braided hair, braid, bangs, blunt bangs, smile\n")
    opts = CleanOptions(CleanRules(trigger=("nazuna",), remove=tuple(SEED_REMOVE)))
    run_clean(sample_dataset, opts)
    assert (sample_dataset / "a_landscape.txt").read_text() == "nazuna, braided hair, smile\n"


GOLDEN_FROM_SIDECARS = {
    "a_landscape.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, smile, outdoors, sky, dress\n",
    "b_portrait.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, looking at viewer, simple background, "
    "white background, shirt, upper body\n",
    "c_square.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, red theme, smile, open mouth\n",
    "d_greyscale.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, long hair, greyscale, monochrome, "
    "simple background\n",
    "e_sepia.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, monochrome, brown theme, portrait\n",
    "f_transparent.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, no background, transparent background\n",
    "g_tiny.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, chibi\n",
    "h_wide.txt": "nazuna, nazuna (yofukashi no uta), 1girl, solo, night, night sky, star (sky), outdoors\n",
}


def test_captions_from_sidecars_golden_idempotent_and_undo(cli_runner, sample_dataset: Path):
    sidecars = {p.name: p.read_bytes() for p in sample_dataset.glob("*.json")}
    args = ["clean", str(sample_dataset), "--trigger", "nazuna", "--remove", "blue eyes"]
    args += ["--remove", "pink hair"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "clean: 8 changed, 0 skipped, 0 failed",
        "tags from: 8 booru tags",
        "monochrome: 1 greyscale, 1 monochrome, 6 colour (8 measured, 0 at full resolution)",
        "updated 8 sidecars",
        f"undo: sdprep undo {sample_dataset}",
    ]
    assert captions(sample_dataset) == GOLDEN_FROM_SIDECARS
    record = json.loads((sample_dataset / "d_greyscale.png.json").read_text())
    assert record["sdprep"]["monochrome"]["label"] == "greyscale"
    assert record["tag_string_general"].startswith("1girl solo")  # gallery-dl's keys are kept
    again = cli_runner.invoke(cli, args)
    assert again.output.splitlines()[:2] == [
        "clean: 0 changed, 8 skipped, 0 failed",
        "tags from: 8 booru tags",  # a re-run starts again from the source, not from its own output
    ]
    assert "measured" not in again.output  # labels came from the sidecars, no image decoded
    undo = cli_runner.invoke(cli, ["undo", str(sample_dataset)])
    assert undo.exit_code == 0 and undo.output.startswith("undone: clean ")
    assert captions(sample_dataset) == {}
    assert {p.name: p.read_bytes() for p in sample_dataset.glob("*.json")} == sidecars


def test_undo_restores_original_caption_bytes(sample_dataset: Path):
    original = b"1girl,  solo ,blue_eyes,,smile"  # messy, no newline: restored exactly
    (sample_dataset / "a_landscape.txt").write_bytes(original)
    run_clean(sample_dataset, CleanOptions(CleanRules(trigger=("tok",), remove=("blue eyes",))))
    assert (sample_dataset / "a_landscape.txt").read_text() == "tok, 1girl, solo, smile\n"
    from sdprep import fileops

    fileops.undo(sample_dataset)
    assert (sample_dataset / "a_landscape.txt").read_bytes() == original


def test_dry_run_prints_a_diff_and_writes_nothing(cli_runner, sample_dataset: Path):
    (sample_dataset / "a_landscape.txt").write_text("1girl, blue eyes, smile\n")
    before = sorted(p.name for p in sample_dataset.iterdir())
    args = ["clean", str(sample_dataset), "--trigger", "nazuna", "--remove", "blue eyes"]
    res = cli_runner.invoke(cli, [*args, "--dry-run", "--no-monochrome"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(
        f"--- {sample_dataset}/a_landscape.txt\n"
        f"+++ {sample_dataset}/a_landscape.txt\n"
        "@@ -1 +1 @@\n"
        "-1girl, blue eyes, smile\n"
        "+nazuna, 1girl, smile\n"
        "--- /dev/null\n"
        f"+++ {sample_dataset}/b_portrait.txt\n"
        "@@ -0,0 +1 @@\n"
        "+nazuna, nazuna (yofukashi no uta), 1girl, solo, pink hair, looking at viewer, "
    )
    assert res.output.endswith(
        "clean (dry run): 8 changed, 0 skipped, 0 failed\ntags from: 7 booru tags, 1 caption files\n"
        "would update 8 sidecars\n"  # where each caption came from (prep/lineage.py)
    )
    assert sorted(p.name for p in sample_dataset.iterdir()) == before
    assert (sample_dataset / "a_landscape.txt").read_text() == "1girl, blue eyes, smile\n"


def test_latin1_caption_reported_not_destroyed(cli_runner, sample_dataset: Path):
    bad = sample_dataset / "b_portrait.txt"
    bad.write_bytes("1girl, caf\xe9, smile\n".encode("latin-1"))
    res = cli_runner.invoke(cli, ["clean", str(sample_dataset), "--trigger", "tok", "--no-monochrome"])
    assert res.exit_code == 1
    # listed under its image, as every stage lists a companion's failure
    image = sample_dataset / "b_portrait.png"
    assert f"  failed: {image}: b_portrait.txt: not UTF-8 text (byte 10)" in res.output.splitlines()
    assert res.output.startswith("clean: 7 changed, 0 skipped, 1 failed\n")
    assert bad.read_bytes() == "1girl, caf\xe9, smile\n".encode("latin-1")


def test_every_image_type_is_cleaned(tmp_path: Path):
    """The seed only looked at .webp files."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    for ext in ("png", "jpg", "webp", "bmp", "gif"):
        Image.fromarray(grey).save(tmp_path / f"x_{ext}.{ext}")
    result = run_clean(tmp_path, CleanOptions(CleanRules(trigger=("tok",))))
    assert result.changed == 5
    assert {p.read_text() for p in tmp_path.glob("*.txt")} == {"tok, greyscale\n"}


def test_prune_core_tags(cli_runner, sample_dataset: Path):
    args = ["clean", str(sample_dataset), "--trigger", "nazuna", "--prune-core", "--no-monochrome"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[:2] == [
        "clean: 8 changed, 0 skipped, 0 failed",
        'core tags pruned for "nazuna" (8 images, >= 60%): 1girl (100%), '
        "nazuna (yofukashi no uta) (100%), solo (100%), pink hair (75%)",
    ]
    assert (
        sample_dataset / "a_landscape.txt"
    ).read_text() == "nazuna, blue eyes, smile, outdoors, sky, dress\n"
    assert (sample_dataset / "d_greyscale.txt").read_text() == (
        "nazuna, long hair, greyscale, monochrome, simple background\n"
    )
    # a second run finds nothing more to prune and changes nothing
    again = cli_runner.invoke(cli, args)
    assert "clean: 0 changed, 8 skipped, 0 failed" in again.output


def test_prune_core_keep_and_percentage(sample_dataset: Path):
    rules = CleanRules(trigger=("nazuna",), prune_core=50, keep=("solo", "re:^nazuna "))
    result = run_clean(sample_dataset, CleanOptions(rules))
    assert result.details["pruned"] == {"nazuna": [("1girl", 1.0), ("pink hair", 0.75), ("blue eyes", 0.5)]}
    assert (sample_dataset / "a_landscape.txt").read_text() == (
        "nazuna, nazuna (yofukashi no uta), solo, smile, outdoors, sky, dress\n"
    )


def test_prune_core_needs_a_trigger(cli_runner, sample_dataset: Path):
    res = cli_runner.invoke(cli, ["clean", str(sample_dataset), "--prune-core", "70"])
    assert res.exit_code == 1
    assert res.output == (
        "Error: --prune-core needs a trigger token to absorb the pruned tags\n"
        "Hint: add --trigger TOKEN (or trigger_from_folder = true in the rules file)\n"
    )


def make_tiers(root: Path) -> None:
    for folder, n in (("10_low quality", 2), ("20_high quality", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (200, 30 + i * 60, 40)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text("1girl, smile\n")


def test_rules_file_per_folder_prefix_and_trigger_from_folder(cli_runner, tmp_path: Path):
    root = tmp_path / "img"
    make_tiers(root)
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'trigger = "nazuna"\n'
        "[prefix]\n"
        '"10_low quality" = "low quality"\n'
        '"*_high*" = ["high quality", "best quality"]\n'
        "[replace]\n"
        '"1girl" = "girl, solo"\n'
        "[monochrome]\nenabled = false\n"
    )
    res = cli_runner.invoke(cli, ["clean", str(root), "-r", "--rules", str(rules)])
    assert res.exit_code == 0, res.output
    assert (root / "10_low quality" / "0.txt").read_text() == "nazuna, low quality, girl, solo, smile\n"
    assert (root / "20_high quality" / "1.txt").read_text() == (
        "nazuna, high quality, best quality, girl, solo, smile\n"
    )
    # the folder's own tokens as trigger; other rules rebuild from the original caption, not from
    # the first run's output (which would keep its trigger "nazuna" and its replacements)
    rules.write_text("trigger_from_folder = true\n[monochrome]\nenabled = false\n")
    cli_runner.invoke(cli, ["clean", str(root), "-r", "--rules", str(rules), "--sort", "alphabetical"])
    assert (root / "10_low quality" / "0.txt").read_text() == "low quality, 1girl, smile\n"


def test_rules_file_errors(cli_runner, sample_dataset: Path, tmp_path: Path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[monochrome]\nhue_treshold = 0.05\n")
    res = cli_runner.invoke(cli, ["clean", str(sample_dataset), "--rules", str(rules)])
    assert res.exit_code == 1
    assert (
        res.output
        == f'Error: {rules}: unknown key "monochrome.hue_treshold"\nHint: did you mean "hue_threshold"?\n'
    )
    res = cli_runner.invoke(cli, ["clean", str(sample_dataset), "--replace", "nonsense"])
    assert res.exit_code == 1
    assert res.output.startswith('Error: --replace "nonsense" is not of the form A=B\n')
    res = cli_runner.invoke(cli, ["clean", str(sample_dataset), "--sort", "size"])
    assert res.exit_code == 2


def test_remove_file_and_replace_options(cli_runner, sample_dataset: Path, tmp_path: Path):
    remove = tmp_path / "character.txt"
    remove.write_text("# nazuna's look\npink hair, blue eyes\nre:^nazuna\n")
    res = cli_runner.invoke(
        cli,
        [
            "clean",
            str(sample_dataset),
            "--remove-file",
            str(remove),
            "--replace",
            "1girl=girl",
            "--no-monochrome",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (sample_dataset / "a_landscape.txt").read_text() == "girl, solo, smile, outdoors, sky, dress\n"


def wd14_sidecar(path: Path, scores: dict[str, float], categories: dict[str, str]) -> None:
    side = json.loads(path.read_text()) if path.exists() else {}
    side["sdprep"] = {"wd14": {"model": "tiny", "scores": scores, "categories": categories, "rating": {}}}
    path.write_text(json.dumps(side))


def test_wd14_scores_source_and_score_sort(sample_dataset: Path):
    side = sample_dataset / "a_landscape.jpg.json"
    scores = {"smile": 0.5, "long_hair": 0.9, "sky": 0.2, "nazuna_(yofukashi_no_uta)": 0.99, "solo": 0.7}
    cats = {k: "general" for k in scores} | {"nazuna_(yofukashi_no_uta)": "character"}
    wd14_sidecar(side, scores, cats)
    run_clean(sample_dataset, CleanOptions(CleanRules(trigger=("tok",), monochrome=_off())))
    # as `sdprep tag` writes them: stored (vocabulary) order, general then character tags
    assert (sample_dataset / "a_landscape.txt").read_text() == (
        "tok, smile, long hair, solo, nazuna (yofukashi no uta)\n"
    )
    rules = CleanRules(trigger=("tok",), character_first=True, sort="score", monochrome=_off())
    run_clean(sample_dataset, CleanOptions(rules))
    assert (sample_dataset / "a_landscape.txt").read_text() == (
        "tok, nazuna (yofukashi no uta), long hair, solo, smile\n"
    )
    # a caption file is the source of truth; the scores only order it
    (sample_dataset / "a_landscape.txt").write_text("sky, smile, extra, solo\n")
    run_clean(sample_dataset, CleanOptions(CleanRules(sort="score", monochrome=_off())))
    assert (sample_dataset / "a_landscape.txt").read_text() == "solo, smile, sky, extra\n"


def test_source_wd14_without_scores_fails_per_image(sample_dataset: Path):
    result = run_clean(sample_dataset, CleanOptions(CleanRules(source="wd14", monochrome=_off())))
    assert len(result.failed) == 8
    assert result.failed[0].reason == "no WD14 scores in the sidecar"


def _off():
    from sdprep.prep.monochrome import MonochromeSettings

    return MonochromeSettings(enabled=False)


def test_clean_imports_no_torch_or_transformers(sample_dataset: Path):
    code = (
        "import sys\n"
        "from sdprep.cli import main\n"
        f"try:\n    main(['-q', 'clean', {str(sample_dataset)!r}, '--trigger', 'x', '--dry-run'])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "HEAVY []" in out


def test_missing_folder_is_a_usage_error(cli_runner, tmp_path: Path):
    assert cli_runner.invoke(cli, ["clean", str(tmp_path / "nope")]).exit_code == 2


def test_prune_scope_folder(tmp_path: Path):
    root = tmp_path / "img"
    make_tiers(root)
    (root / "10_low quality" / "0.txt").write_text("1girl, smile, sky\n")
    (root / "20_high quality" / "0.txt").write_text("1girl, night\n")
    rules = CleanRules(trigger=("tok",), prune_core=100, prune_scope="folder", monochrome=_off())
    result = run_clean(root, CleanOptions(rules, recursive=True))
    assert result.details["pruned"] == {
        "10_low quality": [("1girl", 1.0), ("smile", 1.0)],
        "20_high quality": [("1girl", 1.0)],
    }
    assert (root / "10_low quality" / "0.txt").read_text() == "tok, sky\n"
    assert (root / "20_high quality" / "1.txt").read_text() == "tok, smile\n"


def test_underscores_and_escaped_parentheses(cli_runner, sample_dataset: Path):
    args = [
        "clean",
        str(sample_dataset),
        "--trigger",
        "my_token",
        "--no-monochrome",
        "--underscores",
        "underscore",
    ]
    res = cli_runner.invoke(cli, [*args, "--escape-parentheses", "--keep-first", "1"])
    assert res.exit_code == 0, res.output
    assert (sample_dataset / "g_tiny.txt").read_text() == (
        "my_token, nazuna_\\(yofukashi_no_uta\\), 1girl, solo, pink_hair, chibi\n"
    )
    # back to spaces: kohya's rule, the escapes are kept (and not doubled)
    cli_runner.invoke(cli, [*args[:-1], "space", "--escape-parentheses"])
    assert (sample_dataset / "g_tiny.txt").read_text() == (
        "my_token, nazuna \\(yofukashi no uta\\), 1girl, solo, pink hair, chibi\n"
    )


def test_new_thresholds_relabel_from_stored_statistics(cli_runner, sample_dataset: Path):
    args = ["clean", str(sample_dataset), "--trigger", "nazuna"]
    assert cli_runner.invoke(cli, args).exit_code == 0
    res = cli_runner.invoke(cli, [*args, "--hue-threshold", "0.001"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "monochrome: 1 greyscale, 0 monochrome, 7 colour" in lines  # no image decoded again
    assert "updated 8 sidecars" in lines  # the records now name the new thresholds
    record = json.loads((sample_dataset / "e_sepia.jpg.json").read_text())["sdprep"]["monochrome"]
    assert record["label"] == "colour" and record["thresholds"] == {"saturation": 0.001, "hue": 0.001}


def test_multi_line_captions_are_reported_and_written_as_one_line(tmp_path: Path):
    """kohya trains only a caption's first line: clean says which captions had several and writes one,
    a line break separating tags (never gluing the last tag of a line to the first of the next)."""
    for name in ("a", "b"):
        rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # colourful
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("1girl, smile\nblue hair, outdoors\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("1girl, solo\n", encoding="utf-8")
    rules = CleanRules(trigger=("tok",))
    res = run_clean(tmp_path, CleanOptions(rules=rules))
    assert (tmp_path / "a.txt").read_text().splitlines() == ["tok, 1girl, smile, blue hair, outdoors"]
    assert (
        "captions on several lines (1; kohya trains only the first line): were rewritten as one line, "
        "each line break a tag separator: a.txt" in res.notes
    )
