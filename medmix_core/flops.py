"""Multiply-accumulates of a fuser's inference forward, counted by fvcore.

fvcore's ``FlopCountAnalysis`` counts one per multiply-add, so the figures are MACs
(GMACs = 1e9 MACs), as timm reports them. :data:`EXTRA_HANDLES` count the attention
operators fvcore 0.1.5 has no handle for; :class:`BatchModule` gives any fuser the
tensors-only signature that ``torch.jit`` tracing needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from medmix_core.batch import Batch
from medmix_core.errors import MedmixError

MAC_NOTE = ("fvcore counts one per multiply-add, so these are MACs (GMACs = 1e9 MACs), as "
            "timm reports them; 1 MAC ~ 2 FLOPs. Layer norms count fvcore's estimate of 5 per "
            "element; element-wise ops (add, mul, GELU, softmax, masking) are not counted.")


def _shape(v: Any) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(v)


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::scaled_dot_product_attention: Q K^T and A V (query [..., L, E], key [..., S, E],
    value [..., S, Ev])."""
    q, k, v = (_shape(x) for x in inputs[:3])
    lead = math.prod(q[:-1])  # batch dims x heads x L
    return lead * k[-2] * q[-1] + lead * k[-2] * v[-1]


def _baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::baddbmm(input, batch1 [B, n, m], batch2 [B, m, p]): B n m p."""
    b1, b2 = _shape(inputs[1]), _shape(inputs[2])
    return b1[0] * b1[1] * b1[2] * b2[-1]


def _native_mha_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::_native_multi_head_attention (nn.MultiheadAttention's inference fast path):
    Q/K/V and output projections plus the attention products."""
    q, k = _shape(inputs[0]), _shape(inputs[1])  # [B, L, E], [B, S, E]
    b, lq, e = q
    s = k[-2]
    return b * lq * e * e * 2 + b * s * e * e * 2 + 2 * b * lq * s * e


#: operators fvcore 0.1.5 has no handle for, counted here (MACs)
EXTRA_HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::baddbmm": _baddbmm_macs,
    "aten::_native_multi_head_attention": _native_mha_macs,
}


def flatten_batch(batch: Batch, with_teacher: bool = True) -> tuple[torch.Tensor, ...]:
    """A batch as a flat tuple of tensors (what jit tracing accepts), in
    :class:`BatchModule` order: per modality its expert tensors then its expert mask; the
    modality mask; then, with teachers, per teacher modality its embedding, then the
    teacher mask."""
    flat: list[torch.Tensor] = []
    for m in _batch_modalities(batch):
        flat += list(batch.experts[m]) + [batch.expert_mask[m]]
    flat.append(batch.modality_mask)
    if with_teacher and batch.teacher is not None:
        flat += [batch.teacher[m] for m in batch.teacher]
        flat.append(batch.teacher_mask)
    return tuple(flat)


def _batch_modalities(batch: Batch) -> list[str]:
    return list(batch.modalities) if batch.modalities else list(batch.experts)


class BatchModule(nn.Module):
    """A fuser called on a :class:`Batch` rebuilt from flat tensors; returns the logits.

    fvcore traces modules with ``torch.jit``, which takes tensors, not dataclasses; this
    wrapper gives every fuser that signature without touching it.
    """

    def __init__(self, fuser: nn.Module, template: Batch, with_teacher: bool = True) -> None:
        super().__init__()
        self.fuser = fuser
        self.modalities = _batch_modalities(template)
        self.k = [len(template.experts[m]) for m in self.modalities]
        self.teacher_keys = (list(template.teacher) if with_teacher
                             and template.teacher is not None else None)

    def forward(self, *flat: torch.Tensor) -> torch.Tensor:
        i, experts, emask = 0, {}, {}
        for m, k in zip(self.modalities, self.k):
            experts[m] = list(flat[i:i + k])
            emask[m] = flat[i + k]
            i += k + 1
        mmask = flat[i]
        i += 1
        teacher = tmask = None
        if self.teacher_keys is not None:
            teacher = {m: flat[i + j] for j, m in enumerate(self.teacher_keys)}
            tmask = flat[i + len(self.teacher_keys)]
        batch = Batch(experts=experts, expert_mask=emask, modality_mask=mmask, teacher=teacher,
                      teacher_mask=tmask, modalities=list(self.modalities))
        return self.fuser(batch).logits


def count_macs(fuser: nn.Module, batch: Batch) -> dict[str, Any]:
    """Multiply-accumulates of one inference forward of ``fuser`` on ``batch`` (fvcore).

    The fuser is traced in eval mode without gradients (the deployed forward), on the
    batch's device; data-dependent branches follow this batch.

    Args:
        fuser: a :class:`~medmix_core.fusion.Fuser` (any nn.Module taking a Batch).
        batch: a real batch.
    Returns:
        ``per_batch`` and ``per_sample`` MACs, ``by_operator``, ``unsupported_ops``
        (operator -> times seen; fvcore skipped them), ``batch_size`` and the unit note.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script in imports
            from fvcore.nn import FlopCountAnalysis
    except ImportError as exc:
        raise MedmixError("Counting MACs needs fvcore (a medmix dependency): "
                          "pip install 'fvcore>=0.1.5'.") from exc
    with_teacher = bool(getattr(fuser, "uses_teacher_at_inference", False))
    was_training = fuser.training
    wrapper = BatchModule(fuser, batch, with_teacher).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about data-dependent branches
            fca = FlopCountAnalysis(wrapper, flatten_batch(batch, with_teacher))
            fca.set_op_handle(**EXTRA_HANDLES)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            total = int(fca.total())
            by_op = {k: int(v) for k, v in sorted(fca.by_operator().items()) if v}
            unsupported = dict(sorted(fca.unsupported_ops().items()))
    except MedmixError:
        raise
    except Exception as exc:
        raise MedmixError(f"fvcore could not trace fuser {type(fuser).__name__} "
                          f"({type(exc).__name__}: {exc}). Its forward must be traceable by "
                          f"torch.jit.trace on a Batch of tensors.") from exc
    finally:
        fuser.train(was_training)
    b = batch.size
    return {"per_batch": total, "per_sample": total / b, "gmacs_per_sample": total / b / 1e9,
            "batch_size": b, "by_operator": by_op, "unsupported_ops": unsupported,
            "counter": "fvcore FlopCountAnalysis", "unit": "MAC", "note": MAC_NOTE}
