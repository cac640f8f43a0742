"""Reading the files of a training state (`--resume`) one by one, each problem naming its file.

A state folder holds `trainable.safetensors`, `optimizer.pt`, `scheduler.pt` and `rng.pt` (written
by `sdprep.train.save.weights.save_state`). Any of them may be cut short (a full disk, a copy stopped
halfway), damaged, or replaced: each is read on its own, so the error says which file it is and
whether it is damaged (delete the state, resume from an earlier one) or holds pickled objects
that are not plain data (refused: loading them could run code). Weights that are NaN or infinite
are refused here too, before a step is trained on them.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdprep.errors import TrainingError


def damaged(path: Path, problem: str) -> TrainingError:
    folder = path.parent
    return TrainingError(
        f"{path}: {problem}",
        f"the training state {folder.name} is damaged: delete {folder} and resume from an earlier state "
        "(--resume latest picks the newest one left), or start again from the weights",
    )


def load_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a state's safetensors file, all finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, f"not a complete safetensors file (truncated or corrupt: {exc})") from exc
    check_finite(path, tensors.items())
    return tensors


def load_torch(path: Path, *, finite: bool = False) -> Any:
    """A state's torch.save file, read with weights_only=True (plain data only)."""
    import torch

    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except pickle.UnpicklingError as exc:
        if not _complete_pickle(path):
            raise damaged(path, "not a complete torch.save file (truncated or corrupt)") from exc
        raise TrainingError(
            f"{path} holds pickled objects that are not plain data: refused, loading them could run code",
            "sdprep writes states without such objects: use a state folder sdprep wrote, or start again",
        ) from exc
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        detail = str(exc).split(". ")[0] or type(exc).__name__  # torch's messages run on for lines
        raise damaged(path, f"not a complete torch.save file (truncated or corrupt: {detail})") from exc
    if finite:
        check_finite(path, _tensors(data))
    return data


def check_finite(path: Path, named: Any) -> None:
    """Refuse tensors with NaN or infinite values: training on them only ends in 'loss became nan'."""
    import torch

    bad = [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise damaged(path, f"{len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]})")


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, tensor) of every tensor nested in dicts and lists (an optimizer's state dict)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


def _complete_pickle(path: Path) -> bool:
    """Whether `path` holds a well-formed pickle (torch's zip format: its data.pkl), which
    weights_only refused for what it holds; random or cut-short bytes are damage, not a threat."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    return False
                with z.open(name) as f:
                    for _ in pickletools.genops(f):
                        pass
            return True
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:  # noqa: BLE001 - any parse error means "not a pickle"
        return False
