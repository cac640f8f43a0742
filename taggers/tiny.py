"""A tiny WD14-shaped ONNX tagger built offline: same input/output contract as SmilingWolf's models.

Input NHWC float32 `[batch, 448, 448, 3]` (BGR, 0..255), output sigmoid scores `[batch, N]` in the
order of `selected_tags.csv` (4 rating rows first). The "model" is a fixed linear map of the mean
colour and a coarse 4x4 colour layout, so different images get different, deterministic scores. It
is for tests and the demo; real runs load a real model from the hub or a folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

RATINGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL = [
    "1girl",
    "solo",
    "long_hair",
    "short_hair",
    "blue_eyes",
    "pink_hair",
    "smile",
    "looking_at_viewer",
    "simple_background",
    "white_background",
    "outdoors",
    "sky",
    "cloud",
    "tree",
    "greyscale",
    "monochrome",
    "dress",
    "shirt",
    "upper_body",
    "red_theme",
    "blue_theme",
    "green_theme",
    "^_^",
    "open_mouth",
    "(artist)_style",
    "no_humans",
    "landscape",
    "portrait",
    "blurry",
    "black_hair",
]
CHARACTER = ["hatsune_miku", "nazuna_(yofukashi_no_uta)", "kirisame_marisa"]
SIZE = 448


def write_selected_tags(path: Path) -> list[tuple[str, int]]:
    """Write `selected_tags.csv` (header tag_id,name,category,count) and return (name, category) rows."""
    rows = [(t, 9) for t in RATINGS] + [(t, 0) for t in GENERAL] + [(t, 4) for t in CHARACTER]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(rows):
            w.writerow([100000 + i, name, cat, 1000 - i])
    return rows


def build_tiny_wd14(out_dir: Path | str, seed: int = 0, input_name: str = "input") -> Path:
    """Save `model.onnx` + `selected_tags.csv` in `out_dir` (v3 input name "input", v2 "input_1:0")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = write_selected_tags(out_dir / "selected_tags.csv")
    n = len(rows)
    rng = np.random.default_rng(seed)
    features = 3 + 3 * 16  # mean BGR + a 4x4 grid of mean BGR
    weight = (rng.standard_normal((features, n)) * 0.04).astype(np.float32)
    bias = rng.uniform(-2.5, 0.5, n).astype(np.float32)
    scale = np.array([1 / 255.0], dtype=np.float32)

    nodes = [
        helper.make_node("Mul", [input_name, "scale"], ["x01"]),
        # global mean over H, W -> [B, 3]
        helper.make_node("ReduceMean", ["x01", "axes_hw"], ["gmean"], keepdims=0),
        # 4x4 grid: reshape [B,4,112,4,112,3] -> mean over 112s -> [B, 48]
        helper.make_node("Reshape", ["x01", "grid_shape"], ["grid"]),
        helper.make_node("ReduceMean", ["grid", "axes_grid"], ["gridmean"], keepdims=0),
        helper.make_node("Reshape", ["gridmean", "flat_shape"], ["gridflat"]),
        helper.make_node("Concat", ["gmean", "gridflat"], ["feat"], axis=1),
        # centre features so a mid-grey image sits near the bias
        helper.make_node("Sub", ["feat", "half"], ["featc"]),
        helper.make_node("MatMul", ["featc", "weight_scaled"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    inits = [
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes_hw"),
        numpy_helper.from_array(np.array([-1, 4, SIZE // 4, 4, SIZE // 4, 3], dtype=np.int64), "grid_shape"),
        numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "axes_grid"),
        numpy_helper.from_array(np.array([-1, 48], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
        numpy_helper.from_array(weight * 60.0, "weight_scaled"),
        numpy_helper.from_array(bias, "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd14",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="sdprep-tiny")
    model.ir_version = 9  # onnxruntime 1.31 reads at most IR 13; onnx 1.23 writes 14 by default
    onnx.checker.check_model(model)
    onnx.save(model, str(out_dir / "model.onnx"))
    (out_dir / "SDPREP_TINY_DEMO_TAGGER.txt").write_text(
        "A tiny WD14-shaped tagger with RANDOM weights, made by sdprep for tests and demos.\n"
    )
    return out_dir
