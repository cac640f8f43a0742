"""Project files: strict loading, the init template, and the demo chain re-run doing no work."""

import shutil
from pathlib import Path

import pytest

from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.progress import NullReporter
from sdprep.project import load_project, run_project, stage_options, write_init

REPO = Path(__file__).resolve().parent.parent


def test_init_template_is_valid_for_every_stage(tmp_path, cli_runner):
    res = cli_runner.invoke(cli, ["init", str(tmp_path)])
    assert res.exit_code == 0 and "project.toml" in res.output
    project = load_project(tmp_path / "project.toml")
    assert [n for n, _ in project.stages] == ["rename", "upscale", "tag", "clean", "bucket", "report"]
    for name, table in project.stages:
        stage_options(name, table, project.base)  # raises on any key the stage does not know
    again = cli_runner.invoke(cli, ["init", str(tmp_path)])
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[project]\ndataset = "d"\n[stages.clen]\n',
            r'unknown stage \[stages.clen\][\s\S]*did you mean "clean"\?',
        ),
        ('[project]\ndatset = "d"\n', 'did you mean "dataset"'),
        ("[project]\ndataset = 5\n", "project.dataset must be a folder name in quotes, got 5"),
        ('train = 3\n[project]\ndataset = "d"\n', r"\[stages\] and \[train\] must be tables"),
    ],
    ids=["unknown-stage", "unknown-key", "dataset-not-a-string", "stages-not-a-table"],
)
def test_a_bad_project_file_is_an_error(tmp_path, text, message):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_project(p)


def test_an_unknown_key_in_a_stage_is_an_error(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[project]\ndataset = "d"\n[stages.rename]\npatern = "{n}"\n')
    project = load_project(p)
    with pytest.raises(ConfigError, match='unknown key "stages.rename.patern"'):
        stage_options("rename", project.stages[0][1], project.base)


def test_rules_section_is_listed_once_and_reaches_tag_and_clean(tmp_path):
    from sdprep.project import check_project

    p = tmp_path / "p.toml"
    (tmp_path / "d").mkdir()
    p.write_text(
        '[project]\ndataset = "d"\n[rules]\nremove = ["pink hair"]\nreplace = { "1girl" = "girl", x = "y" }\n'
        '[stages.tag.rules]\nundesired = ["smile"]\nreplace = { x = "z" }\n'
        '[stages.clean.rules]\nremove = "sky"\n[stages.rename]\n'
    )
    prepared = {name: opts for name, _, opts in check_project(load_project(p), train=False)}
    tag, clean = prepared["tag"].rules, prepared["clean"].rules
    assert tag.undesired == ("pink hair", "smile") and clean.remove == ("pink hair", "sky")
    assert tag.replace == {"1girl": ("girl",), "x": ("z",)}  # the stage's own replacement wins
    assert clean.replace == {"1girl": ("girl",), "x": ("y",)}
    p.write_text('[project]\ndataset = "d"\n[rules]\nremoved = ["x"]\n')
    with pytest.raises(ConfigError, match='unknown key "rules.removed"') as exc:
        load_project(p)
    assert 'did you mean "remove"?' in str(exc.value)


def test_demo_project_runs_and_rerun_does_no_work(tmp_path):
    """The README demo chain (without training) on a copy: second run changes nothing."""
    shutil.copytree(REPO / "sample_data" / "images", tmp_path / "sample_data" / "images")
    shutil.copy(REPO / "sample_data" / "project.toml", tmp_path / "sample_data" / "project.toml")
    project = load_project(tmp_path / "sample_data" / "project.toml")
    assert project.dataset == tmp_path / "demo_output" / "data"
    lines: list[str] = []
    first = run_project(project, echo=lines.append, train=False)
    assert project.train is not None  # the demo trains too; see test_demo_training_runs_once
    assert [r.stage for r in first] == ["rename", "upscale", "mask", "clean", "tag", "bucket", "report"]
    assert all(not r.failed for r in first), [r.summary() for r in first]
    data = project.dataset
    assert sorted(p.name for p in data.glob("*.txt"))[:2] == ["nazuna_001.txt", "nazuna_002.txt"]
    captions = {p.name: p.read_text() for p in data.glob("*.txt")}
    assert all(c.startswith("nazuna, ") for c in captions.values())
    assert not any("pink hair" in c for c in captions.values())
    assert any("greyscale" in c for c in captions.values()) and any(
        "monochrome" in c for c in captions.values()
    )
    assert (tmp_path / "demo_output" / "train_set" / "img" / "2_nazuna").is_dir()
    assert (tmp_path / "demo_output" / "report.html").is_file()
    second = run_project(
        load_project(tmp_path / "sample_data" / "project.toml"), echo=lines.append, train=False
    )
    assert [(r.stage, r.changed) for r in second] == [
        (s, 0) for s in ("rename", "upscale", "mask", "clean", "tag", "bucket", "report")
    ]
    assert {p.name: p.read_text() for p in data.glob("*.txt")} == captions
    assert not (tmp_path / "sample_data" / "images" / "nazuna_001.txt").exists()  # source untouched


def test_write_init_refuses_overwrite(tmp_path):
    write_init(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        write_init(tmp_path)
    assert write_init(tmp_path, force=True).exists()


def test_demo_training_runs_once_then_is_up_to_date(tmp_path):
    """`sdprep run` with [train]: a verified LoRA the first time, a skip with nothing changed."""
    shutil.copytree(REPO / "sample_data" / "images", tmp_path / "sample_data" / "images")
    text = (
        (REPO / "sample_data" / "project.toml")
        .read_text()
        .replace("max_train_steps = 6", "max_train_steps = 2")
    )
    (tmp_path / "sample_data" / "project.toml").write_text(text)
    project = load_project(tmp_path / "sample_data" / "project.toml")
    lines: list[str] = []
    shown: list[str] = []

    class Shown(NullReporter):
        def start(self, total: int | None, description: str) -> None:
            shown.append(description)

    results = run_project(project, echo=lines.append, only=["mask", "bucket", "train"], reporter=Shown)
    assert "reading images" in shown  # the training's data scan reports through the runner's reporter
    train = results[-1]
    assert train.stage == "train" and train.changed == 1 and not train.failed
    lora = tmp_path / "demo_output" / "lora" / "nazuna_demo.safetensors"
    assert lora.is_file()
    assert any("masks: 8 of 8 images have masks" in line for line in lines)  # mask use is visible
    again = run_project(
        load_project(tmp_path / "sample_data" / "project.toml"), echo=lines.append, only=["train"]
    )
    assert again[-1].skipped == 1 and "up to date" in again[-1].summary()


def test_train_table_paths_and_bucket_default(tmp_path):
    from sdprep.train.api import project_train_table

    p = tmp_path / "p.toml"
    p.write_text(
        '[project]\ndataset = "d"\n[stages.bucket]\nout = "ts"\n[train]\noutput_dir = "o"\nmax_train_steps = 3\n'
    )
    config, table = project_train_table(load_project(p))
    assert config is None
    assert table == {
        "output_dir": str(tmp_path / "o"),
        "max_train_steps": 3,
        "dataset_config": str(tmp_path / "ts" / "dataset.toml"),
    }
    p.write_text('[project]\ndataset = "d"\n[train]\nmax_train_steps = 3\n')
    with pytest.raises(ConfigError, match="no train_data_dir or dataset_config"):
        project_train_table(load_project(p))


def _demo_copy(tmp_path: Path, edit=lambda text: text) -> Path:
    """The sample project in tmp_path/sample_data, its text passed through `edit`."""
    shutil.copytree(REPO / "sample_data" / "images", tmp_path / "sample_data" / "images")
    path = tmp_path / "sample_data" / "project.toml"
    path.write_text(edit((REPO / "sample_data" / "project.toml").read_text()))
    return path


@pytest.mark.parametrize(
    ("args", "edit", "expected"),
    [
        (
            ["--only", "tagg"],
            None,
            'Error: --only tagg: no such stage\nHint: did you mean "tag"? stages here: ',
        ),
        (["--only", "dedup"], None, "has no [stages.dedup]"),
        ([], lambda t: t.replace("merge = ", "merg = "), 'unknown key "stages.tag.merg"'),
        ([], lambda t: t.replace('source = "images"', 'source = "imgs"'), "imgs: source folder not found"),
        ([], lambda t: t.replace("network_dim = 4", "network_dimm = 4"), "network_dimm"),
        ([], lambda t: t.replace("max_train_steps = 6", 'max_train_steps = "six"'), "max_train_steps"),
    ],
)
def test_run_checks_the_whole_project_before_changing_anything(tmp_path, cli_runner, args, edit, expected):
    """A typo anywhere fails at once: nothing imported, no demo model built, no stage run."""
    path = _demo_copy(tmp_path, edit or (lambda t: t))
    res = cli_runner.invoke(cli, ["run", str(path), *args])
    assert res.exit_code == 1, res.output
    assert expected in res.output
    assert not (tmp_path / "demo_output").exists(), res.output


def test_run_summary_counts_stages_not_steps(tmp_path, cli_runner):
    path = _demo_copy(tmp_path)
    res = cli_runner.invoke(cli, ["-q", "run", str(path), "--only", "rename", "--only", "upscale"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "run: 2 stages, 10 changed, 0 failed"


def _captions(root: Path) -> dict[str, bytes]:
    """Every caption file under root (the dataset and the bucketed copy), by relative path."""
    files = [*(root / "data").rglob("*.txt"), *(root / "train_set").rglob("*.txt")]
    rel = [p.relative_to(root) for p in sorted(files)]
    return {r.as_posix(): (root / r).read_bytes() for r in rel if not any(s.startswith(".") for s in r.parts)}


def _edited(text: str, step: int) -> str:
    text = text.replace('trigger = ["nazuna"]', 'trigger = ["nzn"]').replace(
        'token = "nazuna"', 'token = "nzn"'
    )
    text = text.replace('remove = ["pink hair", ', "remove = [")
    if step >= 2:
        text = text.replace(
            'merge = "append"',
            'merge = "append"\nrules = { general_threshold = 0.6, character_threshold = 0.7 }',
        )
    return text


def test_a_rerun_after_editing_the_project_equals_a_fresh_run(tmp_path):
    """Captions are a pure function of the source tags and the rules: trigger, remove list and tag
    thresholds edited between runs give, byte for byte, what a fresh run of the edited file gives."""
    rerun = _demo_copy(tmp_path / "rerun")
    run_project(load_project(rerun), echo=lambda _: None, train=False)
    first = _captions(tmp_path / "rerun" / "demo_output")
    assert all(c.startswith(b"nazuna, ") for c in first.values())
    previous = first
    for step in (1, 2):
        rerun.write_text(_edited((REPO / "sample_data" / "project.toml").read_text(), step))
        results = run_project(load_project(rerun), echo=lambda _: None, train=False)
        fresh = _demo_copy(tmp_path / f"fresh{step}", lambda t, s=step: _edited(t, s))
        run_project(load_project(fresh), echo=lambda _: None, train=False)
        want = _captions(tmp_path / f"fresh{step}" / "demo_output")
        got = _captions(tmp_path / "rerun" / "demo_output")
        assert got == want, step
        assert all(c.startswith(b"nzn, ") and b", nazuna," not in c for c in got.values())
        assert not any(k.startswith("train_set/img/2_nazuna/") for k in got)  # re-bucketed
        if step == 1:
            assert sum(b"pink hair" in c for k, c in got.items() if k.startswith("data/")) == 6
            assert {r.stage: r.changed for r in results}["clean"] == 8
        else:
            assert {r.stage: r.changed for r in results}["clean"] == 0  # only tag's thresholds changed
            assert got != previous
        previous = got
