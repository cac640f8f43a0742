"""hf: captioners on a tiny random LLaVA built offline and loaded through `load_captioner`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdprep.errors import ConfigError, ModelError
from sdprep.taggers.captioners import load_captioner, option_names

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

WORDS = [
    "a",
    "an",
    "the",
    "image",
    "shows",
    "of",
    "cat",
    "dog",
    "girl",
    "with",
    "hair",
    "blue",
    "red",
    "sky",
    "tree",
    "in",
    "this",
    "describe",
    "tags",
    ",",
    ".",
    ":",
]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "SYSTEM:"]
# llava-1.5 style: "USER: <image>\n{prompt} ASSISTANT:", with an optional system turn
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}SYSTEM: {% for c in m['content'] %}{{ c['text'] }} {% endfor %}"
    "{% elif m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8


def build_tiny_llava(folder: Path) -> Path:
    """A random LlavaForConditionalGeneration + LlavaProcessor saved with save_pretrained (~1 s)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    try:
        import torchvision  # noqa: F401

        image_processor_cls = transformers.CLIPImageProcessor
    except ImportError:
        image_processor_cls = transformers.CLIPImageProcessorPil
    image_processor = image_processor_cls(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,  # patch tokens; the CLS token is dropped
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava")


@pytest.fixture(scope="module")
def captioner(tiny_llava: Path):
    cap = load_captioner("hf:" + str(tiny_llava), max_new_tokens=5, device="cpu")
    cap.load()
    return cap


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 64), (200, 20, 20)), Image.new("RGB", (120, 48), (20, 40, 220))]


PROMPTS = ["describe the image", "describe this image with tags : girl , blue hair , sky"]


def test_batch_of_two_sizes_matches_single_generation(captioner):
    batch = captioner.caption(images(), PROMPTS)
    assert len(batch) == 2
    singles = [captioner.caption([im], [p])[0] for im, p in zip(images(), PROMPTS)]
    assert batch == singles  # left padding: the shorter prompt does not change its answer
    assert captioner.caption(images(), PROMPTS) == batch  # greedy decoding is deterministic
    for text in batch:
        assert text and text == text.strip()
        # only the new tokens are decoded: the prompts alone are longer than 5 words
        assert len(text.split()) <= 5


def test_loaded_through_auto_classes_with_left_padding(captioner, tiny_llava):
    assert type(captioner.model).__name__ == "LlavaForConditionalGeneration"
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.name == f"hf:{tiny_llava.resolve()}"
    assert captioner.dtype == torch.float32 and captioner.device == "cpu"
    assert captioner.settings == {"max_new_tokens": 5, "temperature": 0.0}


def test_chat_template_and_system_prompt(captioner, tiny_llava):
    assert captioner.build_text("describe the image") == "USER: <image> describe the image ASSISTANT:"
    with_system = load_captioner("hf:" + str(tiny_llava), system_prompt="a cat")
    with_system.processor = captioner.processor
    assert with_system.build_text("describe") == "SYSTEM: a cat USER: <image> describe ASSISTANT:"
    assert with_system.settings["system_prompt"] == "a cat"


def test_without_chat_template_the_image_token_is_prefixed(tiny_llava):
    cap = load_captioner("hf:" + str(tiny_llava), max_new_tokens=3)
    cap.load()
    cap.processor.chat_template = None
    cap.processor.tokenizer.chat_template = None
    assert cap.build_text("describe the image") == "<image>\ndescribe the image"
    assert cap.build_text("<image> describe") == "<image> describe"
    out = cap.caption(images()[:1], ["describe the image"])
    assert len(out) == 1 and len(out[0].split()) <= 3


# JoyCaption-style (Llama 3): string content, the template inserts the image token itself
STRING_TEMPLATE_WITH_IMAGE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['role'] == 'user' %}<image> {% endif %}"
    "{{ m['content'] | trim }} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# older ports: string content, the caller must put the image token in the text
STRING_TEMPLATE_PLAIN = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (STRING_TEMPLATE_WITH_IMAGE, "SYSTEM: a cat USER: <image> describe the image ASSISTANT:"),
        (STRING_TEMPLATE_PLAIN, "SYSTEM: a cat USER: <image>\ndescribe the image ASSISTANT:"),
    ],
)
def test_string_content_chat_templates(tiny_llava, template, expected):
    cap = load_captioner("hf:" + str(tiny_llava), max_new_tokens=3, system_prompt="a cat")
    cap.load()
    cap.processor.chat_template = template
    assert cap.build_text("describe the image") == expected
    assert len(cap.caption(images(), PROMPTS)) == 2


def test_sampling_runs_and_bad_sizes_are_errors(tiny_llava):
    cap = load_captioner("hf:" + str(tiny_llava), max_new_tokens=4, temperature=0.8, top_p=0.9)
    torch.manual_seed(1)
    out = cap.caption(images(), PROMPTS)  # load() happens on first use
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert cap.settings == {"max_new_tokens": 4, "temperature": 0.8, "top_p": 0.9}
    assert cap.caption([], []) == []
    with pytest.raises(ConfigError, match="2 images but 1 prompts"):
        cap.caption(images(), PROMPTS[:1])


def test_rgba_and_grey_images_are_converted(captioner):
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 128))
    grey = Image.new("L", (30, 70), 128)
    assert len(captioner.caption([rgba, grey], PROMPTS)) == 2


def test_missing_folder_and_offline_hub_id(tmp_path: Path, monkeypatch):
    with pytest.raises(ModelError) as err:
        load_captioner("hf:" + str(tmp_path / "nope"))
    assert str(err.value).startswith(f"model folder {tmp_path / 'nope'} does not exist")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    cap = load_captioner("hf:someone/not-cached-vlm")
    with pytest.raises(ModelError) as err:
        cap.load()
    assert err.value.message == (
        "hf:someone/not-cached-vlm: not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)"
    )
    assert "hf download someone/not-cached-vlm --local-dir DIR" in err.value.hint
    assert "--captioner hf:DIR" in err.value.hint


def test_folder_without_model_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    cap = load_captioner("hf:" + str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="cannot load the model folder") as err:
        cap.load()
    assert "config.json" in err.value.hint


def test_four_bit_needs_gpu_and_bitsandbytes(tiny_llava):
    cap = load_captioner("hf:" + str(tiny_llava), load_in_4bit=True)
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: 4-bit may load here")
    with pytest.raises(ModelError, match=r"^4-bit loading needs a CUDA GPU") as err:
        cap.load()
    assert "drop the 4-bit option" in err.value.hint
    assert cap.model is None


def test_option_errors(tiny_llava):
    spec = "hf:" + str(tiny_llava)
    with pytest.raises(ConfigError, match='option "model" does not apply to hf: captioners'):
        load_captioner(spec, model="llava")
    with pytest.raises(ConfigError, match='unknown captioner option "max_new_tokns"') as err:
        load_captioner(spec, max_new_tokns=3)
    assert 'did you mean "max_new_tokens"?' in err.value.hint
    with pytest.raises(ConfigError, match='unknown dtype "fp16"'):
        load_captioner(spec, dtype="fp16")
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        load_captioner(spec, max_new_tokens=0)
    with pytest.raises(ConfigError, match='unknown captioner "llava-hf/llava-1.5-7b-hf"') as err:
        load_captioner("llava-hf/llava-1.5-7b-hf")
    assert err.value.hint.startswith("for a transformers model write hf:llava-hf/llava-1.5-7b-hf")
    # None values are ignored so a CLI can pass every flag it has
    assert load_captioner(spec, model=None, temperature=None).options.temperature == 0.0
    assert "load_in_4bit" in option_names()["hf"] and "api_key_env" in option_names()["openai"]


def test_creating_captioners_imports_no_torch():
    code = (
        "import sys\n"
        "from sdprep.taggers.captioners import load_captioner\n"
        "load_captioner('hf:someone/model'); load_captioner('openai:http://127.0.0.1:9/v1#m')\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_bfloat16_on_cpu(tiny_llava):
    cap = load_captioner("hf:" + str(tiny_llava), max_new_tokens=3, dtype="bfloat16", device="cpu")
    out = cap.caption(images(), PROMPTS)
    assert cap.model.dtype == torch.bfloat16 and len(out) == 2
