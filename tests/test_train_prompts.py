"""kohya sample prompt files and sampler names -> diffusers schedulers."""

from __future__ import annotations

import pytest

from sdprep.errors import ConfigError
from sdprep.train.sample.prompts import (
    SAMPLERS,
    SamplePrompt,
    check_sampler,
    load_prompts,
    make_scheduler,
    parse_prompt_line,
    parse_prompt_text,
)

# Seed 001's prompt.txt, as written (blank lines between prompts).
SEED_001_PROMPTS = """\
zhuoyue, BMT, a soldier in green standing in front of a sign that says WELCOME TO PULAU TEKONG --n ugly, deformed, mutated, disfigured --w 832 --h 1216 --d 1 --l 7 --s 28

zhuoyue, a man wearing a big fluffy white down jacket in Italy --n ugly, deformed, mutated, disfigured --w 832 --h 1216 --d 1 --l 7 --s 28

yuai in green military uniform standing in front of a sign that says WELCOME TO PULAU TEKONG --n ugly, deformed, mutated, disfigured --w 832 --h 1216 --d 1 --l 7 --s 28

yuai smiling at the carema posing as there is a plate of food infront of him --n ugly, deformed, mutated, disfigured --w 832 --h 1216 --d 1 --l 7 --s 28

a portrait of yuai --n ugly, deformed, mutated, disfigured --w 1024 --h 1024 --d 1 --l 7 --s 28
"""

# Seed 000 style: a textual-inversion trigger, comments, per-prompt sampler.
SEED_000_PROMPTS = """\
# samples for yourtoken
yourtoken, 1girl, bust portrait, looking at viewer --w 1024 --h 1536 --d 42 --s 30 --ss k_dpm_2
   # indented comment
yourtoken, red ribbon top, close-up portrait --n lowres, blurry --l 5.5 --ss Euler_A
"""


def test_seed_001_prompt_file():
    prompts = parse_prompt_text(SEED_001_PROMPTS)
    assert len(prompts) == 5
    first = prompts[0]
    assert first == SamplePrompt(
        prompt="zhuoyue, BMT, a soldier in green standing in front of a sign that says WELCOME TO PULAU TEKONG",
        negative_prompt="ugly, deformed, mutated, disfigured",
        width=832,
        height=1216,
        seed=1,
        scale=7.0,
        steps=28,
        sampler=None,
        line=1,
    )
    assert [p.line for p in prompts] == [1, 3, 5, 7, 9]
    assert (prompts[4].prompt, prompts[4].width, prompts[4].height) == ("a portrait of yuai", 1024, 1024)


def test_seed_000_style_prompts_with_comments_and_samplers(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(SEED_000_PROMPTS)
    prompts = load_prompts(path, defaults=SamplePrompt(prompt="", steps=20, width=1024, height=1024))
    assert len(prompts) == 2
    a, b = prompts
    assert (a.prompt, a.width, a.height, a.seed, a.steps, a.sampler, a.line) == (
        "yourtoken, 1girl, bust portrait, looking at viewer",
        1024,
        1536,
        42,
        30,
        "k_dpm_2",
        2,
    )
    assert (b.negative_prompt, b.scale, b.sampler, b.steps, b.seed, b.width) == (
        "lowres, blurry",
        5.5,
        "euler_a",
        20,
        None,
        1024,
    )


def test_sizes_and_steps_are_clamped_like_kohya():
    p = parse_prompt_line("x --w 1030 --h 20 --s 5000")
    assert (p.width, p.height, p.steps) == (1024, 64, 1000)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --x 3", 'prompt line 4: unknown option "--x"'),
        ("a cat --w wide", 'prompt line 4: --w expects a number (width), got "wide"'),
        ("a cat --ss eulr", 'unknown sampler "eulr"'),
        ("a cat --n", "prompt line 4: --n needs a value (negative prompt)"),
        (" --w 512", "prompt line 4: the prompt text is empty"),
    ],
)
def test_bad_prompt_lines(line, message):
    with pytest.raises(ConfigError) as exc:
        parse_prompt_line(line, lineno=4)
    assert message in exc.value.message


def test_unknown_option_suggests():
    with pytest.raises(ConfigError) as exc:
        parse_prompt_line("a cat --sss euler")
    assert exc.value.hint.startswith('did you mean "--ss"?')


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("ok prompt\nbad --q 1\n")
    with pytest.raises(ConfigError, match=r"p\.txt: prompt line 2: unknown option"):
        load_prompts(path)
    with pytest.raises(ConfigError, match="prompt file not found"):
        load_prompts(tmp_path / "missing.txt")


def test_toml_and_json_prompt_files(tmp_path):
    toml_path = tmp_path / "prompts.toml"
    toml_path.write_text(
        '[prompt]\nwidth = 832\nsample_steps = 12\nnegative_prompt = "bad"\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n'
        '[[prompt.subset]]\nprompt = "a dog"\nsample_sampler = "dpmsolver++"\n'
    )
    a, b = load_prompts(toml_path)
    assert (a.prompt, a.width, a.steps, a.seed, a.negative_prompt) == ("a cat", 832, 12, 3, "bad")
    assert (b.prompt, b.sampler) == ("a dog", "dpmsolver++")
    json_path = tmp_path / "prompts.json"
    json_path.write_text('[{"prompt": "a cat", "scale": 4}, "a dog --w 512"]')
    c, d = load_prompts(json_path)
    assert (c.prompt, c.scale, d.prompt, d.width) == ("a cat", 4.0, "a dog", 512)
    json_path.write_text('[{"promt": "a cat"}]')
    with pytest.raises(ConfigError, match='unknown key "promt"'):
        load_prompts(json_path)


EXPECTED = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


def test_every_kohya_sampler_makes_its_diffusers_scheduler():
    from diffusers import EulerDiscreteScheduler

    from sdprep.train.models.fullsize import SCHEDULER

    base = EulerDiscreteScheduler(**{**SCHEDULER, "prediction_type": "v_prediction"}).config
    assert set(SAMPLERS) == set(EXPECTED)
    for name, cls_name in EXPECTED.items():
        sched = make_scheduler(name.upper() if name == "euler_a" else name, base)
        assert type(sched).__name__ == cls_name, name
        assert sched.config.beta_end == 0.012 and sched.config.beta_schedule == "scaled_linear"
        assert sched.config.prediction_type == "v_prediction", name  # carried over from the model
        sched.set_timesteps(4)
    assert make_scheduler("dpmsolver", base).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", base).config.algorithm_type == "dpmsolver++"


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(ConfigError) as exc:
        check_sampler("euler_ancestral")
    assert exc.value.message == 'unknown sampler "euler_ancestral"'
    assert (
        "valid: ddim, dpm_2, dpm_2_a, dpmsingle, dpmsolver, dpmsolver++, euler, euler_a, heun"
        in exc.value.hint
    )
