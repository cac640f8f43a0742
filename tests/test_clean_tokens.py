"""CLIP token audit and --max-tokens trimming with a real (tiny) CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdprep.cli import cli
from sdprep.errors import ModelError
from sdprep.prep.clean import CleanOptions, run_clean
from sdprep.prep.monochrome import MonochromeSettings
from sdprep.prep.rules import CleanRules
from sdprep.prep.tokens import DEFAULT_TOKENIZER, TokenAudit, load_tokenizer

HINT = (
    "Hint: pass --tokenizer with a local folder: an SDXL diffusers model (its tokenizer/ subfolder is used) "
    "or a folder holding vocab.json and merges.txt (or tokenizer.json)"
)


def test_loads_the_model_folders_tokenizer(tiny_sdxl: Path):
    from transformers import CLIPTokenizer

    count = load_tokenizer(tiny_sdxl)
    assert count.source == str(tiny_sdxl / "tokenizer")
    direct = CLIPTokenizer.from_pretrained(tiny_sdxl / "tokenizer")
    text = "nazuna, 1girl, solo, long hair, looking at viewer"
    assert count(text) == len(direct(text)["input_ids"]) - 2 > 5  # without start / end tokens
    assert load_tokenizer(tiny_sdxl / "tokenizer")(text) == count(text)


def test_missing_tokenizers_are_clear_model_errors(tmp_path: Path, tiny_sdxl: Path):
    with pytest.raises(ModelError) as exc:
        load_tokenizer("sdprep-tests/no-such-model")
    assert str(exc.value) == (
        'cannot load the CLIP tokenizer "sdprep-tests/no-such-model": offline (HF_HUB_OFFLINE=1) '
        f"and not in the local Hugging Face cache\n{HINT}"
    )
    assert DEFAULT_TOKENIZER == "stabilityai/stable-diffusion-xl-base-1.0"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no CLIP tokenizer in it or in its tokenizer/ folder"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ModelError, match="a file holds no tokenizer"):
        load_tokenizer(tiny_sdxl / "model_index.json")


def test_a_tokenizer_without_a_real_vocabulary_is_refused(tmp_path: Path):
    """transformers 5 loads such folders as a 2-3 token tokenizer instead of failing."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelError) as exc:
        load_tokenizer(folder)
    assert str(exc.value).startswith(f"{folder}: the tokenizer loaded has only 3 tokens, so it is not a CLIP")


def test_audit_counts_limits_and_longest():
    audit = TokenAudit()
    for i, n in enumerate([10, 80, 160, 230, 5, 75]):
        audit.add(f"{i}.txt", n)
    assert audit.lines() == [
        "tokens: 6 captions, mean 93.3, max 230; 3 over 75, 2 over 150, 1 over 225",
        "  230 tokens: 3.txt",
        "  160 tokens: 2.txt",
        "  80 tokens: 1.txt",
    ]
    assert audit.as_dict()["over"] == {"75": 3, "150": 2, "225": 1}


OFF = MonochromeSettings(enabled=False)


def test_clean_audit_reports_token_lengths(cli_runner, sample_dataset: Path, tiny_sdxl: Path):
    args = ["clean", str(sample_dataset), "--trigger", "nazuna", "--no-monochrome", "--audit-tokens"]
    res = cli_runner.invoke(cli, [*args, "--tokenizer", str(tiny_sdxl)])
    assert res.exit_code == 0, res.output
    count = load_tokenizer(tiny_sdxl)
    lengths = {p.name: count(p.read_text().strip()) for p in sample_dataset.glob("*.txt")}
    line = next(x for x in res.output.splitlines() if x.startswith("tokens: "))
    assert line.startswith(
        f"tokens: 8 captions, mean {sum(lengths.values()) / 8:.1f}, max {max(lengths.values())}; "
    )
    missing = cli_runner.invoke(cli, args)
    assert missing.exit_code == 1
    assert missing.output.startswith(f'Error: cannot load the CLIP tokenizer "{DEFAULT_TOKENIZER}": offline')


def test_max_tokens_trims_lowest_ranked_tags_to_fit(sample_dataset: Path, tiny_sdxl: Path):
    budget = 30
    rules = CleanRules(
        trigger=("nazuna",), keep=("solo",), max_tokens=budget, tokenizer=str(tiny_sdxl), monochrome=OFF
    )
    result = run_clean(sample_dataset, CleanOptions(rules))
    count = load_tokenizer(tiny_sdxl)
    texts = {p.name: p.read_text().strip() for p in sample_dataset.glob("*.txt")}
    assert all(count(t) <= budget for t in texts.values()), texts
    assert all(t.startswith("nazuna, ") and "solo" in t.split(", ") for t in texts.values())
    # without scores the tags at the end go first: what is left is the caption's beginning
    full = "nazuna (yofukashi no uta), 1girl, pink hair, blue eyes, looking at viewer, simple background"
    left = [t for t in texts["b_portrait.txt"].split(", ") if t not in ("nazuna", "solo")]
    assert left == full.split(", ")[: len(left)] and len(left) < 6
    assert any(n.startswith("trimmed tags to fit max_tokens in ") for n in result.notes)
    assert result.details["tokens"]["over"]["75"] == 0
    again = run_clean(sample_dataset, CleanOptions(rules))
    assert again.changed == 0


def test_max_tokens_trims_by_score(sample_dataset: Path, tiny_sdxl: Path):
    side = sample_dataset / "a_landscape.jpg.json"
    data = json.loads(side.read_text())
    scores = {"1girl": 0.99, "solo": 0.95, "smile": 0.3, "outdoors": 0.8, "sky": 0.4, "dress": 0.9}
    data["sdprep"] = {"wd14": {"model": "t", "scores": scores, "categories": {}, "rating": {}}}
    side.write_text(json.dumps(data))
    (sample_dataset / "a_landscape.txt").write_text("1girl, solo, smile, outdoors, sky, dress\n")
    count = load_tokenizer(tiny_sdxl)
    budget = count("1girl, solo, outdoors, dress")
    rules = CleanRules(max_tokens=budget, tokenizer=str(tiny_sdxl), monochrome=OFF)
    run_clean(sample_dataset, CleanOptions(rules))
    assert (sample_dataset / "a_landscape.txt").read_text() == "1girl, solo, outdoors, dress\n"


def test_captions_stats_with_tokenizer(cli_runner, sample_dataset: Path, tiny_sdxl: Path):
    (sample_dataset / "a_landscape.txt").write_text("1girl, solo\n")
    res = cli_runner.invoke(cli, ["captions", "stats", str(sample_dataset), "--tokenizer", str(tiny_sdxl)])
    assert res.exit_code == 0, res.output
    n = load_tokenizer(tiny_sdxl)("1girl, solo")
    assert f"tokens: 1 captions, mean {n:.1f}, max {n}; 0 over 75, 0 over 150, 0 over 225" in res.output


def test_a_path_that_does_not_exist_is_not_taken_as_a_hub_id(tmp_path: Path, monkeypatch):
    """`--tokenizer /nonexistent`: 'no such folder' at once, not a hub lookup of "/nonexistent"."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub lookup of {args}")

    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", no_hub)
    for spec in ("/nonexistent", str(tmp_path / "a" / "b"), "./models/sdxl", "~/no-such-model"):
        with pytest.raises(ModelError) as exc:
            load_tokenizer(spec)
        assert str(exc.value).startswith(f"{spec}: no such folder (and not a hub repo id such as ")


def test_an_unreachable_hub_is_not_retried(tmp_path: Path, monkeypatch):
    """Not offline, but the hub's host refuses: only the local cache is looked at (no retries)."""
    import transformers

    calls = []
    real = transformers.CLIPTokenizer.from_pretrained.__func__

    def spy(cls, spec, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(cls, spec, **kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", classmethod(spy))
    with pytest.raises(ModelError) as exc:
        load_tokenizer("sdprep-tests/no-such-model")
    assert "the hub cannot be reached and not in the local Hugging Face cache" in str(exc.value)
    assert calls and all(calls)  # every attempt was local_files_only=True


def test_report_counts_tokens_with_the_models_tokenizer(sample_dataset: Path, tiny_sdxl: Path, cli_runner):
    """The report's --tokenizer: token lengths per caption and a table (it crashed with a TypeError)."""
    (sample_dataset / "b_portrait.txt").write_text("nazuna, 1girl, solo, long hair\n")
    out = sample_dataset.parent / "r.json"
    res = cli_runner.invoke(
        cli,
        ["report", str(sample_dataset), "--tokenizer", str(tiny_sdxl), "--format", "json", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    rows = {Path(r["path"]).name: r for r in doc["images"]}
    expected = load_tokenizer(tiny_sdxl)("nazuna, 1girl, solo, long hair")
    assert rows["b_portrait.png"]["tokens"] == expected > 4
    assert doc["summary"]["token_lengths"][0] == ["<=75", 1]
    bad = cli_runner.invoke(cli, ["report", str(sample_dataset), "--tokenizer", "/nonexistent"])
    assert bad.exit_code == 1 and "Error: /nonexistent: no such folder" in bad.output
