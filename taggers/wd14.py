"""SmilingWolf's WD14 taggers through onnxruntime: model lookup, kohya's preprocessing, raw scores.

A model is a folder with `model.onnx` + `selected_tags.csv`, given as a local folder or as a hub repo
id fetched by huggingface_hub into its usual cache (downloads resume; a file only appears in the
cache once it is complete, so a broken download never poisons later runs). onnxruntime and OpenCV
are imported on first use, never torch or transformers.

What the tagger produces is a *record* kept in the image's sidecar: every tag scoring at least
`floor`, its category, the 4 rating scores and the MCut thresholds of the full score vectors.
Captions are derived from that record later (taggers/rules.py), so changing a threshold never needs
the model again.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from sdprep.errors import ModelError
from sdprep.hub import hub_offline, hub_reachable, is_hub_id
from sdprep.taggers.base import (
    CATEGORY_ARTIST,
    CATEGORY_CHARACTER,
    CATEGORY_COPYRIGHT,
    CATEGORY_GENERAL,
    CATEGORY_META,
    CATEGORY_RATING,
    TAGGERS,
    TagScores,
)
from sdprep.taggers.rules import mcut_threshold

if TYPE_CHECKING:
    import onnxruntime as ort  # no type information: these names are Any to mypy

OWNER = "SmilingWolf"
V3_MODELS = (
    "wd-swinv2-tagger-v3",
    "wd-vit-tagger-v3",
    "wd-convnext-tagger-v3",
    "wd-eva02-large-tagger-v3",
    "wd-vit-large-tagger-v3",
)
V2_MODELS = (
    "wd-v1-4-convnext-tagger-v2",
    "wd-v1-4-convnextv2-tagger-v2",
    "wd-v1-4-vit-tagger-v2",
    "wd-v1-4-swinv2-tagger-v2",
    "wd-v1-4-moat-tagger-v2",
)
KNOWN_MODELS = tuple(f"{OWNER}/{name}" for name in V3_MODELS + V2_MODELS)
DEFAULT_MODEL = f"{OWNER}/wd-swinv2-tagger-v3"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_SIZE = 448
DEFAULT_FLOOR = 0.05
# bump when preprocessing changes in a way that changes scores; recorded with every score set
PREPROCESS_VERSION = "kohya-1"

CATEGORY_CODES = {
    0: CATEGORY_GENERAL,
    1: CATEGORY_ARTIST,
    3: CATEGORY_COPYRIGHT,
    4: CATEGORY_CHARACTER,
    5: CATEGORY_META,
    9: CATEGORY_RATING,
}

# onnxruntime's GPU providers in order of preference, by the name users pass to --device
GPU_PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
DEVICES = ("auto", "cpu", *GPU_PROVIDERS)
CPU_PROVIDER = "CPUExecutionProvider"

# -- model files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """Where a WD14 model's two files are, and the id recorded with the scores it produces."""

    model_id: str
    onnx_path: Path
    tags_path: Path


def _fix_hint(repo: str) -> str:
    return (
        f"on a connected machine run `hf download {repo} {MODEL_FILE} {TAGS_FILE} --local-dir wd14` "
        f"(older huggingface_hub: `huggingface-cli download ...`), copy the folder here and pass "
        f"`--model wd14`; or pass --model DIR with any folder holding {MODEL_FILE} and {TAGS_FILE}"
    )


def is_local_spec(spec: str) -> bool:
    """True when `spec` names a folder rather than a hub repo id (`owner/name`)."""
    return not is_hub_id(spec)


def model_id_for(spec: str) -> str:
    """The id recorded with scores: the repo id, or the absolute folder path. Needs no model files."""
    spec = spec.strip()
    if spec in V3_MODELS + V2_MODELS:
        return f"{OWNER}/{spec}"
    if is_local_spec(spec):
        return Path(spec).expanduser().absolute().as_posix()
    return spec


def resolve_model(spec: str) -> ModelFiles:
    """Find the model's files: a local folder, the hub cache, or (when online) a resumable download."""
    model_id = model_id_for(spec)
    if is_local_spec(spec):
        folder = Path(model_id)
        if not folder.is_dir():
            raise ModelError(
                f"WD14 model folder {folder} does not exist",
                f"pass --model DIR with a folder holding {MODEL_FILE} and {TAGS_FILE}, or a hub id "
                f"such as {DEFAULT_MODEL}",
            )
        missing = [name for name in (MODEL_FILE, TAGS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ModelError(
                f"WD14 model folder {folder} lacks {' and '.join(missing)}",
                f"a WD14 model folder holds {MODEL_FILE} and {TAGS_FILE}; {_fix_hint(DEFAULT_MODEL)}",
            )
        return ModelFiles(model_id, folder / MODEL_FILE, folder / TAGS_FILE)
    return _from_hub(model_id)


def _not_cached(repo: str, name: str, offline: bool) -> ModelError:
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
    return ModelError(
        f"WD14 model {repo}: {name} is not (completely) in the Hugging Face cache and {why}", _fix_hint(repo)
    )


def _from_hub(repo: str) -> ModelFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    paths: dict[str, Path] = {}
    for name in (TAGS_FILE, MODEL_FILE):
        try:  # the cache first: no network round trip when the model is already here
            paths[name] = Path(hf_hub_download(repo, name, local_files_only=True))
            continue
        except LocalEntryNotFoundError:
            pass
        offline = hub_offline()
        if offline or not hub_reachable():  # checked first: huggingface_hub retries for ~23 s
            raise _not_cached(repo, name, offline)
        try:
            paths[name] = Path(hf_hub_download(repo, name))
        except LocalEntryNotFoundError as exc:
            raise _not_cached(repo, name, hub_offline()) from exc
        except RepositoryNotFoundError as exc:
            known = ", ".join(KNOWN_MODELS)
            raise ModelError(
                f"WD14 model {repo} does not exist on the hub", f"known models: {known}"
            ) from exc
        except EntryNotFoundError as exc:
            raise ModelError(
                f"{repo} has no {name}: it is not an ONNX WD14 tagger",
                f"use one of {', '.join(KNOWN_MODELS)}",
            ) from exc
        except OSError as exc:
            raise ModelError(
                f"WD14 model {repo}: download of {name} failed ({exc})", _fix_hint(repo)
            ) from exc
    return ModelFiles(repo, paths[MODEL_FILE], paths[TAGS_FILE])


# -- vocabulary ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """selected_tags.csv: tag names and categories in model-output order."""

    names: tuple[str, ...]
    categories: tuple[str, ...]

    @property
    def rating_index(self) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.categories) if c == CATEGORY_RATING], dtype=np.int64)

    def index_of(self, category: str) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.categories) if c == category], dtype=np.int64)


def read_vocabulary(path: Path) -> Vocabulary:
    """Parse selected_tags.csv (header `tag_id,name,category,count`)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})", "re-download the model's selected_tags.csv") from exc
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise ModelError(f"{path}: not a WD14 selected_tags.csv (header {rows[0] if rows else 'missing'})")
    names, cats = [], []
    for n, row in enumerate(rows[1:], start=2):
        try:
            code = int(row[2])
        except (IndexError, ValueError):
            raise ModelError(f"{path}: line {n} is malformed: {row}") from None
        names.append(row[1])
        cats.append(CATEGORY_CODES.get(code, f"category_{code}"))
    return Vocabulary(tuple(names), tuple(cats))


# -- preprocessing -------------------------------------------------------------------------------


def preprocess(image: Image.Image, size: int = DEFAULT_SIZE) -> np.ndarray:
    """kohya's WD14 preprocessing of an RGB image: BGR, white square pad, 448; uint8 [size,size,3].

    The pad is centred with the odd pixel at the bottom/right; shrinking uses cv2 INTER_AREA,
    enlarging Pillow's LANCZOS (kohya's `resize_image`). Transparency must already be composited
    on white (`on_white`, `load_for_tagging`).
    """
    import cv2

    if image.mode != "RGB":
        image = image.convert("RGB")
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    white = (255, 255, 255)
    square = cv2.copyMakeBorder(
        bgr, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=white
    )
    if side > size:
        return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    if side < size:  # Pillow works per channel: BGR order does not matter
        return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS))
    return square


def load_for_tagging(path: Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Decode and preprocess one image file as kohya's tagger does, with two deliberate differences:
    EXIF orientation is applied (kohya tags the stored pixels; sdprep tags, buckets and trains the
    image as displayed), and 16-bit images are scaled to 8 bits (Pillow's convert clips them)."""
    from sdprep.images import load_image

    return preprocess(on_white(load_image(path, "keep")), size)


def to_batch(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack preprocessed images into the model input: float32 0..255 NHWC."""
    return np.stack(arrays).astype(np.float32)


def short_float(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (compact, exact JSON)."""
    return float(str(np.float32(value)))


# -- the tagger ----------------------------------------------------------------------------------


def choose_providers(device: str, available: list[str]) -> list[str]:
    """The provider list to ask onnxruntime for: the requested (or first available) GPU, then CPU."""
    if device not in DEVICES:
        from sdprep.errors import unknown_choice

        raise unknown_choice("device", device, DEVICES)
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "auto":
        gpus = [p for p in GPU_PROVIDERS.values() if p in available]
        return gpus[:1] + [CPU_PROVIDER]
    return [GPU_PROVIDERS[device], CPU_PROVIDER]


def session_options(threads: int = 0) -> ort.SessionOptions:
    """onnxruntime options for WD14 (also used by the benchmark's baseline, so both run alike).

    Threads do not spin-wait between operators: the decoding threads of `sdprep tag` (and anything
    else on the machine) get the CPU instead; that cost about 12% less CPU time
    per image (measured on a loaded 2-core machine).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def provider_warnings(device: str, wanted: list[str], available: list[str], active: list[str]) -> list[str]:
    """Loud messages for a GPU that was asked for (or expected) but is not what runs."""
    if device in GPU_PROVIDERS and GPU_PROVIDERS[device] not in available:
        return [
            f"WARNING: --device {device} asked for {GPU_PROVIDERS[device]}, which this onnxruntime does "
            f"not have (available: {', '.join(available)}); running on {active[0]}: tagging will be slow"
        ]
    gpu = [p for p in wanted if p != CPU_PROVIDER]
    if gpu and gpu[0] not in active:
        return [
            f"WARNING: {gpu[0]} failed to start and onnxruntime fell back to {active[0]}: tagging will be "
            "slow (check that onnxruntime-gpu matches the installed CUDA/cuDNN or ROCm libraries)"
        ]
    if device == "auto" and not gpu:
        return [f"note: this onnxruntime has no GPU provider ({', '.join(available)}); running on CPU"]
    return []


def on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white, as kohya's WD14 script does it: an alpha
    channel, or a colour key (PNG tRNS on an RGB, greyscale or palette image), pasted on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


class WD14Tagger:
    """A SmilingWolf WD14 model; `load()` opens the ONNX session, `infer()` runs a batch."""

    def __init__(
        self,
        spec: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        threads: int = 0,
        floor: float = DEFAULT_FLOOR,
    ):
        self.spec = spec
        self.model_id = model_id_for(spec)
        self.name = f"wd14:{self.model_id}"
        self.device = device
        self.threads = threads
        self.floor = floor
        self.session: ort.InferenceSession | None = None
        self.vocab: Vocabulary | None = None
        self.size = DEFAULT_SIZE
        self.input_name = ""
        self.provider = ""
        self.warnings: list[str] = []

    def __reduce__(self) -> tuple[Callable[[], WD14Tagger], tuple[()]]:
        """Sent to a Ray worker as what builds it, not the open session: each worker loads its own."""
        build = functools.partial(
            WD14Tagger, self.spec, device=self.device, threads=self.threads, floor=self.floor
        )
        return (build, ())

    def load(self) -> None:
        """Resolve the files, open the session, read input name and size; idempotent."""
        if self.session is not None:
            return
        import onnxruntime as ort

        files = resolve_model(self.spec)
        self.vocab = read_vocabulary(files.tags_path)
        available = ort.get_available_providers()
        wanted = choose_providers(self.device, available)
        try:
            session = ort.InferenceSession(
                str(files.onnx_path), session_options(self.threads), providers=wanted
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ModelError(
                f"cannot load {files.onnx_path} ({str(exc).strip()[:300]})",
                "the file is damaged or incomplete: delete it and download it again "
                f"(`hf download {self.model_id} {MODEL_FILE} --force-download` for a hub model)",
            ) from exc
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.size = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else DEFAULT_SIZE
        outputs = session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.vocab.names):
            raise ModelError(
                f"{files.tags_path} lists {len(self.vocab.names)} tags but {files.onnx_path} outputs {outputs}",
                "the two files come from different models; download both from the same repo",
            )
        self.provider = session.get_providers()[0]
        self.warnings = provider_warnings(self.device, wanted, available, session.get_providers())
        self._index = {c: self.vocab.index_of(c) for c in (CATEGORY_GENERAL, CATEGORY_CHARACTER)}
        self._rating = self.vocab.rating_index
        self._tags = np.array([i for i, c in enumerate(self.vocab.categories) if c != CATEGORY_RATING])
        self.session = session

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Scores [N, tags] for a float32 NHWC batch (`to_batch`).

        On the CPU each image runs on its own, so stored scores never depend on --batch-size or on
        which images share a call (a resumed run batches differently): onnxruntime's kernels may sum
        in an order that depends on the batch (the tiny tagger's 200,704-element mean: scores ~1e-3
        apart between batch 1 and 4). There it costs nothing measurable (ConvNeXt-T at 448 px: 5.31
        vs 5.23 CPU s for 8 images). On a GPU provider the batch runs in one call, because batching
        is where a GPU's throughput comes from; `--batch-size 1` makes GPU scores batch-independent.
        """
        self.load()
        session, vocab = self.session, self.vocab
        assert session is not None and vocab is not None  # load() sets both or raises
        if len(batch) == 0:
            return np.zeros((0, len(vocab.names)), np.float32)
        if self.provider != CPU_PROVIDER:
            scores: np.ndarray = session.run(None, {self.input_name: batch})[0]
            return scores
        rows = [session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))]
        return np.concatenate(rows)

    def record(self, probs: np.ndarray) -> dict[str, Any]:
        """The sidecar record of one image's scores (see the module docstring); after `load()`."""
        vocab = self.vocab
        assert vocab is not None, "load() first"
        probs = np.asarray(probs, dtype=np.float32)
        kept = self._tags[probs[self._tags] >= np.float32(self.floor)]
        scores = {vocab.names[i]: short_float(probs[i]) for i in kept}
        return {
            "model": self.model_id,
            "preprocess": PREPROCESS_VERSION,
            "floor": self.floor,
            "rating": {vocab.names[i]: short_float(probs[i]) for i in self._rating},
            "scores": scores,
            "categories": {vocab.names[i]: vocab.categories[i] for i in kept},
            "mcut": {
                c: short_float(mcut_threshold(probs[idx])) for c, idx in self._index.items() if idx.size
            },
        }

    def tag(self, images: list[Image.Image]) -> list[TagScores]:
        """The Tagger protocol: raw scores for in-memory images (composited on white first)."""
        self.load()
        arrays = [preprocess(on_white(im), self.size) for im in images]
        out = []
        for row in self.infer(to_batch(arrays)):
            rec = self.record(row)
            extra = {k: rec[k] for k in ("rating", "mcut", "floor", "preprocess")}
            out.append(TagScores(rec["scores"], rec["categories"], self.model_id, extra))
        return out


def matches_record(record: object, model_id: str, floor: float) -> bool:
    """True when a stored record was produced by this model, floor and preprocessing."""
    return (
        isinstance(record, dict)
        and record.get("model") == model_id
        and record.get("preprocess") == PREPROCESS_VERSION
        and record.get("floor") == floor
        and isinstance(record.get("scores"), dict)
        and isinstance(record.get("categories"), dict)
        and isinstance(record.get("rating"), dict)
    )


TAGGERS.register("wd14", lambda spec, **kw: WD14Tagger(spec or DEFAULT_MODEL, **kw))
