"""Batch: the tensors of one minibatch, masks always beside the data.

:class:`StoreTensors` holds a whole store in memory as tensors (one per modality and
expert); batches index them directly, so the training loop does no per-sample Python work.
With ``stream=True`` the embeddings stay in the store's files (:mod:`medmix_core.stream`)
and each batch reads its rows, for stores larger than memory; masks and labels stay in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from medmix_core.errors import StoreError
from medmix_core.store import EmbeddingStore
from medmix_core.stream import ZeroRows, load_streamed, rows_of, take_rows


@dataclass
class Batch:
    """One minibatch.

    Attributes:
        experts: modality -> K_m tensors ``[B, d_k]``; rows where the expert is masked hold
            arbitrary values (zeros from the store) and must not be read without the mask.
        expert_mask: modality -> ``[B, K_m]`` bool, True = expert embedding present.
        modality_mask: ``[B, M]`` bool, True = modality available (some expert present).
        labels: ``[B, C]`` float (binary, multi-label; NaN = unknown) or ``[B]`` long
            (multi-class; -1 = unknown), or None.
        label_mask: ``[B]`` bool, True = at least one label of the row known.
        teacher: modality -> ``[B, d_T]`` teacher embeddings (training only), or None.
        teacher_mask: ``[B, M]`` bool, True = teacher embedding present.
        index: ``[B]`` rows of the store.
    """

    experts: dict[str, list[torch.Tensor]]
    expert_mask: dict[str, torch.Tensor]
    modality_mask: torch.Tensor
    labels: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    teacher: dict[str, torch.Tensor] | None = None
    teacher_mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    modalities: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.modality_mask.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)
        return replace(
            self,
            experts={
                m: [x.to(device, non_blocking=True) for x in xs]
                for m, xs in self.experts.items()
            },
            expert_mask={m: mv(x) for m, x in self.expert_mask.items()},
            modality_mask=mv(self.modality_mask), labels=mv(self.labels),
            label_mask=mv(self.label_mask),
            teacher=None if self.teacher is None else {m: mv(x) for m, x in self.teacher.items()},
            teacher_mask=mv(self.teacher_mask), index=mv(self.index),
        )

    def with_masks(self, expert_mask: dict[str, torch.Tensor]) -> Batch:
        """A batch with new expert masks; the modality mask is recomputed from them."""
        mm = torch.stack([expert_mask[m].any(dim=1) for m in self.modalities], dim=1)
        tm = None if self.teacher_mask is None else self.teacher_mask & mm
        return replace(self, expert_mask=expert_mask, modality_mask=mm, teacher_mask=tm)


@dataclass
class StoreTensors:
    """A store's chosen experts, teachers and one task, as in-memory tensors.

    Attributes:
        modalities: modality names with at least one chosen expert, in store order.
        experts: modality -> expert names (in store order).
        emb: modality -> list of ``[N, d_k]`` (streamed: :class:`~medmix_core.stream.StreamedRows`
            objects with the same ``shape`` and ``[idx]``).
        mask: modality -> ``[N, K_m]`` bool.
        teacher / teacher_mask: modality -> ``[N, d_T]`` and ``[N, M]`` bool, or None.
        labels: ``[N, C]`` float with NaN where unknown (binary, multi-label), or ``[N]``
            long with -1 where unknown (multi-class); label_mask ``[N]``: some label known.
    """

    modalities: list[str]
    experts: dict[str, list[str]]
    emb: dict[str, list[torch.Tensor]]
    mask: dict[str, torch.Tensor]
    labels: torch.Tensor
    label_mask: torch.Tensor
    task_type: str
    n_outputs: int
    teacher: dict[str, torch.Tensor] | None = None
    teacher_mask: torch.Tensor | None = None
    teacher_name: str | None = None

    @classmethod
    def from_store(cls, store: EmbeddingStore, task: str | None = None,
                   experts: list[str] | None = None, teacher: str | None = None,
                   layout: dict[str, list[str]] | None = None,
                   dims: dict[str, list[int]] | None = None,
                   stream: bool = False) -> StoreTensors:
        """Load chosen experts (default: all) and optionally one teacher from a store.

        Args:
            store: the store.
            task: task name (default: the store's first).
            experts: expert names to keep, laid out in the store's order.
            teacher: teacher whose embeddings are loaded, or None.
            layout: modality -> expert names, the order a trained model expects. Experts are
                matched by name, never by position; a modality the store does not have is
                absent for every row (mask False). Overrides ``experts``.
            dims: with ``layout``, the dims the model expects (checked by name).
            stream: leave expert and teacher embeddings on disk and read each batch's rows
                from the shards (:func:`medmix_core.stream.should_stream` is the automatic
                rule); batches equal the in-memory ones bit for bit.
        Raises:
            StoreError: unknown experts, a layout expert missing from a modality the store
                has, dims that differ, or label values the task type does not allow; a
                present row holding NaN or Inf (streamed: when a batch reads it).
        """
        load, zeros = _loaders(store, stream)
        spec = store.task(task)
        available = store.expert_names()
        if layout is not None:
            names, emb, mask = _load_layout(store, layout, dims, load, zeros)
            mods = list(layout)
        else:
            wanted = available if experts is None else list(experts)
            unknown = [e for e in wanted if e not in available]
            if unknown:
                raise StoreError(f"Store {store.path} holds experts {available}, not {unknown}. "
                                 f"Extract them first: `medmix extract ... --experts "
                                 f"{','.join(wanted)} --out {store.path}`.")
            mods, names, emb, mask = [], {}, {}, {}
            for m in store.modalities:
                entries = [e for e in store.experts.get(m.name, []) if e.name in wanted]
                if not entries:
                    continue
                mods.append(m.name)
                names[m.name] = [e.name for e in entries]
                loaded = [load(e) for e in entries]
                emb[m.name] = [x for x, _ in loaded]
                mask[m.name] = torch.stack([k for _, k in loaded], dim=1)  # [N, K_m]
            if not mods:
                raise StoreError(f"None of the experts {wanted} is in store {store.path}.")
        labels, label_mask = task_labels(store, spec)
        t_emb = t_mask = None
        if teacher is not None:
            t_emb, cols = {}, []
            for m in mods:
                try:
                    e = store.entry(m, teacher, role="teacher")
                except StoreError:
                    cols.append(torch.zeros(store.n_samples, dtype=torch.bool))
                    continue
                x, k = load(e)
                t_emb[m] = x
                cols.append(k)
            if not t_emb:
                have = store.teacher_names()
                raise StoreError(f"Store {store.path} has no teacher {teacher!r} embeddings "
                                 f"(teachers present: {have or 'none'}). Extract them with "
                                 f"`medmix extract ... --teacher {teacher}` or run --no-distill.")
            t_mask = torch.stack(cols, dim=1)  # [N, M]
        return cls(mods, names, emb, mask, labels, label_mask, spec.type, spec.n_outputs,
                   t_emb, t_mask, teacher)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def dims(self) -> dict[str, list[int]]:
        return {m: [int(x.shape[1]) for x in self.emb[m]] for m in self.modalities}

    def teacher_dims(self) -> dict[str, int]:
        if self.teacher is None:
            return {}
        return {m: int(x.shape[1]) for m, x in self.teacher.items()}

    def modality_mask(self) -> torch.Tensor:
        return torch.stack([self.mask[m].any(dim=1) for m in self.modalities], dim=1)  # [N, M]

    def batch(self, idx: torch.Tensor, mask: dict[str, torch.Tensor] | None = None,
              teacher: bool = True) -> Batch:
        """The batch of rows ``idx``; ``mask`` replaces the stored expert masks (protocols);
        ``teacher=False`` leaves the teacher out (no rows read for it when streamed)."""
        mask = self.mask if mask is None else mask
        em = {m: rows_of(mask[m], idx) for m in self.modalities}
        mm = torch.stack([em[m].any(dim=1) for m in self.modalities], dim=1)  # [B, M]
        with_teacher = teacher and self.teacher is not None
        # one call for every table, so streamed tables read their rows concurrently
        tmods = list(self.teacher) if with_teacher else []
        rows = take_rows([x for m in self.modalities for x in self.emb[m]]
                         + [self.teacher[m] for m in tmods], idx)
        experts = {}
        for m in self.modalities:
            experts[m], rows = rows[:len(self.emb[m])], rows[len(self.emb[m]):]
        t_emb = dict(zip(tmods, rows)) if with_teacher else None
        # a modality dropped by a protocol takes its teacher embedding with it
        tmask = rows_of(self.teacher_mask, idx) & mm if with_teacher else None
        return Batch(
            experts=experts,
            expert_mask=em, modality_mask=mm, labels=rows_of(self.labels, idx),
            label_mask=rows_of(self.label_mask, idx), teacher=t_emb, teacher_mask=tmask,
            index=idx, modalities=list(self.modalities))


def task_labels(store: EmbeddingStore, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's labels with unknown kept as unknown, after checking their values.

    Returns:
        (labels, label_mask): ``[N, C]`` float with NaN (binary, multi-label) or ``[N]`` long
        with -1 (multi-class); ``[N]`` bool, True where some label of the row is known.
    Raises:
        StoreError: a binary or multi-label value other than 0/1, or a class index outside
            [0, C), counted and named.
    """
    raw = store.labels(spec.name)
    where = f"Store {store.path}, task {spec.name!r} ({spec.type})"
    if spec.type == "multiclass":
        known = ~torch.isnan(raw)
        vals = raw[known]
        bad = (vals != vals.round()) | (vals < 0) | (vals >= spec.n_outputs)
        if bool(bad.any()):
            raise StoreError(f"{where}: {int(bad.sum())} labels are not class indices in "
                             f"[0, {spec.n_outputs}) (e.g. {sorted(set(vals[bad].tolist()))[:5]}"
                             f"); re-extract with corrected labels (NaN marks unknown).")
        return torch.where(known, raw, torch.full_like(raw, -1)).long(), known
    raw2 = raw.reshape(len(raw), -1)
    if raw2.shape[1] != spec.n_outputs:
        raise StoreError(f"{where}: labels have {raw2.shape[1]} columns, the task declares "
                         f"{spec.n_outputs} ({spec.classes}). The store is inconsistent; "
                         f"re-extract it.")
    known = ~torch.isnan(raw2)
    vals = raw2[known]
    bad = (vals != 0) & (vals != 1)
    if bool(bad.any()):
        raise StoreError(f"{where}: {int(bad.sum())} labels are neither 0 nor 1 (e.g. "
                         f"{sorted(set(vals[bad].tolist()))[:5]}); a {spec.type} label must be "
                         f"0, 1 or NaN (unknown). Fix the labels and re-extract.")
    return raw2, known.any(dim=1)


def _loaders(store: EmbeddingStore, stream: bool):
    """(load entry -> (emb, mask), zeros (n, d) -> absent table), in memory or streamed."""
    if not stream:
        return store.load, torch.zeros
    return (lambda e: load_streamed(store, e)), ZeroRows


def _load_layout(store: EmbeddingStore, layout: dict[str, list[str]],
                 dims: dict[str, list[int]] | None, load=None, zeros=torch.zeros):
    """Embeddings and masks of ``layout`` (modality -> expert names), matched by name."""
    load = store.load if load is None else load
    names, emb, mask = {}, {}, {}
    have_mods = {m.name for m in store.modalities}
    n = store.n_samples
    for m, experts in layout.items():
        entries = {e.name: e for e in store.experts.get(m, [])}
        want_dims = (dims or {}).get(m)
        if m not in have_mods or not entries:
            if want_dims is None:
                raise StoreError(f"Store {store.path} has no modality {m!r}; its dims are "
                                 f"needed to mark it absent.")
            # a modality this cohort lacks is absent for every row, never zero-valued
            emb[m] = [zeros(n, d) for d in want_dims]
            mask[m] = torch.zeros(n, len(experts), dtype=torch.bool)  # [N, K_m]
            names[m] = list(experts)
            continue
        lacking = [e for e in experts if e not in entries]
        if lacking:
            raise StoreError(f"Store {store.path}, modality {m!r} has experts "
                             f"{list(entries)} but the model expects {experts}: {lacking} are "
                             f"missing. Encode the cohort with the run's experts (`medmix "
                             f"predict RUN --source RAW` does this from raw data).")
        loaded = [load(entries[e]) for e in experts]
        if want_dims is not None:
            got = [int(x.shape[1]) for x, _ in loaded]
            if got != list(want_dims):
                pairs = [f"{e}: {g} vs {w}" for e, g, w in zip(experts, got, want_dims) if g != w]
                raise StoreError(f"Store {store.path}, modality {m!r}: expert dims differ from "
                                 f"the model's ({', '.join(pairs)}; store vs model). The "
                                 f"cohort was encoded with other expert options.")
        names[m] = list(experts)
        emb[m] = [x for x, _ in loaded]
        mask[m] = torch.stack([k for _, k in loaded], dim=1)  # [N, K_m]
    return names, emb, mask
