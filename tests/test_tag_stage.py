"""The `sdprep tag` stage end to end with the tiny WD14 model: sidecars, captions, re-derivation,
bad files, undo, shards, resume, merge policies, the command line, and the start-up import set."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sdprep.cli import cli
from sdprep.dataset import Item, discover
from sdprep.errors import ConfigError, ModelError
from sdprep.prep.tag import TagOptions, in_shard, parse_shard, run_tag
from sdprep.taggers import wd14
from sdprep.taggers.rules import CaptionRules, caption_from_scores
from sdprep.taggers.tiny import build_tiny_wd14


def meta(image: Path) -> dict:
    return json.loads(Item(image).sidecar_path.read_text())["sdprep"]


def captions(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(root.rglob("*.txt"))}


@pytest.fixture
def model(tiny_wd14: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model, so a test may take it away."""
    return Path(shutil.copytree(tiny_wd14, tmp_path / "model"))


def kohya_caption(model_dir: Path, image: Path, thresh: float = 0.35, char_thresh: float = 0.85) -> str:
    """kohya's tag_images_by_wd14_tagger.py logic on raw model outputs: scores >= threshold in
    vocabulary order, general then character, underscores removed from tags longer than 3."""
    rows = [line.split(",") for line in (model_dir / "selected_tags.csv").read_text().splitlines()[1:]]
    general = [r[1] for r in rows if r[2] == "0"]
    character = [r[1] for r in rows if r[2] == "4"]
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = wd14.to_batch([wd14.load_for_tagging(image)])
    prob = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
    tags = []
    for i, p in enumerate(prob[4:]):
        if i < len(general) and p >= thresh:
            tags.append(general[i])
        elif i >= len(general) and p >= char_thresh:
            tags.append(character[i - len(general)])
    return ", ".join(t.replace("_", " ") if len(t) > 3 else t for t in tags) + "\n"


def test_end_to_end_scores_in_sidecars_and_kohya_captions(sample_dataset, model):
    before = {p.name: json.loads(p.read_text()) for p in sample_dataset.glob("*.json")}
    result = run_tag(sample_dataset, TagOptions(model=str(model), batch_size=1))
    assert (result.changed, result.skipped, result.failed) == (8, 0, [])
    assert result.details["inferred"] == 8
    assert any(n.startswith(f"wd14: {model.as_posix()} on CPUExecutionProvider") for n in result.notes)
    for item in discover(sample_dataset):
        m = meta(item.path)
        record = m["wd14"]
        assert record["model"] == model.as_posix() and record["floor"] == 0.05
        assert min(record["scores"].values()) >= 0.05 and len(record["rating"]) == 4
        text = item.caption_path.read_text()
        assert text == caption_from_scores(record, CaptionRules()) + "\n"
        assert text == kohya_caption(model, item.path), item.name
        # gallery-dl's own keys are preserved untouched
        side = json.loads(item.sidecar_path.read_text())
        assert {k: v for k, v in side.items() if k != "sdprep"} == before[item.sidecar_path.name]
    assert any(
        "hatsune miku" in t or "kirisame" in t or "nazuna" in t for t in captions(sample_dataset).values()
    )


def test_v2_input_name_model_tags_the_same(sample_dataset, tmp_path):
    v2 = build_tiny_wd14(tmp_path / "v2", input_name="input_1:0")
    result = run_tag(sample_dataset, TagOptions(model=str(v2)))
    assert result.changed == 8 and not result.failed
    img = sample_dataset / "a_landscape.jpg"
    assert Item(img).caption_path.read_text() == kohya_caption(v2, img)


def test_second_run_does_nothing_and_records_no_operation(sample_dataset, model):
    run_tag(sample_dataset, TagOptions(model=str(model)))
    snapshot = {p: p.read_bytes() for p in sample_dataset.iterdir() if p.is_file()}
    journal = sample_dataset / ".sdprep" / "journal"
    ops = sorted(journal.iterdir())
    result = run_tag(sample_dataset, TagOptions(model=str(model)))
    assert (result.changed, result.skipped, result.details["inferred"]) == (0, 8, 0)
    assert {p: p.read_bytes() for p in sample_dataset.iterdir() if p.is_file()} == snapshot
    assert sorted(journal.iterdir()) == ops
    # a caption edited by hand (or by `sdprep clean`) after tagging is not redone by the same options
    (sample_dataset / "a_landscape.txt").write_text("edited\n")
    assert run_tag(sample_dataset, TagOptions(model=str(model))).skipped == 8
    assert (sample_dataset / "a_landscape.txt").read_text() == "edited\n"


def test_new_thresholds_recaption_without_the_model(sample_dataset, model):
    run_tag(sample_dataset, TagOptions(model=str(model)))
    first = captions(sample_dataset)
    model.rename(model.with_name("gone"))  # the model is unavailable from now on
    rules = CaptionRules(general_threshold=0.9, character_threshold=0.5, rating="first", character_first=True)
    result = run_tag(sample_dataset, TagOptions(model=str(model), rules=rules))
    assert result.details["inferred"] == 0 and not result.failed and result.changed == 8
    second = captions(sample_dataset)
    assert second != first
    for item in discover(sample_dataset):
        record = meta(item.path)["wd14"]
        assert item.caption_path.read_text() == caption_from_scores(record, rules) + "\n"
        assert item.caption_path.read_text().split(", ")[0] in (
            "general",
            "sensitive",
            "questionable",
            "explicit",
        )
    # --force needs the model again, and says how to provide it
    with pytest.raises(ModelError, match="does not exist"):
        run_tag(sample_dataset, TagOptions(model=str(model), rules=rules, force=True))
    # and the same rules again: nothing to do, still no model needed
    assert run_tag(sample_dataset, TagOptions(model=str(model), rules=rules)).skipped == 8


def test_bad_images_are_reported_and_the_rest_tagged(sample_dataset, model, cli_runner):
    (sample_dataset / "empty.png").write_bytes(b"")
    (sample_dataset / "notes.png").write_text("this is not an image\n")
    (sample_dataset / "b_portrait.png.json").write_text("{broken")
    res = cli_runner.invoke(cli, ["-q", "tag", str(sample_dataset), "--model", str(model)])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("tag: 7 changed, 0 skipped, 3 failed\n")
    assert f"  failed: {sample_dataset / 'empty.png'}: empty file (0 bytes)\n" in res.output
    assert f"  failed: {sample_dataset / 'notes.png'}: not an image, or an unsupported format\n" in res.output
    assert f"failed: {sample_dataset / 'b_portrait.png'}: b_portrait.png.json: invalid JSON" in res.output
    assert not (sample_dataset / "empty.txt").exists() and (sample_dataset / "a_landscape.txt").exists()
    assert (sample_dataset / "b_portrait.png.json").read_text() == "{broken"  # left as it was


def test_undo_restores_the_old_captions(sample_dataset, model, cli_runner):
    (sample_dataset / "a_landscape.txt").write_text("my own caption\n")
    sidecar = (sample_dataset / "a_landscape.jpg.json").read_bytes()
    run_tag(sample_dataset, TagOptions(model=str(model)))
    assert (sample_dataset / "a_landscape.txt").read_text() != "my own caption\n"
    res = cli_runner.invoke(cli, ["undo", str(sample_dataset)])
    assert res.exit_code == 0, res.output
    assert captions(sample_dataset) == {"a_landscape.txt": "my own caption\n"}
    assert (sample_dataset / "a_landscape.jpg.json").read_bytes() == sidecar


def test_merge_append_and_keep(sample_dataset, model):
    (sample_dataset / "a_landscape.txt").write_text("mytoken, blue_eyes\n")
    (sample_dataset / "b_portrait.txt").write_text("keep me\n")
    run_tag(sample_dataset, TagOptions(model=str(model), merge="append"))
    text = (sample_dataset / "a_landscape.txt").read_text()
    assert text.startswith("mytoken, blue_eyes, ") and ", blue eyes" not in text
    assert meta(sample_dataset / "a_landscape.jpg")["tag"]["base"] == "mytoken, blue_eyes"
    # other rules later: derived again from the original caption, not from the first result
    rules = CaptionRules(general_threshold=0.99)
    run_tag(sample_dataset, TagOptions(model=str(model), merge="append", rules=rules))
    record = meta(sample_dataset / "a_landscape.jpg")["wd14"]
    tags = caption_from_scores(record, rules)
    expected = "mytoken, blue_eyes" + (", " + tags if tags else "")
    assert (sample_dataset / "a_landscape.txt").read_text() == expected + "\n"
    run_tag(sample_dataset, TagOptions(model=str(model), merge="keep", force=True))
    assert (sample_dataset / "b_portrait.txt").read_text() == "keep me\n"


def test_shards_are_disjoint_and_cover_everything(sample_dataset, model):
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    items = discover(sample_dataset)
    parts = [{i.name for i in items if in_shard(i, sample_dataset, (k, 3))} for k in (1, 2, 3)]
    assert sum(len(p) for p in parts) == 8 and set().union(*parts) == {i.name for i in items}
    r1 = run_tag(sample_dataset, TagOptions(model=str(model), shard=(1, 2)))
    done1 = {p.stem for p in sample_dataset.glob("*.txt")}
    r2 = run_tag(sample_dataset, TagOptions(model=str(model), shard=(2, 2)))
    done2 = {p.stem for p in sample_dataset.glob("*.txt")} - done1
    assert r1.changed + r2.changed == 8 and r1.changed and r2.changed
    assert done1.isdisjoint(done2) and len(done1 | done2) == 8


def test_recursive(sample_dataset, model):
    sub = sample_dataset / "10_sub"
    sub.mkdir()
    shutil.move(sample_dataset / "a_landscape.jpg", sub / "a_landscape.jpg")
    assert run_tag(sample_dataset, TagOptions(model=str(model))).changed == 7
    assert not (sub / "a_landscape.txt").exists()
    result = run_tag(sample_dataset, TagOptions(model=str(model), recursive=True))
    assert (result.changed, result.skipped) == (1, 7) and (sub / "a_landscape.txt").exists()


class Interrupting(wd14.WD14Tagger):
    """Dies (as on Ctrl-C) on its second batch."""

    calls = 0

    def infer(self, batch):
        Interrupting.calls += 1
        if Interrupting.calls == 2:
            raise KeyboardInterrupt
        return super().infer(batch)


def test_interrupted_run_resumes_where_it_stopped(sample_dataset, model):
    Interrupting.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run_tag(sample_dataset, TagOptions(model=str(model), batch_size=3), tagger=Interrupting(str(model)))
    assert len(list(sample_dataset.glob("*.txt"))) == 3
    result = run_tag(sample_dataset, TagOptions(model=str(model), batch_size=3))
    assert result.details["inferred"] == 5 and (result.changed, result.skipped) == (5, 3)


class FakeCaptioner:
    """A Captioner that echoes its prompt, so the test sees what the stage asked."""

    name = "fake:echo"

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def load(self) -> None:
        pass

    def caption(self, images, prompts):
        self.calls.append(list(prompts))
        if self.fail_on is not None and self.fail_on in prompts:
            raise ModelError("server error 500")
        return [f"The image shows a picture {im.size[0]}x{im.size[1]}." for im in images]


def test_captioner_through_the_protocol_with_tags_in_the_prompt(sample_dataset, model):
    fake = FakeCaptioner()
    opts = TagOptions(model=str(model), prompt="Describe. Tags: {tags}", trigger="mytoken", batch_size=4)
    result = run_tag(sample_dataset, opts, captioner=fake)
    assert result.changed == 8 and result.details["captioned"] == 8
    assert len(fake.calls) == 2 and all(p.startswith("Describe. Tags: ") for p in fake.calls[0])
    m = meta(sample_dataset / "a_landscape.jpg")
    assert m["caption"]["text"] == "The image shows a picture 768x512."
    assert m["caption"]["model"] == "fake:echo" and m["caption"]["prompt"] == "Describe. Tags: {tags}"
    tags = caption_from_scores(m["wd14"], CaptionRules())
    assert fake.calls[0][0] == f"Describe. Tags: {tags}"
    # default template "{trigger}, {tags}. {caption}", boilerplate removed
    assert (sample_dataset / "a_landscape.txt").read_text() == f"mytoken, {tags}. A picture 768x512.\n"
    # again: neither model runs; another template re-derives from the stored answer
    again = run_tag(sample_dataset, opts, captioner=fake)
    assert again.skipped == 8 and len(fake.calls) == 2
    opts2 = TagOptions(model=str(model), prompt="Describe. Tags: {tags}", caption_template="{caption}")
    assert run_tag(sample_dataset, opts2, captioner=fake).changed == 8 and len(fake.calls) == 2
    assert (sample_dataset / "a_landscape.txt").read_text() == "A picture 768x512.\n"


def test_a_failing_caption_fails_that_image_only_and_keeps_its_scores(sample_dataset, model):
    assert run_tag(sample_dataset, TagOptions(model=str(model))).changed == 8
    record = meta(sample_dataset / "e_sepia.jpg")["wd14"]
    fake = FakeCaptioner(fail_on=caption_from_scores(record, CaptionRules()))  # e_sepia's prompt fails
    opts = TagOptions(model=str(model), prompt="{tags}", batch_size=8)
    result = run_tag(sample_dataset, opts, captioner=fake)
    assert [(f.path.name, f.reason) for f in result.failed] == [("e_sepia.jpg", "server error 500")]
    assert len(fake.calls) == 1 + 8  # the batch, then image by image
    assert result.changed == 7
    assert "caption" not in meta(sample_dataset / "e_sepia.jpg") and "wd14" in meta(
        sample_dataset / "e_sepia.jpg"
    )
    assert "caption" in meta(sample_dataset / "a_landscape.jpg")


def test_options_are_checked_up_front(sample_dataset, model, cli_runner):
    with pytest.raises(ConfigError, match="general-threshold 0.01 is below the stored score floor 0.05"):
        TagOptions(rules=CaptionRules(general_threshold=0.01))
    res = cli_runner.invoke(cli, ["tag", str(sample_dataset), "--model", str(model), "--prompt", "x {tags}"])
    assert res.exit_code == 1 and res.output == (
        "Error: --prompt needs --captioner\nHint: add --captioner hf:REPO or openai:URL\n"
    )
    res = cli_runner.invoke(cli, ["tag", str(sample_dataset), "--shard", "3/2"])
    assert res.exit_code == 1 and res.output.startswith("Error: shard 3/2 is out of range")
    res = cli_runner.invoke(cli, ["tag", str(sample_dataset), "--captioner", "llava"])
    assert res.exit_code == 1 and 'unknown captioner "llava"' in res.output
    res = cli_runner.invoke(cli, ["tag", str(sample_dataset), "--caption-template", "{tagz}"])
    assert res.exit_code == 1 and "unknown placeholder {tagz}" in res.output


def test_cli_end_to_end_with_rules(sample_dataset, model, cli_runner):
    args = ["-q", "tag", str(sample_dataset), "--model", str(model), "--general-threshold", "0.5"]
    args += ["--rating", "last", "--undesired", "white background, dress", "--keep-underscore"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("tag: 8 changed, 0 skipped, 0 failed\n")
    for text in captions(sample_dataset).values():
        tags = text.strip().split(", ")
        assert tags[-1] in ("general", "sensitive", "questionable", "explicit")
        assert "white_background" not in tags and "dress" not in tags
    assert any("_" in t for t in captions(sample_dataset).values())


def test_the_wd14_path_imports_no_torch_or_transformers(sample_dataset, model):
    code = (
        "import sys\n"
        "from sdprep.cli import main\n"
        f"try:\n    main(['-q', 'tag', {str(sample_dataset)!r}, '--model', {str(model)!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tag: 8 changed" in out and "HEAVY []" in out


def test_scores_do_not_depend_on_the_batch_size_beyond_float_noise(sample_dataset, model, tmp_path):
    other = Path(shutil.copytree(sample_dataset, tmp_path / "other"))
    run_tag(sample_dataset, TagOptions(model=str(model), batch_size=1))
    run_tag(other, TagOptions(model=str(model), batch_size=8))
    for item in discover(sample_dataset):
        a = meta(item.path)["wd14"]["scores"]
        b = meta(other / item.name)["wd14"]["scores"]
        common = set(a) & set(b)
        assert np.allclose([a[t] for t in common], [b[t] for t in common], atol=1e-3)


def test_write_many_journals_first_and_undoes(tmp_path):
    """fileops.Operation.write_many (added for this stage): one sync, same undo as write_bytes."""
    from sdprep import fileops

    (tmp_path / "a.txt").write_text("old a\n")
    with fileops.Journal(tmp_path).begin("tag", ["x"]) as op:
        n = op.write_many([(tmp_path / "a.txt", b"new a\n"), (tmp_path / "b.txt", b"b\n")])
        assert n == 2 and op.write_many([(tmp_path / "b.txt", b"b\n")]) == 0
    assert (tmp_path / "a.txt").read_text() == "new a\n" and (tmp_path / "b.txt").read_text() == "b\n"
    fileops.undo(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "old a\n" and not (tmp_path / "b.txt").exists()


@pytest.fixture
def chat_server():
    """A loopback OpenAI-compatible server answering with the prompt's length; records requests."""
    from loopback import Loopback, Request, Response

    requests: list[dict] = []

    def answer(request: Request) -> Response:
        body = request.json()
        requests.append(body)
        text = body["messages"][-1]["content"][1]["text"]
        return Response.json(
            200,
            {
                "choices": [
                    {"message": {"role": "assistant", "content": f"In this image, {len(text)} chars."}}
                ]
            },
        )

    server = Loopback(answer)
    yield server.url + "/v1", requests
    server.close()


def test_cli_with_an_openai_compatible_captioner(sample_dataset, model, cli_runner, chat_server):
    url, requests = chat_server
    args = ["-q", "tag", str(sample_dataset), "--model", str(model), "--captioner", f"openai:{url}#llava"]
    args += ["--prompt", "Tags: {tags}", "--caption-template", "{caption} {tags}", "--max-new-tokens", "40"]
    args += ["--caption-option", "concurrency=2", "--batch-size", "8"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert len(requests) == 8 and requests[0]["model"] == "llava" and requests[0]["max_tokens"] == 40
    m = meta(sample_dataset / "a_landscape.jpg")
    tags = caption_from_scores(m["wd14"], CaptionRules())
    assert m["caption"]["model"] == f"openai:{url}#llava"
    assert (sample_dataset / "a_landscape.txt").read_text() == f"{len('Tags: ' + tags)} chars. {tags}\n"
    assert cli_runner.invoke(cli, args).output.startswith("tag: 0 changed, 8 skipped")
    assert len(requests) == 8


def test_cli_replace_option_parsing_and_device_list():
    import click

    from sdprep.prep.cli.tag import DEVICES, _replacements

    assert DEVICES == wd14.DEVICES
    # one syntax with clean: A=B (B may list several tags, empty removes)
    assert _replacements(("a=b", "c d=e, f", "x=")) == {"a": ("b",), "c d": ("e", "f"), "x": ()}
    # the older SRC,DST form still reads (with a deprecation note), "=_=" is a tag there
    assert _replacements(("a,b", "c d,e;f\\,g,h", "=_=,smile")) == {
        "a": ("b",),
        "c d": ("e",),
        "f,g": ("h",),
        "=_=": ("smile",),
    }
    with pytest.raises(click.BadParameter):
        _replacements(("a,b,c",))


def test_a_captioner_that_keeps_failing_stops_the_run_but_keeps_the_scores(sample_dataset, model):
    fake = FakeCaptioner()

    def always_fail(images, prompts):
        fake.calls.append(list(prompts))
        raise ModelError("server error 500")

    fake.caption = always_fail
    with pytest.raises(
        ModelError, match=r"captioner fake:echo failed 8 images in a row \(last: server error 500\)"
    ):
        run_tag(sample_dataset, TagOptions(model=str(model), batch_size=4), captioner=fake)
    assert len(fake.calls) == 2 * (1 + 4)  # two batches, each retried image by image
    for item in discover(sample_dataset):
        assert "wd14" in meta(item.path) and "caption" not in meta(item.path)
    # the scores are kept: the next run (without the captioner) needs no inference
    assert run_tag(sample_dataset, TagOptions(model=str(model))).details["inferred"] == 0


def test_the_model_and_provider_lines_print_once(sample_dataset, tiny_wd14, cli_runner):
    """`wd14: ... on ...` and the provider note (no GPU here) were printed live and in the summary."""
    from sdprep.cli import cli

    res = cli_runner.invoke(cli, ["tag", str(sample_dataset), "--model", str(tiny_wd14)])
    assert res.exit_code == 0, res.output
    assert res.output.count("wd14: ") == 1
    assert res.output.count("GPU provider") <= 1


def test_stored_scores_do_not_depend_on_the_batch_size(sample_dataset, tiny_wd14, tmp_path):
    """Batch 1 and batch 4 (and a resumed run, which batches what is left) store the same bytes.

    With one call per batch the tiny tagger's scores were up to ~1e-3 apart: onnxruntime's
    ReduceMean sums its 200,704 values per image in an order that depends on the batch."""
    other = Path(shutil.copytree(sample_dataset, tmp_path / "other"))
    run_tag(sample_dataset, TagOptions(model=str(tiny_wd14), batch_size=1))
    run_tag(other, TagOptions(model=str(tiny_wd14), batch_size=4))
    sidecars = sorted(p.name for p in sample_dataset.glob("*.json"))
    assert len(sidecars) == 8
    for name in sidecars:
        assert (sample_dataset / name).read_bytes() == (other / name).read_bytes(), name
    assert captions(sample_dataset) == captions(other)


def test_infer_runs_each_image_alone(tiny_wd14):
    tagger = wd14.WD14Tagger(str(tiny_wd14))
    rng = np.random.default_rng(3)
    batch = rng.uniform(0, 255, (4, 448, 448, 3)).astype(np.float32)
    together = tagger.infer(batch)
    alone = np.concatenate([tagger.infer(batch[i : i + 1]) for i in range(4)])
    assert together.shape == (4, len(tagger.vocab.names))
    assert np.array_equal(together, alone)


def test_run_tag_builds_its_tagger_through_the_registry(sample_dataset, model, monkeypatch):
    """`sdprep tag` takes its model from the tagger registry (taggers/registry.py), not a class of
    its own: what the "wd14" scheme makes is what tags the images, with --device and the floor."""
    from sdprep.taggers.base import TAGGERS

    made: list[tuple[str, dict]] = []

    def factory(spec: str, **options):
        made.append((spec, options))
        return wd14.WD14Tagger(spec, **options)

    monkeypatch.setitem(TAGGERS._factories, "wd14", factory)
    result = run_tag(sample_dataset, TagOptions(model=str(model), device="cpu", floor=0.1))
    assert (result.changed, result.failed) == (8, [])
    assert made == [(str(model), {"device": "cpu", "floor": 0.1})]


def test_a_model_that_is_not_wd14_is_refused_before_any_image(sample_dataset, monkeypatch):
    """tag reads WD14's input size and sidecar record: a registry answer of another kind is a
    ConfigError naming the model, and nothing is written."""

    class OtherTagger:
        name = "other:model"

    monkeypatch.setattr("sdprep.prep.tag.create_tagger", lambda spec, **kw: OtherTagger())
    before = sorted(p.name for p in sample_dataset.iterdir())
    with pytest.raises(ConfigError, match="--model other:model: sdprep tag runs WD14 models only"):
        run_tag(sample_dataset, TagOptions(model="other:model"))
    assert sorted(p.name for p in sample_dataset.iterdir()) == before
