"""Efficiency profiling of fusers: what one fuser costs, on real batches of a store.

:func:`profile_fuser` measures

* parameters: trainable (fuser + teacher heads when distillation is on) and deployed
  (fuser only; teacher heads are training-only), optionally plus the upstream expert
  encoders that stay in the deployed pipeline, and the teacher encoder for fusers that
  read teacher embeddings at inference;
* multiply-accumulates of one inference forward per sample (:mod:`medmix_core.flops`:
  fvcore, one per multiply-add, so MACs / GMACs), with the operators fvcore could not count;
* peak memory (:mod:`medmix_core.memory`): ``torch.cuda.max_memory_allocated`` on CUDA; on
  CPU the peak of live tensor storage plus the process's peak RSS, each labelled;
* latency (median, p90) and throughput of inference and of one training step: the
  :class:`~medmix_core.training.TrainStep` that ``medmix run`` trains with (forward,
  backward, clipping, optimizer and scheduler step; distillation at its full weight).

:func:`write_profile` writes ``profile.json`` and ``profile.md``. The paper's efficiency
table built from profiles is :mod:`medmix_core.efficiency`; the machine description is
:mod:`medmix_core.machine`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmix_core.batch import Batch, StoreTensors
from medmix_core.config import RunConfig
from medmix_core.efficiency import (
    efficiency_csv,
    efficiency_markdown,
    efficiency_plot,
    efficiency_table,
    pareto_front,
    read_perf,
    write_efficiency,
)
from medmix_core.errors import MedmixError
from medmix_core.experts import ExpertEncoder
from medmix_core.flops import MAC_NOTE, count_macs
from medmix_core.machine import busy_cpu_note, machine_info
from medmix_core.memory import (
    RSS_LABEL,
    batch_tensors,
    measure_memory,
    module_tensors,
    peak_rss_bytes,
)
from medmix_core.store import atomic_write_text
from medmix_core.training import (
    TrainStep,
    autocast_context,
    build_fuser,
    make_spec,
    resolve_device,
    resolve_distill,
)
from medmix_core.units import format_bytes, format_count, format_macs

# with the profiler, the efficiency table and the machine description it feeds are
# importable from here (`medmix profile` and the benchmarks do)
__all__ = [
    "efficiency_csv", "efficiency_markdown", "efficiency_plot", "efficiency_table",
    "load_profiles", "machine_info", "pareto_front", "prepare_tensors", "profile_fuser",
    "profile_markdown", "read_perf", "write_efficiency", "write_profile",
]


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
    teacher = cfg.teacher or store.default_teacher()
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

    The training step measured is :class:`~medmix_core.training.TrainStep`, the one
    ``medmix run`` trains with, built from ``cfg`` as a run builds it (distillation decided
    by :func:`~medmix_core.training.resolve_distill`), on all rows of the store, with
    distillation at its full weight.

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
        seed: model initialisation, batch order and mask augmentation.
    Returns:
        a JSON-ready dict: ``params``, ``macs``, ``memory``, ``latency``, ``machine``,
        ``notes`` and what was profiled.
    Raises:
        MedmixError: an unknown fuser, bad sizes, a teacher-reading fuser without teacher
            embeddings, an untraceable fuser, and whatever training refuses (distillation
            without teacher embeddings, or of a fuser without modality representations).
    """
    if int(batch_size) < 1 or int(repeats) < 1 or int(warmup) < 0:
        raise MedmixError(f"profile needs batch_size >= 1, repeats >= 1 and warmup >= 0; got "
                          f"batch_size={batch_size}, repeats={repeats}, warmup={warmup}.")
    if tensors.n < 1:
        raise MedmixError("The store has no samples to profile on.")
    dev = resolve_device(device)
    bs = min(int(batch_size), tensors.n)
    run_cfg = resolve_distill(cfg.model_copy(update={
        "fuser": fuser, "fuser_options": cfg.fuser_options if cfg.fuser == fuser else {},
        "batch_size": bs}))
    spec = make_spec(tensors)
    torch.manual_seed(seed)
    model = build_fuser(run_cfg, spec).to(dev)
    uses_teacher = bool(getattr(model, "uses_teacher_at_inference", False))
    notes: list[str] = []
    if uses_teacher and tensors.teacher is None:
        raise MedmixError(f"Fuser {fuser!r} reads teacher embeddings at inference, but none "
                          f"were loaded. Profile a store with a teacher (--teacher NAME).")

    # batches: a seeded permutation of all rows, cut into full batches, built once
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tensors.n, generator=gen)
    step = TrainStep(run_cfg, model, tensors, dev, perm, seed=seed)  # [n] rows train it
    heads = step.heads
    params = _params_section(model, heads, fuser, include_experts, teacher_encoder,
                             uses_teacher, tensors, notes)
    n_batches = max(1, tensors.n // bs)
    need = warmup + repeats
    chunks = [perm[j * bs:(j + 1) * bs] for j in range(min(need, n_batches))]

    def infer_batch(idx: torch.Tensor) -> Batch:
        b = tensors.batch(idx)
        return b if uses_teacher else replace(b, teacher=None, teacher_mask=None)

    infer_batches = [infer_batch(idx).to(dev) for idx in chunks]

    # MACs on the first real batch
    macs = count_macs(model, infer_batches[0])

    # inference
    model.eval()

    def infer(i: int) -> None:
        with torch.no_grad(), autocast_context(dev, run_cfg.amp):
            model(infer_batches[i % len(infer_batches)])

    mem_inf = measure_memory(lambda: infer(0), dev,
                             module_tensors(model) + batch_tensors(infer_batches[0]))
    lat_inf = _timed(infer, repeats, warmup, dev, bs)
    infer_batches.clear()  # free them before the training batches

    # the training step, on batches prepared as training prepares them
    step.train()
    mask_gen = torch.Generator().manual_seed(seed)
    train_batches = [step.prepare(idx, mask_gen) for idx in chunks]
    epoch = step.full_weight_epoch

    def train(i: int) -> None:
        step.update(train_batches[i % len(train_batches)], epoch)

    train(0)  # creates the optimizer state, so the measured step is a steady-state one
    opt_state = [t for s in step.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
    step.optimizer.zero_grad(set_to_none=True)
    mem_train = measure_memory(lambda: train(1), dev, module_tensors(model, heads) + opt_state
                               + batch_tensors(train_batches[1 % len(train_batches)]))
    lat_train = _timed(train, repeats, warmup, dev, bs)

    mach = machine_info(dev)
    busy = busy_cpu_note(mach)
    if busy:
        notes.append(busy)
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
            f"| {r['fuser']} | {format_count(r['params']['deployed'])} | "
            f"{format_count(r['params']['trainable'])} | {format_macs(r['macs']['per_sample'])} | "
            f"{format_bytes(r['memory']['inference']['peak_bytes'])} | "
            f"{format_bytes(r['memory']['train_step']['peak_bytes'])} | "
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
            lines.append(f"{RSS_LABEL}: {format_bytes(rss)}.")
        lines.append("")
    for r in results:
        p = r["params"]
        lines.append(f"## {r['fuser']}")
        lines.append("")
        lines.append(f"- parameters: fuser {format_count(p['fuser'])}, teacher heads (training "
                     f"only) {format_count(p['teacher_heads'])}, deployed "
                     f"{format_count(p['deployed'])} = {' + '.join(p['deployed_includes'])}")
        if p["experts"] is not None:
            lines.append("- expert encoders: " + ", ".join(
                f"{k} {format_count(v)}" for k, v in p["experts"].items()))
        ops = r["macs"]["unsupported_ops"]
        lines.append("- MACs by operator: " + (", ".join(
            f"{k} {format_macs(v / r['macs']['batch_size'])}"
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

