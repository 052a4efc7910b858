"""Peak memory of one pass: CUDA allocator peaks, live CPU tensor storage, peak RSS."""

from __future__ import annotations

import resource
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medmix_core.batch import Batch

CPU_TENSOR_MEMORY = ("peak of live CPU tensor storage during one pass: parameters, buffers, "
                     "optimizer state and the batch, plus every allocation tracked per op")
CUDA_MEMORY = "torch.cuda.max_memory_allocated over one pass (peak stats reset before)"
RSS_LABEL = "peak RSS of the process, CPU (ru_maxrss: everything the process ever held)"


class TensorMemoryTracker:
    """Peak bytes of live CPU tensor storage while active.

    Every op's outputs are seen through a ``TorchDispatchMode``; a new storage adds its
    bytes and a finalizer subtracts them when the storage is freed. Tensors alive before
    (parameters, inputs) are added with :meth:`add_existing`.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n = int(st.nbytes())
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        n = self._live.pop(key, None)
        if n is not None:
            self.current -= n

    def add_existing(self, tensors: Sequence[torch.Tensor]) -> None:
        """Count tensors that already exist (each storage once)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def __enter__(self) -> TensorMemoryTracker:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (ru_maxrss; KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """Every tensor a batch holds (data, masks, labels, teacher), for
    :meth:`TensorMemoryTracker.add_existing`."""
    out = [x for xs in batch.experts.values() for x in xs] + list(batch.expert_mask.values())
    out += [t for t in (batch.modality_mask, batch.labels, batch.label_mask, batch.teacher_mask,
                        batch.index) if t is not None]
    if batch.teacher is not None:
        out += list(batch.teacher.values())
    return out


def module_tensors(*modules: nn.Module | None) -> list[torch.Tensor]:
    """The parameters and buffers of ``modules`` (None entries skipped)."""
    out: list[torch.Tensor] = []
    for mod in modules:
        if mod is not None:
            out += [p.detach() for p in mod.parameters()] + list(mod.buffers())
    return out


def measure_memory(fn: Callable[[], Any], device: torch.device,
                   existing: list[torch.Tensor]) -> dict[str, Any]:
    """Peak memory of one call of ``fn``.

    Args:
        fn: the pass to measure.
        device: on CUDA the allocator's peak is read (``existing`` is not needed: the
            allocator sees it); on CPU a :class:`TensorMemoryTracker` counts ``existing``
            plus every storage ``fn`` allocates.
        existing: tensors alive before the call (weights, optimizer state, the batch).
    Returns:
        ``peak_bytes`` (None where not measured) and ``method``, what the figure is.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "method": CUDA_MEMORY}
    if device.type != "cpu":
        return {"peak_bytes": None, "method": f"not measured on {device.type}"}
    tracker = TensorMemoryTracker()
    tracker.add_existing(existing)
    with tracker:
        fn()
    return {"peak_bytes": int(tracker.peak), "method": CPU_TENSOR_MEMORY}
