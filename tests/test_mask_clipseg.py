"""clipseg through the real transformers classes, on a tiny random CLIPSeg model saved by the test."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ModelError
from sdprep.images import load_image
from sdprep.prep.mask import MaskOptions, run_mask
from sdprep.prep.masks import MethodSettings, create_method
from sdprep.prep.masks.postprocess import PostOptions


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory) -> Path:
    """A CLIPSeg folder laid out like the hub repo: config + weights, CLIP tokenizer, ViT preprocessor."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer, ViTImageProcessor

    from sdprep.train.models.tiny import write_clip_tokenizer

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("clipseg") / "tiny-clipseg"
    vocab = write_clip_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(folder)
    assert len(tok) == vocab
    torch.manual_seed(0)
    config = CLIPSegConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        reduce_dim=16,
        extract_layers=[1, 2],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    # the hub repo's image processor is a ViTImageProcessor (352 px there); transformers falls back to PIL
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(folder)
    return folder


def reference(folder: Path, image: Image.Image, prompts: list[str]) -> np.ndarray:
    """What the product should compute, written out directly with transformers."""
    import cv2
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    processor = CLIPSegProcessor.from_pretrained(folder)
    model = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    probs = []
    for prompt in prompts:
        inputs = processor(text=[prompt], images=[image], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        probs.append(torch.sigmoid(logits).reshape(logits.shape[-2:]).numpy())
    w, h = image.size
    return cv2.resize(np.max(probs, axis=0), (w, h), interpolation=cv2.INTER_LINEAR)


def test_clipseg_method_matches_transformers(tiny_clipseg):
    path = Path(__file__).resolve().parent.parent / "sample_data" / "images" / "a_landscape.jpg"
    image = load_image(path)
    method = create_method("clipseg", MethodSettings(prompts=("head", "sky"), model=str(tiny_clipseg)))
    method.load()
    mask = method.make(image, Item(path))
    assert mask.dtype == np.float32 and mask.shape == (512, 768)
    assert mask.min() >= 0.0 and mask.max() <= 1.0 and mask.std() > 0
    np.testing.assert_allclose(mask, reference(tiny_clipseg, image, ["head", "sky"]), atol=1e-5)
    one = create_method("clipseg", MethodSettings(prompts=("head",), model=str(tiny_clipseg)))
    one.load()
    assert np.all(mask >= one.make(image, Item(path)) - 1e-6)  # several prompts: the max
    assert method.options() == {"model": str(tiny_clipseg), "prompts": ["head", "sky"]}


def test_clipseg_stage_writes_soft_masks_and_thresholds(tiny_clipseg, sample_dataset):
    settings = MethodSettings(prompts=("head",), model=str(tiny_clipseg))
    res = run_mask(sample_dataset, MaskOptions("clipseg", settings=settings))
    assert (res.changed, len(res.failed)) == (8, 0)
    mask = np.asarray(Image.open(sample_dataset / "masks" / "b_portrait.png"))
    assert mask.shape == (768, 512) and len(np.unique(mask)) > 10  # soft probabilities
    sidecar = json.loads((sample_dataset / "b_portrait.png.json").read_text())
    assert sidecar["sdprep"]["mask"]["options"] == {"model": str(tiny_clipseg), "prompts": ["head"]}
    median = float(np.median(mask)) / 255
    res = run_mask(
        sample_dataset,
        MaskOptions("clipseg", settings=settings, post=PostOptions(threshold=median)),
    )
    assert res.changed + len(res.failed) == 8
    hard = np.asarray(Image.open(sample_dataset / "masks" / "b_portrait.png"))
    assert set(np.unique(hard).tolist()) <= {0, 255}


def test_clipseg_missing_or_broken_models(tiny_clipseg, tmp_path):
    with pytest.raises(ModelError) as err:
        create_method("clipseg", MethodSettings(prompts=("head",), model="nobody/no-such-clipseg")).load()
    assert str(err.value).startswith(
        'cannot load the CLIPSeg model "nobody/no-such-clipseg" from the Hugging Face hub'
    )
    assert "--model FOLDER" in err.value.hint
    with pytest.raises(ModelError, match="no config.json"):
        create_method("clipseg", MethodSettings(prompts=("head",), model=str(tmp_path / "nothing"))).load()
    # the folder without vocab files: transformers would quietly build a 3-token tokenizer
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clipseg, broken)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match=r"the CLIPSeg tokenizer of .* has only \d tokens"):
        create_method("clipseg", MethodSettings(prompts=("head",), model=str(broken))).load()
