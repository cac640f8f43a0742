"""Count live tensor memory the way an allocator sees it: bytes of every storage alive, and the peak.

`LiveBytes` is a TorchDispatchMode: every tensor an operation returns registers its storage once
(views share it), and the storage's bytes are released when torch frees it (a finalizer on the
storage object, which torch keeps for as long as the storage lives). It works the same on real
tensors (to measure a run on the CPU) and on fake tensors (to measure a run that allocates nothing:
the memory planner). Tensors that exist before the mode is entered (weights, optimizer state) are
counted with `add()`; gradients are told apart with `watch_grads()` so activations can be reported
without them.

    with LiveBytes() as live:
        live.add_module(unet)
        loss = unet(...).sample.mean(); loss.backward()
    print(live.peak, live.now)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_DEVICE = torch.ops.prim.device.default


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves the mode's __init_subclass__ unannotated
    """Live and peak storage bytes of the tensors created (or `add`ed) while active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in torch
        self._sizes: dict[int, int] = {}
        self._grads: set[int] = set()
        self.now = 0
        self.peak = 0
        self.grad_bytes = 0  # bytes of .grad storages alive now
        self.peak_without_grads = 0  # the peak of (now - grad_bytes): activations and temporaries
        self.grads_at_peak = 0  # grad_bytes at that moment
        self.ops = 0

    # -- registration ----------------------------------------------------------------------

    def add(self, tensor: torch.Tensor) -> None:
        """Count a tensor's storage (once; a storage already counted is ignored)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.now += size
        weakref.finalize(storage, self._release, key)
        self._update()

    def add_all(self, tensors: Iterable[Any]) -> None:
        for t in tensors:
            if t is not None:
                self.add(t)

    def add_module(self, module: Any) -> None:
        """Count a module's parameters, buffers and existing gradients."""
        self.add_all(module.parameters())
        self.add_all(module.buffers())
        self.add_all(p.grad for p in module.parameters())

    def add_reachable(self, root: Any) -> None:
        """Count every tensor reachable from `root` (e.g. a Trainer: its weights, caches, EMA copies
        and optimizer state), following references but not into modules, classes or functions."""
        import gc
        import types

        skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
        seen = {id(root)}
        todo = [root]
        while todo:
            obj = todo.pop()
            if isinstance(obj, torch.Tensor):
                self.add(obj)
                if obj.grad is not None:
                    self.add(obj.grad)
                continue
            for ref in gc.get_referents(obj):
                if id(ref) not in seen and not isinstance(ref, skip):
                    seen.add(id(ref))
                    todo.append(ref)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count an optimizer's state tensors."""
        for state in getattr(optimizer, "state", {}).values():
            self.add_all(v for v in state.values() if isinstance(v, torch.Tensor))

    def watch_grads(self, params: Iterable[Any]) -> None:
        """Count these parameters' gradients as gradients (not activations) once they are stored."""
        for p in params:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._grad_stored)

    def _grad_stored(self, param: torch.Tensor) -> None:
        grad = param.grad  # set: torch calls the hook after accumulating it
        if grad is None:
            return
        storage = grad.untyped_storage()
        key = id(storage)
        if key not in self._sizes:
            self.add(grad)
        if key not in self._grads:
            self._grads.add(key)
            self.grad_bytes += self._sizes[key]
            self._update()

    # -- bookkeeping -----------------------------------------------------------------------

    def _release(self, key: int) -> None:
        size = self._sizes.pop(key)
        self.now -= size
        if key in self._grads:
            self._grads.discard(key)
            self.grad_bytes -= size

    def _update(self) -> None:
        if self.now > self.peak:
            self.peak = self.now
        rest = self.now - self.grad_bytes
        if rest > self.peak_without_grads:
            self.peak_without_grads = rest
            self.grads_at_peak = self.grad_bytes

    def reset_peak(self) -> None:
        """Start a new peak measurement from what is alive now."""
        self.peak = self.now
        self.peak_without_grads = self.now - self.grad_bytes
        self.grads_at_peak = self.grad_bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is _DEVICE:  # asked very often (by diffusers and PEFT); allocates nothing
            return out
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def peak_during_steps(trainer: Any) -> int:  # a Trainer (Any: its callbacks' step is replaced)
    """Run a set-up `Trainer` to the end and return the peak of live tensor bytes up to its last
    training step (the final save's copies are not training memory): every tensor alive at the
    start (weights, caches, EMA copies) plus everything the steps create."""
    live = LiveBytes()
    live.add_reachable(trainer)
    peaks: list[int] = []
    report_step = trainer.cb.step

    def step(*args: Any, **kwargs: Any) -> None:
        peaks.append(live.peak)
        report_step(*args, **kwargs)

    trainer.cb.step = step
    with live:
        trainer.run()
    return max(peaks)
