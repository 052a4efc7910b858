"""Streamed stores: batches read from the shard files equal the in-memory ones, training is
bit-identical both ways, damaged rows are reported per batch, and reads hold nothing open."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from medmix_core.batch import StoreTensors
from medmix_core.config import make_config
from medmix_core.errors import StoreError
from medmix_core.protocols import Protocol, apply_protocol
from medmix_core.store import EmbeddingStore, EncoderEntry, StoreWriter, atomic_save_tensors
from medmix_core.stream import (
    StreamedRows,
    ZeroRows,
    embedding_bytes,
    read_header,
    should_stream,
)
from medmix_core.training import make_spec, train_seed
from medmix_core.types import ModalitySpec, TaskSpec


def _both(store, **kw):
    return (StoreTensors.from_store(store, **kw),
            StoreTensors.from_store(store, stream=True, **kw))


def _same_batch(a, b):
    assert a.modalities == b.modalities
    for m in a.modalities:
        assert len(a.experts[m]) == len(b.experts[m])
        for x, y in zip(a.experts[m], b.experts[m]):
            assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
        assert torch.equal(a.expert_mask[m], b.expert_mask[m])
    assert torch.equal(a.modality_mask, b.modality_mask)
    assert torch.equal(torch.nan_to_num(a.labels, nan=-7.0), torch.nan_to_num(b.labels, nan=-7.0))
    assert torch.equal(a.label_mask, b.label_mask)
    assert (a.teacher is None) == (b.teacher is None)
    if a.teacher is not None:
        assert a.teacher.keys() == b.teacher.keys()
        for m in a.teacher:
            assert torch.equal(a.teacher[m], b.teacher[m])
        assert torch.equal(a.teacher_mask, b.teacher_mask)


def _write_store(path, n=90, shard_rows=(25, 40, 25), dims=(6, 5), dtype=torch.float32,
                 nan_row=None, nan_masked=False):
    """A two-modality store with several uneven shards per expert, written as extraction
    does; ``dtype`` is the stored float type; ``nan_row`` puts NaN in that row of mod0/e0."""
    rng = np.random.default_rng(0)
    w = StoreWriter(path)
    experts, teachers = {}, {}
    for mi, m in enumerate(("mod0", "mod1")):
        experts[m] = []
        for k, d in enumerate(dims):
            emb = rng.normal(size=(n, d)).astype(np.float32)
            mask = rng.random(n) > 0.3
            if nan_row is not None and (mi, k) == (0, 0):
                mask[nan_row] = not nan_masked
                emb[nan_row, 1] = np.nan
            shards, start = [], 0
            for j, rows in enumerate(shard_rows):
                sl = slice(start, start + rows)
                rel = w.shard_path(m, f"e{k}", j)
                em = torch.from_numpy(np.where(mask[sl, None], emb[sl], 0.0)).to(dtype)
                # the writer refuses NaN and writes float32: write the tensors as they are
                atomic_save_tensors(w.path / rel, {"emb": em, "mask": torch.from_numpy(
                    mask[sl].astype(np.uint8))})
                shards.append({**w.shard_record(rel), "start": start, "stop": start + rows})
                start += rows
            experts[m].append(EncoderEntry(m, f"e{k}", d, "expert", "test", {}, shards))
    temb = rng.normal(size=(n, 4)).astype(np.float32)
    rel = w.shard_path("mod1", "teacher", 0, role="teacher")
    rec = w.write_shard(rel, temb, np.ones(n, bool))
    teachers["mod1"] = [EncoderEntry("mod1", "teacher", 4, "teacher", "teacher", {},
                                     [{**rec, "start": 0, "stop": n}])]
    y = (rng.random(n) > 0.5).astype(np.float32)
    y[:3] = np.nan
    labels_file, sha = w.write_labels({"target": y})
    w.write_manifest(
        sample_ids=[f"s{i}" for i in range(n)],
        modalities=[ModalitySpec("mod0", "tabular"), ModalitySpec("mod1", "tabular")],
        tasks=[TaskSpec("target", "binary", [])],
        splits={"train": list(range(0, 60)), "val": list(range(60, 75)),
                "test": list(range(75, n))},
        experts=experts, teachers=teachers, labels_file=labels_file, labels_sha256=sha,
        dataset={"name": "test"})
    return EmbeddingStore.open(path)


# ------------------------------------------------------------------ batches
def test_streamed_batches_equal_in_memory_ones(synth_store):
    mem, st = _both(synth_store, teacher="teacher")
    assert st.dims() == mem.dims() and st.teacher_dims() == mem.teacher_dims()
    assert st.n == mem.n and st.experts == mem.experts
    for m in mem.modalities:
        assert torch.equal(st.mask[m], mem.mask[m])
        assert all(isinstance(x, StreamedRows) for x in st.emb[m])
        assert all(x.shape == tuple(y.shape) and len(x) == len(y)
                   for x, y in zip(st.emb[m], mem.emb[m]))
    g = torch.Generator().manual_seed(0)
    for size in (1, 7, 64, 400):
        idx = torch.randperm(mem.n, generator=g)[:size]
        _same_batch(mem.batch(idx), st.batch(idx))
    # repeated and negative rows index as a tensor would
    idx = torch.tensor([5, 5, -1, 0, 399, -400])
    _same_batch(mem.batch(idx), st.batch(idx))
    empty = torch.zeros(0, dtype=torch.long)
    _same_batch(mem.batch(empty), st.batch(empty))
    lean = st.batch(idx, teacher=False)
    assert lean.teacher is None and lean.teacher_mask is None
    assert torch.equal(lean.experts[mem.modalities[0]][0], mem.batch(idx).experts[
        mem.modalities[0]][0])
    with pytest.raises(IndexError, match="out of range"):
        st.emb[mem.modalities[0]][0][torch.tensor([400])]


def test_protocol_masks_apply_alike(synth_store):
    mem, st = _both(synth_store, teacher="teacher")
    proto = Protocol(name="test-random", rate=0.5)
    mask = apply_protocol(mem.mask, mem.modalities, proto, seed=1)
    assert all(torch.equal(mask[m], apply_protocol(st.mask, st.modalities, proto, 1)[m])
               for m in mask)
    idx = torch.arange(0, 400, 3)
    _same_batch(mem.batch(idx, mask), st.batch(idx, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_across_uneven_shards_and_stored_dtypes(tmp_path, dtype):
    store = _write_store(tmp_path / "s", dtype=dtype)
    assert read_header(store.path / store.experts["mod0"][0].shards[1]["file"])["emb"].shape \
        == (40, 6)
    mem, st = _both(store, teacher="teacher")
    # rows of all three shards in one batch, out of order, some twice
    idx = torch.tensor([89, 0, 24, 25, 64, 65, 3, 24, 88, 50])
    _same_batch(mem.batch(idx), st.batch(idx))
    _same_batch(mem.batch(torch.arange(90)), st.batch(torch.arange(90)))
    assert st.teacher_mask[:, 0].sum() == 0  # mod0 has no teacher, in both modes
    assert torch.equal(st.teacher_mask, mem.teacher_mask)


def test_a_layout_with_an_absent_modality_streams_zeros(tmp_path, synth_store):
    layout = {m.name: [e.name for e in synth_store.experts[m.name]]
              for m in synth_store.modalities}
    base = StoreTensors.from_store(synth_store)
    layout2 = {**layout, "scan": ["ct-expert"]}
    dims = {**base.dims(), "scan": [7]}
    mem, st = _both(synth_store, layout=layout2, dims=dims)
    assert isinstance(st.emb["scan"][0], ZeroRows) and st.emb["scan"][0].shape == (400, 7)
    assert not st.mask["scan"].any()
    idx = torch.arange(0, 400, 5)
    _same_batch(mem.batch(idx), st.batch(idx))
    with pytest.raises(StoreError, match="expert dims differ"):
        StoreTensors.from_store(synth_store, layout=layout,
                                dims={m: [d + 1 for d in v] for m, v in base.dims().items()},
                                stream=True)


def test_keep_modalities_filters_a_streamed_store(synth_store):
    from medmix_core.runner import _filter_modalities

    mem, st = _both(synth_store, teacher="teacher")
    keep = mem.modalities[1:]
    mem, st = _filter_modalities(mem, keep), _filter_modalities(st, keep)
    idx = torch.arange(50)
    _same_batch(mem.batch(idx), st.batch(idx))


# ------------------------------------------------------------------ training
def test_training_is_bit_identical_streamed_or_in_memory(synth_store):
    cfg = make_config(fuser="medmix", teacher="teacher", epochs=3, patience=3, batch_size=64,
                      d=16, distill_ramp_epochs=1, modality_dropout=0.2)
    out = []
    for stream in (False, True):
        t = StoreTensors.from_store(synth_store, teacher="teacher", stream=stream)
        out.append(train_seed(cfg, t, make_spec(t), synth_store.splits, seed=2))
    a, b = out
    assert a.history == b.history and a.best_epoch == b.best_epoch
    assert json.dumps(a.val_metrics, sort_keys=True, default=str) == \
        json.dumps(b.val_metrics, sort_keys=True, default=str)
    assert a.threshold == b.threshold
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ damage
def test_a_nan_present_row_fails_the_batch_that_reads_it(tmp_path):
    store = _write_store(tmp_path / "s", nan_row=30)
    with pytest.raises(StoreError, match="present rows hold NaN"):
        StoreTensors.from_store(store)  # in memory: at load
    st = StoreTensors.from_store(store, stream=True)  # streamed: at the batch
    st.batch(torch.tensor([0, 29, 31, 89]))
    with pytest.raises(StoreError, match=r"mod0/e0/00001\.safetensors: 1 present rows hold "
                                         r"NaN or Inf \(store rows \[30\]\)"):
        st.batch(torch.tensor([0, 30, 89]))


def test_a_nan_in_a_masked_row_is_allowed(tmp_path):
    store = _write_store(tmp_path / "s", nan_row=30, nan_masked=True)
    mem, st = _both(store)
    idx = torch.arange(90)
    _same_batch(mem.batch(idx), st.batch(idx))


def test_a_changed_shard_is_refused_by_its_hash(tmp_path):
    store = _write_store(tmp_path / "s")
    p = store.path / store.experts["mod1"][1].shards[2]["file"]
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256 differs"):
        StoreTensors.from_store(store, stream=True)


def test_a_truncated_header_names_the_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(StoreError, match="x.safetensors: not a readable safetensors"):
        read_header(p)


# ------------------------------------------------------------------ bounded reads
def _open_paths() -> tuple[str, str]:
    maps = open("/proc/self/maps").read()
    fds = " ".join(os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{f}"))
    return maps, fds


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_reads_leave_no_map_or_file_open(tmp_path):
    store = _write_store(tmp_path / "s")
    st = StoreTensors.from_store(store, stream=True, teacher="teacher")
    st.batch(torch.arange(90))
    maps, fds = _open_paths()
    for folder in ("shards", "teachers"):
        assert str(store.path / folder) not in maps and str(store.path / folder) not in fds
    rows = st.emb["mod0"][0]
    assert not any(isinstance(v, (memoryview, bytes, np.ndarray)) and getattr(v, "nbytes", 0)
                   > 100 for v in vars(rows).values())
    assert rows.reads == 90
    teacher_reads = st.teacher["mod1"].reads
    st.batch(torch.arange(10), teacher=False)
    assert st.teacher["mod1"].reads == teacher_reads and rows.reads == 100


# ------------------------------------------------------------------ the automatic rule
def test_should_stream_compares_with_half_the_available_memory(synth_store):
    mem = StoreTensors.from_store(synth_store, experts=["e0"], teacher="teacher")
    held = sum(x.nbytes for xs in mem.emb.values() for x in xs) + \
        sum(x.nbytes for x in mem.teacher.values())
    assert embedding_bytes(synth_store, ["e0"], "teacher") == held
    assert embedding_bytes(synth_store) == sum(
        x.nbytes for xs in StoreTensors.from_store(synth_store).emb.values() for x in xs)
    assert should_stream(synth_store, ["e0"], "teacher", available=2 * held - 2)
    assert not should_stream(synth_store, ["e0"], "teacher", available=2 * held)
    assert not should_stream(synth_store)  # a small store on this machine
