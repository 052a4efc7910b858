"""``medmix export``: a run's deployed (teacher-free) fuser as a portable ONNX or TorchScript file.

The exported graph takes flat tensors, one per (modality, expert), in the run's order::

    emb__<modality>__<expert>   [B, d_k] float32   (any values where the mask is False)
    mask__<modality>            [B, K_m] bool      True = that expert's embedding is present

and returns the mean over the run's seeds (what ``medmix predict`` writes)::

    probs             [B, C]          fused probabilities (sigmoid; softmax for multi-class)
    modality_weights  [B, M]          inter-modality weights, 0 for missing modalities
    router_weights    [B, M, K_max]   intra-modality expert weights

(the weight outputs only for fusers that have them). A sidecar ``<file>.json`` records the
input and output names, shapes, the experts and their provenance, and the run's
``calibration.json`` when there is one: serving code reads it instead of guessing.

A fuser is exported only when it is *per-patient*: its outputs for one patient must not
depend on the other patients in the batch (M3Care's batch similarity graph does), which is
checked on real rows before export, and it must not read teacher embeddings at inference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmix_core.batch import Batch
from medmix_core.errors import MedmixError
from medmix_core.fusion import Fuser, FusionSpec
from medmix_core.metrics import probabilities

FORMATS = ("onnx", "torchscript")
#: largest |onnxruntime - torch| difference the parity check accepts (float32 graphs)
PARITY_ATOL = 1e-5
OPSET = 18


def input_names(spec: FusionSpec) -> list[str]:
    """Names of the exported graph's inputs, in order: embeddings then masks."""
    return ([f"emb__{m}__{e}" for m in spec.modalities for e in spec.experts[m]]
            + [f"mask__{m}" for m in spec.modalities])


class _TracedBatch(Batch):
    """A Batch whose size stays symbolic under tracing (``int()`` would fix it at export)."""

    @property
    def size(self):  # noqa: ANN201  (an int eagerly, a symbolic size under export)
        return self.modality_mask.shape[0]


class FlatFuser(nn.Module):
    """The seeds' fusers behind a flat-tensor interface (what an exporter can trace).

    ``forward(*embeddings, *masks)`` builds the :class:`~medmix_core.batch.Batch` inside and
    returns (probs [B, C], then modality_weights [B, M] and router_weights [B, M, K_max]
    where the fuser has them), each the mean over the seeds.
    """

    def __init__(self, models: list[Fuser], outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.spec = models[0].spec
        self.outputs = outputs
        self.n_emb = sum(len(self.spec.experts[m]) for m in self.spec.modalities)

    def batch(self, flat: tuple[torch.Tensor, ...]) -> Batch:
        embs, masks = flat[:self.n_emb], flat[self.n_emb:]
        experts, i = {}, 0
        for m in self.spec.modalities:
            k = len(self.spec.experts[m])
            experts[m] = list(embs[i:i + k])
            i += k
        em = {m: masks[j].to(torch.bool) for j, m in enumerate(self.spec.modalities)}
        mm = torch.stack([em[m].any(dim=1) for m in self.spec.modalities], dim=1)  # [B, M]
        return _TracedBatch(experts=experts, expert_mask=em, modality_mask=mm,
                            modalities=list(self.spec.modalities))

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = self.batch(flat)
        acc: dict[str, torch.Tensor] = {}
        for model in self.models:
            out = model(batch)
            got = {"probs": probabilities(out.logits, self.spec.task_type),
                   "modality_weights": out.modality_weights, "router_weights": out.router_weights}
            for k in self.outputs:
                acc[k] = got[k].float() if k not in acc else acc[k] + got[k].float()
        return tuple(acc[k] / len(self.models) for k in self.outputs)


def flat_inputs(batch: Batch, spec: FusionSpec) -> tuple[torch.Tensor, ...]:
    """A Batch as the exported graph's inputs (the order of :func:`input_names`)."""
    embs = [batch.experts[m][k].float().contiguous() for m in spec.modalities
            for k in range(len(spec.experts[m]))]
    return tuple(embs + [batch.expert_mask[m].bool() for m in spec.modalities])


def _outputs_of(model: Fuser, batch: Batch) -> tuple[str, ...]:
    with torch.no_grad():
        out = model(batch)
    return ("probs",) + tuple(k for k in ("modality_weights", "router_weights")
                              if getattr(out, k) is not None)


def check_per_patient(wrapper: FlatFuser, flat: tuple[torch.Tensor, ...], name: str) -> None:
    """Refuse a fuser whose outputs for a patient change with the rest of the batch.

    Two probes on real rows: the batch against its first half, and each of the first rows
    alone against four copies of it (copies are maximally similar patients, so a batch
    graph, however sparse for these rows, gains edges).
    """
    diffs = []
    with torch.no_grad():
        whole = wrapper(*flat)
        half = max(1, flat[0].shape[0] // 2)
        part = wrapper(*(x[:half] for x in flat))
        diffs += [float((a[:half] - b).abs().max()) for a, b in zip(whole, part)]
        for r in range(min(4, flat[0].shape[0])):
            one = wrapper(*(x[r:r + 1] for x in flat))
            copies = wrapper(*(x[r:r + 1].repeat((4,) + (1,) * (x.ndim - 1)) for x in flat))
            diffs += [float((a - b[:1]).abs().max()) for a, b in zip(one, copies)]
    if max(diffs) > 1e-5:
        raise MedmixError(f"Fuser {name!r} is not per-patient: a patient's prediction changes "
                          f"with the other patients in the batch (max difference "
                          f"{max(diffs):.3g}), so an exported model would give different "
                          f"answers depending on who is scored with whom. Deploy it with "
                          f"`medmix predict` on whole cohorts instead.")


def load_run_models(run_dir: Path, seed: int | None = None) -> tuple[list[Fuser], dict]:
    """The run's deployed fusers (all seeds, or one), refusing teacher-reading ones."""
    from medmix_core.runner import load_model
    from medmix_core.runs import open_run

    seeds = open_run(run_dir).finished_seeds()  # an incomplete run is refused
    if seed is not None:
        seeds = [p for p in seeds if p.name == f"seed_{seed}"]
    if not seeds:
        raise MedmixError(f"{run_dir} holds no trained model"
                          + (f" for seed {seed}" if seed is not None else "")
                          + f" (expected seed_*/model.json from `medmix run --out {run_dir}`).")
    loaded = [load_model(p) for p in seeds]
    models = [m for m, _ in loaded]
    meta = loaded[0][1]
    if models[0].uses_teacher_at_inference:
        raise MedmixError(f"Fuser {meta['fuser']!r} reads teacher-class embeddings at "
                          f"inference; the export is the teacher-free deployed model, which "
                          f"this fuser does not have.")
    return models, {"fuser": meta["fuser"], "seeds": [int(p.name[5:]) for p in seeds]}


def example_batch(run_dir: Path, spec: FusionSpec, n: int = 64) -> Batch:
    """Real test rows of the run's store (with their missing modalities), for tracing."""
    from medmix_core.batch import StoreTensors
    from medmix_core.runner import check_compatible
    from medmix_core.store import EmbeddingStore

    cfg = json.loads((run_dir / "config.json").read_text("utf-8"))
    store = EmbeddingStore.open(cfg["store"])
    tensors = StoreTensors.from_store(store, cfg.get("task"),
                                      sorted({e for v in spec.experts.values() for e in v}))
    tensors.modalities = [m for m in tensors.modalities if m in spec.modalities]
    check_compatible(spec, tensors, f"Store {store.path}")
    rows = torch.as_tensor((store.splits.get("test") or list(range(store.n_samples)))[:n])
    return tensors.batch(rows)


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               seed: int | None = None, batch: Batch | None = None) -> Path:
    """Export a run's deployed fuser (mean over seeds, or one seed).

    Args:
        run_dir: a folder written by ``medmix run``.
        fmt: "onnx" (needs the ``export`` extra) or "torchscript".
        out: file to write (default ``RUN/export/model.onnx`` or ``model.pt``).
        seed: export that seed alone instead of the seed ensemble.
        batch: rows to trace with and check per-patient behaviour on (default: the first
            64 test rows of the run's store).
    Returns:
        the written file; ``<file>.json`` beside it describes inputs and outputs.
    Raises:
        MedmixError: for a fuser that is not per-patient or reads teachers, or whose export
            does not match torch (within :data:`PARITY_ATOL`) on the traced rows and on a
            batch of another size; nothing is written then.
    """
    from medmix_core.store import atomic_write_bytes, atomic_write_text

    if fmt not in FORMATS:
        raise MedmixError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}.")
    run_dir = Path(run_dir)
    models, info = load_run_models(run_dir, seed)
    spec = models[0].spec
    batch = example_batch(run_dir, spec) if batch is None else batch
    wrapper = FlatFuser(models, _outputs_of(models[0], batch)).eval()
    flat = flat_inputs(batch, spec)
    check_per_patient(wrapper, flat, info["fuser"])
    path = Path(out) if out else run_dir / "export" / ("model.onnx" if fmt == "onnx"
                                                       else "model.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = input_names(spec)
    if fmt == "onnx":
        data = _onnx_bytes(wrapper, flat, names, info["fuser"])
        _verify(_onnx_runner(data, names), wrapper, flat, info["fuser"], fmt)
    else:
        import io

        with torch.no_grad():
            traced = torch.jit.trace(wrapper, flat, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        loaded = torch.jit.load(io.BytesIO(data))
        def run_ts(xs):
            with torch.no_grad():
                return [t.numpy() for t in loaded(*xs)]
        _verify(run_ts, wrapper, flat, info["fuser"], fmt)
    atomic_write_bytes(path, data)
    from medmix_core.clinical import load_calibration

    enc_path = run_dir / "encoders.json"
    enc = json.loads(enc_path.read_text("utf-8")) if enc_path.is_file() else {}
    dims = {f"emb__{m}__{e}": d for m in spec.modalities
            for e, d in zip(spec.experts[m], spec.dims[m])}
    sidecar = {
        "format": fmt, "file": path.name, "fuser": info["fuser"], "seeds": info["seeds"],
        "task_type": spec.task_type, "n_outputs": spec.n_outputs,
        "modalities": spec.modalities, "experts": spec.experts,
        "inputs": [{"name": n, "dtype": "float32", "shape": ["B", dims[n]]} if n in dims else
                   {"name": n, "dtype": "bool",
                    "shape": ["B", len(spec.experts[n.split("__", 1)[1]])]} for n in names],
        "outputs": [{"name": k, "shape": {"probs": ["B", spec.n_outputs],
                                          "modality_weights": ["B", spec.n_modalities],
                                          "router_weights": ["B", spec.n_modalities,
                                                             spec.max_experts]}[k]}
                    for k in wrapper.outputs],
        "encoders": enc.get("encoders", []),
        "calibration": load_calibration(run_dir),
        "note": "probs is the mean over seeds; apply `calibration` (if not null) to it with "
                "medmix_core.clinical.apply_calibration, as `medmix predict` does.",
    }
    atomic_write_text(Path(str(path) + ".json"), json.dumps(sidecar, indent=1))
    return path


def _verify(run_fn, wrapper: FlatFuser, flat: tuple[torch.Tensor, ...], fuser: str,
            fmt: str) -> None:
    """The exported model must match torch on the traced rows and on a batch of another size
    (the traced rows twice over), within :data:`PARITY_ATOL`."""
    import numpy as np

    for xs in (flat, tuple(torch.cat([x, x]) for x in flat)):
        with torch.no_grad():
            want = [t.numpy() for t in wrapper(*xs)]
        try:
            got = run_fn(xs)
            diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
        except Exception as exc:  # a runtime shape error: the graph fixed a batch size
            raise MedmixError(f"Fuser {fuser!r}: the exported {fmt} model fails on a batch "
                              f"of {xs[0].shape[0]} rows ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); it fixed the traced batch size. Serve it "
                              f"with `medmix predict`.") from exc
        if diff > PARITY_ATOL:
            raise MedmixError(f"Fuser {fuser!r}: the exported {fmt} model differs from torch "
                              f"by {diff:.3g} (> {PARITY_ATOL}) on a batch of "
                              f"{xs[0].shape[0]} rows; not written.")


def _onnx_runner(data: bytes, names: list[str]):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MedmixError("ONNX export checks the model with onnxruntime: pip install "
                          "'medmix[export]'.") from exc
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    have = {i.name for i in sess.get_inputs()}

    def run(xs):
        return sess.run(None, {n: x.numpy() for n, x in zip(names, xs) if n in have})
    return run


def _onnx_bytes(wrapper: FlatFuser, flat: tuple[torch.Tensor, ...], names: list[str],
                fuser: str) -> bytes:
    try:
        import onnx  # noqa: F401  (the exporter imports it; fail early with the extra's name)
        import onnxruntime  # noqa: F401  (the written model is checked with it)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MedmixError("ONNX export needs the export extra: pip install "
                          "'medmix[export]' (onnx, onnxscript, onnxruntime).") from exc
    import logging
    import tempfile
    import warnings

    # the exporter logs a warning per optional op library it lacks (torchvision): noise here
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    batch_dim = torch.export.Dim("batch", min=1)
    shapes = (tuple({0: batch_dim} for _ in flat),)  # one entry: the *flat varargs
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = Path(tmp) / "model.onnx"
        try:
            prog = torch.onnx.export(wrapper, flat, input_names=names,
                                     output_names=list(wrapper.outputs),
                                     dynamic_shapes=shapes, opset_version=OPSET, dynamo=True,
                                     external_data=False, verbose=False)
            prog.save(str(f))
        except Exception as exc:  # exporter failures name an op, not a remedy
            raise MedmixError(f"Fuser {fuser!r} could not be exported to ONNX: "
                              f"{type(exc).__name__}: {str(exc)[:400]}. Export it with "
                              f"--format torchscript, or serve it with `medmix predict`.") \
                from exc
        finally:
            log.setLevel(level)
        import onnx

        model = onnx.load(str(f))
        # an input the graph reads only through its batch size (or not at all) can come out
        # with the traced size fixed; every input shares one symbolic batch axis
        for inp in model.graph.input:
            dim0 = inp.type.tensor_type.shape.dim[0]
            dim0.ClearField("dim_value")
            dim0.dim_param = "batch"
        onnx.checker.check_model(model)
        return model.SerializeToString()


def onnx_predict(path: str | Path, batch: Batch, spec: FusionSpec) -> dict[str, Any]:
    """Run an exported ONNX model with onnxruntime on a Batch (numpy outputs by name)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MedmixError("Running ONNX models needs onnxruntime: pip install "
                          "'medmix[export]'.") from exc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: x.numpy() for n, x in zip(input_names(spec), flat_inputs(batch, spec))}
    have = {i.name for i in sess.get_inputs()}
    # an input the graph never reads (a masked-out expert) may be pruned by the exporter
    feed = {k: v for k, v in feed.items() if k in have}
    outs = sess.run(None, feed)
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}
