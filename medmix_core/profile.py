"""Efficiency profiling of fusers, and the paper's efficiency table (Appendix Table 6).

:func:`profile_fuser` measures one fuser on real batches of a store:

* parameters: trainable (fuser + teacher heads when distillation is on) and deployed
  (fuser only; teacher heads are training-only), optionally plus the upstream expert
  encoders that stay in the deployed pipeline, and the teacher encoder for fusers that
  read teacher embeddings at inference;
* multiply-accumulates of one inference forward per sample, counted by fvcore
  ``FlopCountAnalysis`` (fvcore counts one per multiply-add, so the figures are MACs /
  GMACs, as timm reports them), with the operators fvcore could not count;
* peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of live tensor
  storage (tracked per allocation) plus the process's peak RSS, each labelled;
* latency (median, p90) and throughput of inference and of one training step
  (forward + backward + optimizer step with the task loss, and distillation when on).

:func:`efficiency_table` combines profiles with the runs' test metrics: Perf = mean(AUROC,
AUPRC, macro-F1, accuracy); Cost = geometric mean of the parameter, MAC and memory ratios
relative to the reference (MedMIX); EffScore = (Perf / Perf_ref) / Cost.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmix_core.batch import Batch, StoreTensors
from medmix_core.config import RunConfig
from medmix_core.distill import TeacherHeads, distillation_loss
from medmix_core.errors import MedmixError
from medmix_core.experts import ExpertEncoder
from medmix_core.metrics import METRICS
from medmix_core.plugins import get_loss
from medmix_core.store import atomic_write_text
from medmix_core.training import (
    _autocast,
    _param_groups,
    _pos_weight,
    augment_masks,
    build_fuser,
    make_spec,
    resolve_device,
    task_loss,
)

MAC_NOTE = ("fvcore counts one per multiply-add, so these are MACs (GMACs = 1e9 MACs), as "
            "timm reports them; 1 MAC ~ 2 FLOPs. Layer norms count fvcore's estimate of 5 per "
            "element; element-wise ops (add, mul, GELU, softmax, masking) are not counted.")
CPU_TENSOR_MEMORY = ("peak of live CPU tensor storage during one pass: parameters, buffers, "
                     "optimizer state and the batch, plus every allocation tracked per op")
CUDA_MEMORY = "torch.cuda.max_memory_allocated over one pass (peak stats reset before)"
RSS_LABEL = "peak RSS of the process, CPU (ru_maxrss: everything the process ever held)"


# ----------------------------------------------------------------------------- machine

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, with family/model and the widest SIMD flag
    (virtual machines often report a bare "AMD EPYC"); else what platform reports."""
    info = _cpuinfo()
    name = info.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    extra = []
    if "cpu family" in info and "model" in info:
        extra.append(f"family {info['cpu family']} model {info['model']}")
    flags = set(info.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    if simd:
        extra.append(simd)
    return f"{name} ({', '.join(extra)})" if extra else name


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, torch threads, device, load.

    Args:
        device: the device measured (None: CPU only).
    Returns:
        a JSON-ready dict.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(dev),
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------- fvcore

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


# ----------------------------------------------------------------------------- memory

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


def _batch_tensors(batch: Batch) -> list[torch.Tensor]:
    out = [x for xs in batch.experts.values() for x in xs] + list(batch.expert_mask.values())
    out += [t for t in (batch.modality_mask, batch.labels, batch.label_mask, batch.teacher_mask,
                        batch.index) if t is not None]
    if batch.teacher is not None:
        out += list(batch.teacher.values())
    return out


def _module_tensors(*modules: nn.Module | None) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for mod in modules:
        if mod is not None:
            out += [p.detach() for p in mod.parameters()] + list(mod.buffers())
    return out


def _measure_memory(fn: Callable[[], Any], device: torch.device,
                    existing: list[torch.Tensor]) -> dict[str, Any]:
    """Peak memory of one call of ``fn`` with ``existing`` tensors alive."""
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


# ----------------------------------------------------------------------------- timing

def _timed(fn: Callable[[int], Any], repeats: int, warmup: int, device: torch.device,
           batch_size: int) -> dict[str, Any]:
    """Median and p90 seconds of ``fn(i)`` over ``repeats`` calls after ``warmup`` calls."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + i)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = statistics.median(times)
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return {"median_ms": med * 1e3, "p90_ms": p90 * 1e3, "min_ms": times[0] * 1e3,
            "samples_per_s": batch_size / med if med > 0 else math.inf,
            "batch_size": batch_size, "repeats": repeats, "warmup": warmup}


# ----------------------------------------------------------------------------- profile

def _n_params(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def prepare_tensors(cfg: RunConfig, log: Callable[[str], None] = print) -> StoreTensors:
    """The store's tensors for profiling: extracts missing experts like ``medmix run``, and
    loads a teacher when the store has one (``cfg.teacher``, else the first teacher found),
    so teacher-reading fusers and distillation can be profiled. Loading a teacher does not
    turn distillation on: that is ``cfg.distill_on``.

    Args:
        cfg: the run configuration (dataset or store, experts, teacher).
        log: progress messages.
    Returns:
        the tensors.
    """
    from medmix_core.runner import ensure_store, load_tensors

    store = ensure_store(cfg, log)
    have = sorted({e.name for es in store.teachers.values() for e in es})
    teacher = cfg.teacher or (have[0] if have else None)
    return load_tensors(cfg.model_copy(update={"teacher": teacher}), store,
                        teacher_needed=teacher is not None)


def _params_section(model: nn.Module, heads: nn.Module | None, name: str,
                    include_experts: list[ExpertEncoder] | None,
                    teacher_encoder: ExpertEncoder | None, uses_teacher: bool,
                    tensors: StoreTensors, notes: list[str]) -> dict[str, Any]:
    fuser_total = _n_params(model)
    heads_n = _n_params(heads, trainable_only=True)
    sec: dict[str, Any] = {
        "trainable": _n_params(model, trainable_only=True) + heads_n,
        "fuser": fuser_total, "teacher_heads": heads_n,
        "experts": None, "teacher_encoder": None,
    }
    deployed = fuser_total
    includes = ["fuser"]
    if include_experts is not None:
        per = {}
        for enc in include_experts:
            if not isinstance(enc, ExpertEncoder):
                raise MedmixError(f"include_experts must hold ExpertEncoder instances; found "
                                  f"{type(enc).__name__}.")
            key = enc.name or type(enc).__name__
            per[key] = int(enc.n_parameters())
        sec["experts"] = per
        deployed += sum(per.values())
        includes.append("expert encoders" + ("" if any(per.values())
                                             else " (all weight-free: 0 parameters)"))
    if uses_teacher:
        tname = tensors.teacher_name or "teacher"
        if teacher_encoder is not None:
            sec["teacher_encoder"] = {"name": teacher_encoder.name or tname,
                                      "parameters": int(teacher_encoder.n_parameters())}
            deployed += sec["teacher_encoder"]["parameters"]
            includes.append(f"teacher encoder {sec['teacher_encoder']['name']}")
            notes.append(f"{name} reads teacher embeddings at inference, so the teacher "
                         f"encoder counts as deployed.")
        else:
            notes.append(f"{name} reads teacher ({tname}) embeddings at inference: the "
                         f"teacher encoder is part of the deployed pipeline, but its "
                         f"parameters are not counted here (no teacher encoder was given).")
    sec["deployed"] = deployed
    sec["deployed_includes"] = includes
    return sec


def profile_fuser(fuser: str, tensors: StoreTensors, cfg: RunConfig, device: str = "auto",
                  batch_size: int = 256, include_experts: list[ExpertEncoder] | None = None,
                  repeats: int = 20, warmup: int = 5,
                  teacher_encoder: ExpertEncoder | None = None, seed: int = 0) -> dict[str, Any]:
    """Parameters, MACs, peak memory, latency and throughput of one fuser.

    Args:
        fuser: registered fuser name. ``cfg.fuser_options`` apply only when ``cfg.fuser``
            names this fuser (options are fuser-specific); ``cfg.d`` and ``cfg.dropout``
            always apply.
        tensors: the store's tensors (with teacher embeddings for distillation or for
            fusers that read them at inference; see :func:`prepare_tensors`).
        cfg: optimiser, loss and distillation settings of the training step.
        device: "auto", "cpu" or "cuda".
        batch_size: rows per batch (capped at the store size). MACs are per sample; they
            depend on it only for batch-level methods (M3Care's similarity graph).
        include_experts: expert encoders that stay in the deployed pipeline; their
            ``n_parameters()`` (0 for weight-free ones) add to the deployed count.
        repeats: timed batches (median and p90 reported).
        warmup: untimed batches first.
        teacher_encoder: the teacher's encoder, counted as deployed for fusers that read
            teacher embeddings at inference.
        seed: model initialisation and batch order.
    Returns:
        a JSON-ready dict: ``params``, ``macs``, ``memory``, ``latency``, ``machine``,
        ``notes`` and what was profiled.
    Raises:
        MedmixError: an unknown fuser, distillation or a teacher-reading fuser without
            teacher embeddings, bad sizes, an untraceable fuser.
    """
    if int(batch_size) < 1 or int(repeats) < 1 or int(warmup) < 0:
        raise MedmixError(f"profile needs batch_size >= 1, repeats >= 1 and warmup >= 0; got "
                          f"batch_size={batch_size}, repeats={repeats}, warmup={warmup}.")
    if tensors.n < 1:
        raise MedmixError("The store has no samples to profile on.")
    dev = resolve_device(device)
    run_cfg = cfg.model_copy(update={
        "fuser": fuser, "fuser_options": cfg.fuser_options if cfg.fuser == fuser else {}})
    spec = make_spec(tensors)
    torch.manual_seed(seed)
    model = build_fuser(run_cfg, spec).to(dev)
    uses_teacher = bool(getattr(model, "uses_teacher_at_inference", False))
    notes: list[str] = []
    if uses_teacher and tensors.teacher is None:
        raise MedmixError(f"Fuser {fuser!r} reads teacher embeddings at inference, but none "
                          f"were loaded. Profile a store with a teacher (--teacher NAME).")

    heads = None
    losses: dict[nn.Module, float] = {}
    if run_cfg.distill_on:
        if tensors.teacher is None:
            raise MedmixError("Distillation is on but no teacher embeddings were loaded. Pass "
                              "--teacher NAME (extracted into the store) or --no-distill.")
        if model.rep_dim:
            heads = TeacherHeads(tensors.teacher_dims(), model.rep_dim).to(dev)
            losses = {get_loss(n)().to(dev): float(w) for n, w in run_cfg.distill_losses.items()}
        else:
            notes.append(f"{fuser} exposes no modality representations: distillation does not "
                         f"apply, so the training step has no teacher heads.")

    params = _params_section(model, heads, fuser, include_experts, teacher_encoder,
                             uses_teacher, tensors, notes)

    # batches: a seeded permutation of all rows, cut into full batches, built once
    bs = min(int(batch_size), tensors.n)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tensors.n, generator=gen)
    n_batches = max(1, tensors.n // bs)
    need = warmup + repeats
    teacher_in_train = heads is not None or uses_teacher

    def make(i: int, train: bool) -> Batch:
        j = i % n_batches
        b = tensors.batch(perm[j * bs:(j + 1) * bs])
        keep_t = teacher_in_train if train else uses_teacher
        if not keep_t:
            b = replace(b, teacher=None, teacher_mask=None)
        return b

    infer_batches = [make(i, False).to(dev) for i in range(min(need, n_batches))]

    # MACs on the first real batch
    macs = count_macs(model, infer_batches[0])

    # inference
    model.eval()

    def infer(i: int) -> None:
        with torch.no_grad(), _autocast(dev, run_cfg.amp):
            model(infer_batches[i % len(infer_batches)])

    mem_inf = _measure_memory(lambda: infer(0), dev,
                              _module_tensors(model) + _batch_tensors(infer_batches[0]))
    lat_inf = _timed(infer, repeats, warmup, dev, bs)
    infer_batches.clear()  # free them before the training batches

    # one training step, as train_seed takes it (distillation at its full weight)
    model.train()
    if heads is not None:
        heads.train()
    opt = torch.optim.AdamW(_param_groups(model, heads, run_cfg), lr=run_cfg.lr,
                            betas=run_cfg.betas)
    use_scaler = dev.type == "cuda" and run_cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    pos_weight = _pos_weight(tensors, perm, run_cfg)
    pos_weight = None if pos_weight is None else pos_weight.to(dev)
    mask_gen = torch.Generator().manual_seed(seed)
    train_batches = []
    for i in range(min(need, n_batches)):
        b = make(i, True)
        em = augment_masks(b.expert_mask, b.modalities, run_cfg.modality_dropout,
                           run_cfg.expert_dropout, mask_gen)
        train_batches.append(b.with_masks(em).to(dev))
    lam = run_cfg.lambda_d_max
    params_list = [p for g in opt.param_groups for p in g["params"]]

    def step(i: int) -> None:
        batch = train_batches[i % len(train_batches)]
        with _autocast(dev, run_cfg.amp):
            out = model(batch)
            loss = task_loss(out.logits, batch, tensors.task_type, pos_weight)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            if heads is not None and lam > 0:
                loss = loss + lam * distillation_loss(out.reps, out.rep_mask, batch.modalities,
                                                      batch.teacher, batch.teacher_mask,
                                                      heads, losses)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(params_list, run_cfg.grad_clip)
        scaler.step(opt)
        scaler.update()

    step(0)  # creates the optimizer state, so the measured step is a steady-state one
    opt_state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    opt.zero_grad(set_to_none=True)
    mem_train = _measure_memory(lambda: step(1), dev, _module_tensors(model, heads) + opt_state
                                + _batch_tensors(train_batches[1 % len(train_batches)]))
    lat_train = _timed(step, repeats, warmup, dev, bs)

    mach = machine_info(dev)
    load = (mach.get("loadavg") or [0.0])[0]
    if dev.type == "cpu" and torch.get_num_threads() > 1 and load > (mach["usable_cores"] or 1):
        notes.append(f"Load average {load} on {mach['usable_cores']} cores with "
                     f"{torch.get_num_threads()} torch threads: parallel ops wait for their "
                     f"sibling threads to be scheduled, which can slow timings many-fold; "
                     f"profile with one thread (torch.set_num_threads(1)) on a busy machine.")
    memory: dict[str, Any] = {"inference": mem_inf, "train_step": mem_train}
    if dev.type == "cpu":
        memory["peak_rss_bytes"] = peak_rss_bytes()
        memory["peak_rss_label"] = RSS_LABEL
    if n_batches < need:
        notes.append(f"The store holds {n_batches} batch(es) of {bs}; timed batches repeat.")
    if run_cfg.amp and dev.type == "cuda":
        notes.append("Timed with mixed precision (cfg.amp), as training and prediction run.")
    return {
        "fuser": fuser, "fuser_class": type(model).__name__,
        "fuser_options": {"d": run_cfg.d, "dropout": run_cfg.dropout, **run_cfg.fuser_options},
        "uses_teacher_at_inference": uses_teacher,
        "distillation": heads is not None,
        "teacher": tensors.teacher_name if (uses_teacher or heads is not None) else None,
        "n_samples": tensors.n, "batch_size": bs, "task_type": tensors.task_type,
        "modalities": list(spec.modalities), "experts": dict(spec.experts),
        "dims": dict(spec.dims),
        "params": params, "macs": macs, "memory": memory,
        "latency": {"inference": lat_inf, "train_step": lat_train,
                    "note": "per batch of pre-built batches already on the device; batch "
                            "assembly and host-to-device copies are not timed"},
        "machine": mach, "notes": notes,
    }


# ----------------------------------------------------------------------------- writing

def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _fmt_macs(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.3f} G"
    if n >= 1e6:
        return f"{n / 1e6:.3f} M"
    if n >= 1e3:
        return f"{n / 1e3:.2f} K"
    return f"{n:.0f}"


def profile_markdown(results: list[dict[str, Any]]) -> str:
    """A markdown report of one or more profiles."""
    lines = ["# Fuser profile", ""]
    if results:
        mach = results[0]["machine"]
        lines += [f"Device: {mach['device']} ({mach['device_name']}); {mach['cpu_cores']} CPU "
                  f"cores, {mach['torch_threads']} torch threads; torch {mach['torch']}."
                  + (f" Load average {mach['loadavg']}." if "loadavg" in mach else ""), ""]
    header = ("| fuser | params deployed | params trainable | MACs / sample | peak mem infer | "
              "peak mem train | infer ms (p50 / p90) | infer samples/s | train step ms "
              "(p50 / p90) | train samples/s |")
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        li, lt = r["latency"]["inference"], r["latency"]["train_step"]
        lines.append(
            f"| {r['fuser']} | {_fmt_int(r['params']['deployed'])} | "
            f"{_fmt_int(r['params']['trainable'])} | {_fmt_macs(r['macs']['per_sample'])} | "
            f"{_fmt_bytes(r['memory']['inference']['peak_bytes'])} | "
            f"{_fmt_bytes(r['memory']['train_step']['peak_bytes'])} | "
            f"{li['median_ms']:.2f} / {li['p90_ms']:.2f} | {li['samples_per_s']:,.0f} | "
            f"{lt['median_ms']:.2f} / {lt['p90_ms']:.2f} | {lt['samples_per_s']:,.0f} |")
    lines.append("")
    if results:
        r0 = results[0]
        timing = (f"Batch size {r0['batch_size']}; latency over "
                  f"{r0['latency']['inference']['repeats']} timed batches after "
                  f"{r0['latency']['inference']['warmup']} warm-up batches "
                  f"({r0['latency']['note']}).")
        lines += [timing, "",
                  f"MACs: {MAC_NOTE}", "",
                  f"Peak memory: {r0['memory']['inference']['method']}."]
        if "peak_rss_bytes" in r0["memory"]:
            rss = max(r["memory"]["peak_rss_bytes"] for r in results)
            lines.append(f"{RSS_LABEL}: {_fmt_bytes(rss)}.")
        lines.append("")
    for r in results:
        p = r["params"]
        lines.append(f"## {r['fuser']}")
        lines.append("")
        lines.append(f"- parameters: fuser {_fmt_int(p['fuser'])}, teacher heads (training "
                     f"only) {_fmt_int(p['teacher_heads'])}, deployed {_fmt_int(p['deployed'])}"
                     f" = {' + '.join(p['deployed_includes'])}")
        if p["experts"] is not None:
            lines.append("- expert encoders: " + ", ".join(
                f"{k} {_fmt_int(v)}" for k, v in p["experts"].items()))
        ops = r["macs"]["unsupported_ops"]
        lines.append("- MACs by operator: " + (", ".join(
            f"{k} {_fmt_macs(v / r['macs']['batch_size'])}"
            for k, v in r["macs"]["by_operator"].items()) or "none"))
        lines.append("- operators fvcore did not count: " + (", ".join(
            f"{k} (x{v})" for k, v in ops.items()) or "none"))
        for note in r["notes"]:
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)


def write_profile(result: dict[str, Any] | list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``profile.json`` and ``profile.md`` (atomically) into ``out_dir``.

    Args:
        result: one profile or a list of them (one row each).
        out_dir: folder, created if needed.
    Returns:
        the paths written.
    """
    results = [result] if isinstance(result, dict) else list(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "profile.json", out / "profile.md"]
    atomic_write_text(paths[0], json.dumps(_clean(results), indent=1))
    atomic_write_text(paths[1], profile_markdown(results))
    return paths


def load_profiles(path: str | Path) -> dict[str, dict[str, Any]]:
    """Profiles written by :func:`write_profile`, by fuser name.

    Args:
        path: a ``profile.json`` file, or the folder holding one.
    Returns:
        fuser -> profile.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "profile.json"
    if not p.is_file():
        raise MedmixError(f"No profile at {p}; write one with `medmix profile --out DIR`.")
    try:
        data = json.loads(p.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise MedmixError(f"{p} is not valid JSON ({exc}).") from exc
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) and "fuser" in r for r in items):
        raise MedmixError(f"{p} does not hold profiles (expected objects with a 'fuser' key).")
    return {r["fuser"]: r for r in items}


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return None if (math.isnan(o) or math.isinf(o)) else o
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


# ----------------------------------------------------------------------------- Table 6

def read_perf(results_dir: str | Path) -> tuple[str, float, dict[str, float]]:
    """(fuser, Perf, the four metric means) from a results folder's metrics.json.

    Perf = mean of the test AUROC, AUPRC, macro-F1 and accuracy means over seeds.
    """
    path = Path(results_dir) / "metrics.json"
    if not path.is_file():
        raise MedmixError(f"{path} is missing: {results_dir} is not a results folder of "
                          f"`medmix run` (expected metrics.json).")
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise MedmixError(f"{path} is not valid JSON ({exc}).") from exc
    test = data.get("test")
    if not isinstance(test, dict):
        raise MedmixError(f"{path} has no 'test' metrics (keys: {sorted(data)}).")
    vals = {}
    for k in METRICS:
        entry = test.get(k)
        v = entry.get("mean") if isinstance(entry, dict) else None
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise MedmixError(f"{path}: test.{k}.mean is missing or undefined ({v!r}); Perf "
                              f"needs all of {list(METRICS)}.")
        vals[k] = float(v)
    return str(data.get("fuser") or Path(results_dir).name), sum(vals.values()) / len(vals), vals


def pareto_front(cost: Sequence[float], perf: Sequence[float]) -> list[bool]:
    """Which points no other point dominates (lower-or-equal cost and higher-or-equal perf,
    strictly better in one)."""
    n = len(cost)
    if len(perf) != n:
        raise MedmixError(f"pareto_front: {n} costs but {len(perf)} perf values.")
    front = []
    for i in range(n):
        dominated = any(cost[j] <= cost[i] and perf[j] >= perf[i]
                        and (cost[j] < cost[i] or perf[j] > perf[i]) for j in range(n) if j != i)
        front.append(not dominated)
    return front


def _profile_figures(p: dict[str, Any], name: str) -> tuple[float, float, float]:
    try:
        return (float(p["params"]["deployed"]), float(p["macs"]["per_sample"]),
                float(p["memory"]["inference"]["peak_bytes"]))
    except (KeyError, TypeError) as exc:
        raise MedmixError(f"Profile of {name!r} lacks params.deployed, macs.per_sample or "
                          f"memory.inference.peak_bytes ({exc}); make it with "
                          f"profile_fuser.") from exc


def efficiency_table(results_dirs: dict[str, Path] | list[Path], profiles: dict[str, dict],
                     reference: str = "medmix") -> list[dict[str, Any]]:
    """The paper's efficiency table: Perf, Cost and EffScore per method.

    Args:
        results_dirs: method -> results folder of ``medmix run``, or a list of folders
            (the method is the ``fuser`` named in each metrics.json).
        profiles: method -> :func:`profile_fuser` result.
        reference: the method every ratio is taken against (Cost 1, EffScore 1).
    Returns:
        one row per method, in the given order: ``method``, ``params``, ``macs_per_sample``,
        ``peak_memory_bytes``, the four metrics, ``perf``, the three ``*_ratio``s, ``cost``
        (their geometric mean), ``eff_score`` and ``pareto`` (on the cost-perf front).
    Raises:
        MedmixError: a missing metrics file or profile, a missing reference, profiles
            measured on different devices or batch sizes, a zero reference figure.
    """
    if isinstance(results_dirs, dict):
        items = [(str(k), Path(v)) for k, v in results_dirs.items()]
    else:
        items = []
        for d in results_dirs:
            name = read_perf(d)[0]
            if name in {k for k, _ in items}:
                raise MedmixError(f"Two results folders are runs of {name!r}; pass a mapping "
                                  f"method -> folder to name them apart.")
            items.append((name, Path(d)))
    missing = [k for k, _ in items if k not in profiles]
    if missing:
        raise MedmixError(f"No profile for {missing}; profiles exist for {sorted(profiles)}. "
                          f"Profile them with `medmix profile --fuser {','.join(missing)}`.")
    names = [k for k, _ in items]
    if reference not in names:
        raise MedmixError(f"The reference method {reference!r} is not among the runs {names}. "
                          f"Include its results folder, or choose another reference.")
    methods = {(profiles[k].get("machine", {}).get("device"), profiles[k].get("batch_size"),
                profiles[k].get("memory", {}).get("inference", {}).get("method"))
               for k in names}
    if len(methods) > 1:
        raise MedmixError(f"The profiles were measured on different devices / batch sizes "
                          f"({sorted(map(str, methods))}); their ratios are not comparable. "
                          f"Profile every method in one `medmix profile` call.")
    rows = []
    for name, folder in items:
        _, perf, vals = read_perf(folder)
        params, macs, mem = _profile_figures(profiles[name], name)
        rows.append({"method": name, "params": int(params), "macs_per_sample": macs,
                     "peak_memory_bytes": int(mem), **vals, "perf": perf,
                     "results_dir": str(folder)})
    ref = next(r for r in rows if r["method"] == reference)
    for key in ("params", "macs_per_sample", "peak_memory_bytes"):
        if not ref[key] > 0:
            raise MedmixError(f"The reference {reference!r} has {key} = {ref[key]}; ratios "
                              f"need a positive reference figure.")
    for r in rows:
        r["params_ratio"] = r["params"] / ref["params"]
        r["macs_ratio"] = r["macs_per_sample"] / ref["macs_per_sample"]
        r["memory_ratio"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        ratios = (r["params_ratio"], r["macs_ratio"], r["memory_ratio"])
        r["cost"] = (math.prod(ratios) ** (1 / 3)) if min(ratios) > 0 else 0.0
        r["eff_score"] = ((r["perf"] / ref["perf"]) / r["cost"]) if r["cost"] > 0 else math.inf
    for r, f in zip(rows, pareto_front([r["cost"] for r in rows], [r["perf"] for r in rows])):
        r["pareto"] = f
    return rows


COLUMNS = ("method", "params", "macs_per_sample", "peak_memory_bytes", "auroc", "auprc",
           "macro_f1", "accuracy", "perf", "params_ratio", "macs_ratio", "memory_ratio", "cost",
           "eff_score", "pareto")


def efficiency_markdown(rows: list[dict[str, Any]], reference: str = "medmix") -> str:
    intro = (f"Perf = mean(AUROC, AUPRC, macro-F1, accuracy) on the test split (mean over "
             f"seeds). Cost = geometric mean of the deployed-parameter, MAC and peak-memory "
             f"ratios relative to {reference}. EffScore = (Perf / Perf_{reference}) / Cost. "
             f"Pareto: no other method has lower-or-equal Cost and higher-or-equal Perf.")
    lines = ["# Efficiency", "", intro, "",
             "| method | params | MACs / sample | peak memory | Perf | Cost | EffScore | Pareto |",
             "|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt_int(r['params'])} | "
                     f"{_fmt_macs(r['macs_per_sample'])} | {_fmt_bytes(r['peak_memory_bytes'])} "
                     f"| {r['perf']:.4f} | {r['cost']:.3f} | {r['eff_score']:.3f} | "
                     f"{'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def efficiency_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([(f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in COLUMNS])
    return buf.getvalue()


def efficiency_plot(rows: list[dict[str, Any]], path: str | Path,
                    reference: str = "medmix") -> Path:
    """PNG of Perf against Cost with the Pareto front marked (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MedmixError("The efficiency plot needs matplotlib: pip install 'medmix[plots]' "
                          "(or pass plot=False for the table only).") from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["cost"])
    ax.plot([r["cost"] for r in front], [r["perf"] for r in front], "-", color="tab:orange",
            lw=1.5, zorder=1)
    for r in rows:
        is_ref = r["method"] == reference
        ax.scatter(r["cost"], r["perf"], s=70 if is_ref else 40, zorder=2,
                   marker="*" if is_ref else "o",
                   color="tab:orange" if r["pareto"] else "tab:blue",
                   edgecolors="black" if r["pareto"] else "none", linewidths=0.6)
        ax.annotate(r["method"], (r["cost"], r["perf"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    costs = [r["cost"] for r in rows if r["cost"] > 0]
    if costs and max(costs) / min(costs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"Cost (geometric mean of params, MACs, memory ratios to {reference})")
    ax.set_ylabel("Perf (mean of AUROC, AUPRC, macro-F1, accuracy)")
    ax.set_title("Performance against cost (lower cost, higher Perf is better)", fontsize=10)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:orange", lw=1.5, label="Pareto front"),
               Line2D([], [], ls="", marker="o", color="tab:orange", mec="black", mew=0.6,
                      label="on the front"),
               Line2D([], [], ls="", marker="o", color="tab:blue", label="dominated"),
               Line2D([], [], ls="", marker="*", color="gray", ms=9, label=reference)]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_efficiency(rows: list[dict[str, Any]], out_dir: str | Path, reference: str = "medmix",
                     plot: bool = True) -> list[Path]:
    """Write ``efficiency.md``, ``efficiency.csv`` and (``plot``) ``efficiency.png``.

    Returns:
        the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "efficiency.md", out / "efficiency.csv"]
    atomic_write_text(paths[0], efficiency_markdown(rows, reference))
    atomic_write_text(paths[1], efficiency_csv(rows))
    if plot:
        paths.append(efficiency_plot(rows, out / "efficiency.png", reference))
    return paths
