"""Synthetic cohorts with a known answer, for tests and benchmarks.

A latent vector h ~ N(0, I) per sample drives the labels; every modality sees a noisy
linear view of h, and every expert of a modality a noisy random projection of that view,
scaled by its *informativeness* (0 = pure noise). Modalities go missing at chosen rates.

Two entry points:
    ``write_synthetic_store(path, ...)`` writes an EmbeddingStore directly (fast; experts,
    teachers, masks, labels, splits), which is what fuser tests use.
    The ``synthetic`` dataset plugin yields raw tabular samples (the modality views), so
    ``medmix extract --dataset synthetic --experts stats`` exercises the whole data path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core import (
    Dataset,
    EmbeddingStore,
    ModalitySpec,
    Sample,
    StoreWriter,
    TabularData,
    TaskSpec,
    hookimpl,
    stratified_split,
)
from medmix_core.errors import DataError
from medmix_core.store import EncoderEntry

LATENT = 8


def _labels(h: np.ndarray, task_type: str, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    if task_type == "binary":
        w = rng.normal(size=LATENT)
        return (h @ w + 0.3 * rng.normal(size=len(h)) > 0).astype(np.float32)  # [N]
    if task_type == "multilabel":
        w = rng.normal(size=(LATENT, n_classes))
        return (h @ w + 0.3 * rng.normal(size=(len(h), n_classes)) > 0).astype(np.float32)
    if task_type == "multiclass":
        w = rng.normal(size=(LATENT, n_classes))
        return (h @ w + 0.3 * rng.normal(size=(len(h), n_classes))).argmax(1).astype(np.float32)
    raise DataError(f"task_type must be binary, multilabel or multiclass, got {task_type!r}.")


def generate(n: int, n_modalities: int, view_dim: int, informativeness: Sequence[float],
             missing: Sequence[float], task_type: str, n_classes: int, seed: int) -> dict[str, Any]:
    """Latents, labels, per-modality views [N, view_dim] and availability [N, M]."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, LATENT))  # [N, 8]
    y = _labels(h, task_type, n_classes, rng)
    views, avail = [], []
    for m in range(n_modalities):
        a = rng.normal(size=(LATENT, view_dim)) / np.sqrt(LATENT)
        info = informativeness[m]
        views.append((info * h @ a + rng.normal(size=(n, view_dim))).astype(np.float32))
        avail.append(rng.random(n) >= missing[m])
    return {"h": h, "y": y, "views": views, "avail": np.stack(avail, 1)}


def write_synthetic_store(
    path: str | Path, n: int = 600, n_modalities: int = 3,
    experts_per_modality: Sequence[int] | int = 2, dims: Sequence[int] = (16, 32, 24),
    expert_informativeness: Sequence[Sequence[float]] | None = None,
    modality_informativeness: Sequence[float] | None = None,
    missing: Sequence[float] | float = 0.2, expert_missing: float = 0.1,
    teacher_dim: int | None = 48, task_type: str = "binary", n_classes: int = 3,
    seed: int = 0,
) -> EmbeddingStore:
    """Write a synthetic EmbeddingStore and open it.

    Args:
        path: output folder.
        n: samples.
        n_modalities: M.
        experts_per_modality: K_m (one int for all, or one per modality).
        dims: expert dims, cycled over experts.
        expert_informativeness: per modality, per expert scale of the signal (0 = noise).
        modality_informativeness: per modality scale of the signal in its view.
        missing: per-modality (or shared) probability that a modality is absent.
        expert_missing: probability that one expert of an available modality is absent.
        teacher_dim: width of a teacher embedding per modality (None = no teacher).
        task_type: "binary", "multilabel" or "multiclass".
        n_classes: C for multi-label / multi-class.
        seed: everything is a function of it.
    Returns:
        the opened store.
    """
    ks = ([experts_per_modality] * n_modalities if isinstance(experts_per_modality, int)
          else list(experts_per_modality))
    miss = [missing] * n_modalities if isinstance(missing, (int, float)) else list(missing)
    minfo = modality_informativeness or [1.0] * n_modalities
    einfo = expert_informativeness or [[1.0] * k for k in ks]
    if len(ks) != n_modalities or len(miss) != n_modalities or len(minfo) != n_modalities:
        raise DataError(f"expected {n_modalities} entries per modality list, got "
                        f"K={len(ks)}, missing={len(miss)}, informativeness={len(minfo)}.")
    g = generate(n, n_modalities, 16, minfo, miss, task_type, n_classes, seed)
    rng = np.random.default_rng(seed + 1)
    writer = StoreWriter(path)
    mods = [ModalitySpec(name=f"mod{m}", kind="tabular") for m in range(n_modalities)]
    experts: dict[str, list[EncoderEntry]] = {}
    teachers: dict[str, list[EncoderEntry]] = {}
    di = 0
    for m, spec in enumerate(mods):
        view, avail = g["views"][m], g["avail"][:, m]
        emask = np.stack([avail & (rng.random(n) >= expert_missing) for _ in range(ks[m])], 1)
        dead = avail & ~emask.any(1)  # keep "modality available" == "some expert present"
        emask[dead, 0] = True
        experts[spec.name] = []
        for k in range(ks[m]):
            d = dims[di % len(dims)]
            di += 1
            p = rng.normal(size=(16, d)) / 4.0
            emb = (einfo[m][k] * view @ p + rng.normal(size=(n, d))).astype(np.float32)
            name = f"e{k}"
            rec = writer.write_shard(writer.shard_path(spec.name, name, 0), emb, emask[:, k])
            experts[spec.name].append(EncoderEntry(
                spec.name, name, d, "expert", "synthetic",
                {"expert": name, "informativeness": float(einfo[m][k])},
                [{**rec, "start": 0, "stop": n}]))
        if teacher_dim:
            p = rng.normal(size=(LATENT, teacher_dim))
            temb = (g["h"] @ p + 0.1 * rng.normal(size=(n, teacher_dim))).astype(np.float32)
            rel = writer.shard_path(spec.name, "teacher", 0, role="teacher")
            rec = writer.write_shard(rel, temb, avail)
            teachers[spec.name] = [EncoderEntry(spec.name, "teacher", teacher_dim, "teacher",
                                                "teacher", {"expert": "teacher"},
                                                [{**rec, "start": 0, "stop": n}])]
    y = g["y"]
    classes = [] if task_type == "binary" else [f"c{i}" for i in range(n_classes)]
    strat = y.astype(int) if y.ndim == 1 else y.argmax(1).astype(int)
    labels_file, sha = writer.write_labels({"target": y})
    writer.write_manifest(
        sample_ids=[f"s{i:06d}" for i in range(n)], modalities=mods,
        tasks=[TaskSpec("target", task_type, classes)], splits=stratified_split(strat, seed=seed),
        experts=experts, teachers=teachers, labels_file=labels_file, labels_sha256=sha,
        dataset={"name": "synthetic", "seed": seed, "n": n})
    return EmbeddingStore.open(path)


class SyntheticDataset(Dataset):
    """Raw synthetic samples: M tabular modalities (16 values each) and one binary task.

    Options: n (default 300), n_modalities (3), missing (0.2), seed (0).
    """

    name = "synthetic"
    default_experts = ("stats",)

    def _gen(self) -> dict[str, Any]:
        o = self.options
        m = int(o.get("n_modalities", 3))
        return generate(int(o.get("n", 300)), m, 16, [1.0] * m,
                        [float(o.get("missing", 0.2))] * m, "binary", 2, int(o.get("seed", 0)))

    def modalities(self) -> list[ModalitySpec]:
        m = int(self.options.get("n_modalities", 3))
        return [ModalitySpec(f"mod{i}", "tabular", [f"v{j}" for j in range(16)]) for i in range(m)]

    def tasks(self) -> list[TaskSpec]:
        return [TaskSpec("target", "binary")]

    def samples(self) -> list[Sample]:
        g = self._gen()
        mods = self.modalities()
        out = []
        for i in range(len(g["y"])):
            payload = {
                spec.name: (TabularData(spec.variables, g["views"][j][i].astype(np.float64))
                            if g["avail"][i, j] else None)
                for j, spec in enumerate(mods)}
            out.append(Sample(f"s{i:06d}", payload, {"target": float(g["y"][i])}))
        return out

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@hookimpl
def register_datasets(register):
    register("synthetic", SyntheticDataset)
