import numpy as np


def test_tiny_sdxl_loads_offline_with_real_tokenizers(tiny_sdxl):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    assert len(pipe.tokenizer) > 500 and len(pipe.tokenizer_2) == len(pipe.tokenizer)
    ids = pipe.tokenizer("a photo of blue hair").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 7
    assert pipe.tokenizer_2.pad_token_id == 0
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    # SGM layout: 3 down blocks, transformer depth (1,1,2) as in the real model's shape
    assert (
        len(pipe.unet.down_blocks) == 3
        and len(pipe.unet.down_blocks[2].attentions[0].transformer_blocks) == 2
    )
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    with torch.no_grad():
        out = pipe("a photo", num_inference_steps=2, width=64, height=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_tiny_wd14_runs_in_onnxruntime(tiny_wd14):
    import csv

    import onnxruntime as ort

    with open(tiny_wd14 / "selected_tags.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows[:4]] == ["9"] * 4
    sess = ort.InferenceSession(str(tiny_wd14 / "model.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.name == "input" and inp.shape[1:] == [448, 448, 3]
    x = np.stack([np.full((448, 448, 3), v, np.float32) for v in (0, 255)])
    y = sess.run(None, {"input": x})[0]
    assert y.shape == (2, len(rows)) and ((y >= 0) & (y <= 1)).all()
    assert not np.allclose(y[0], y[1])
