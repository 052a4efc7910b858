"""The ``tfidf`` expert: fitted on training texts only, equal to an independent reference
computation, stable in width, and restorable from its saved state."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
from medmix_experts.tfidf import TfidfExpert, tokenize

from medmix_core import ModalitySpec, TabularData, TextData
from medmix_core.errors import DataError
from medmix_core.plugins import get_expert

NOTE = ModalitySpec("note", "text")
TRAIN = [
    "No acute cardiopulmonary abnormality. Heart size normal.",
    "Mild cardiomegaly. Small left pleural effusion.",
    "Right lower lobe opacity, likely pneumonia. Heart size normal.",
    "Cardiomegaly with pulmonary edema and bilateral pleural effusion.",
    "No pneumothorax. No pleural effusion. Normal heart size.",
    "Calcified granuloma in the right upper lobe. No acute disease.",
    "Left lower lobe atelectasis. Mild cardiomegaly.",
    "Hyperinflated lungs consistent with emphysema. No acute disease.",
]
TEST = ["Large right pleural effusion. Cardiomegaly.", "Entirely unseen vocabulary here."]


def _docs(texts):
    return [TextData(t) for t in texts]


def _reference(train, texts, ngram=2, min_df=2, dim=4):
    """TF-IDF + exact SVD written out plainly, independent of the expert's code paths."""
    def grams(t):
        w = re.findall(r"\b\w\w+\b", t.lower())
        return w + [" ".join(w[i:i + 2]) for i in range(len(w) - 1)] if ngram == 2 else w

    df = Counter(g for t in train for g in set(grams(t)))
    vocab = sorted(g for g, c in df.items() if c >= min_df)
    n = len(train)
    idf = [math.log((1 + n) / (1 + df[g])) + 1 for g in vocab]

    def rows(ts):
        out = np.zeros((len(ts), len(vocab)))
        for i, t in enumerate(ts):
            c = Counter(grams(t))
            for j, g in enumerate(vocab):
                if c[g]:
                    out[i, j] = (1 + math.log(c[g])) * idf[j]
            norm = np.linalg.norm(out[i])
            if norm:
                out[i] /= norm
        return out

    x = rows(train)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[:dim].T  # [V, dim]
    v = v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])])
    return vocab, rows(train) @ v, rows(texts) @ v


def test_matches_an_independent_reference_computation():
    enc = TfidfExpert(dim=4)
    enc.fit(NOTE, _docs(TRAIN))
    vocab, ref_train, ref_test = _reference(TRAIN, TEST, dim=4)
    assert enc.get_state(NOTE)["vocabulary"].tobytes().decode().split("\n") == vocab
    np.testing.assert_allclose(enc.encode(NOTE, _docs(TRAIN)), ref_train, atol=1e-5)
    np.testing.assert_allclose(enc.encode(NOTE, _docs(TEST)), ref_test, atol=1e-5)


def test_tfidf_weights_agree_with_scikit_learn_when_installed():
    sk = pytest.importorskip("sklearn.feature_extraction.text",
                             reason="scikit-learn not installed: reference check skipped")
    enc = TfidfExpert(dim=3)
    enc.fit(NOTE, _docs(TRAIN))
    st = enc._state["note"]
    ours = enc._matrix(TEST + TRAIN, st["vocab"], st["idf"])
    dense = np.zeros(ours.shape)
    dense[ours.rows, ours.indices] = ours.data
    vec = sk.TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(TRAIN)
    assert list(vec.get_feature_names_out()) == st["terms"]
    np.testing.assert_allclose(dense, vec.transform(TEST + TRAIN).toarray(), atol=1e-12)


def test_vocabulary_comes_from_the_training_texts_only():
    enc = TfidfExpert(dim=4, min_df=1)
    enc.fit(NOTE, _docs(TRAIN))
    terms = set(enc.get_state(NOTE)["vocabulary"].tobytes().decode().split("\n"))
    assert "cardiomegaly" in terms and "unseen" not in terms and "entirely" not in terms
    out = enc.encode(NOTE, _docs(TEST))
    assert np.abs(out[1]).sum() == 0.0  # no training term: its TF-IDF is empty
    assert np.abs(out[0]).sum() > 0


def test_width_is_stable_when_the_vocabulary_is_smaller_than_dim():
    enc = TfidfExpert(dim=64)
    enc.fit(NOTE, _docs(TRAIN))
    out = enc.encode(NOTE, _docs(TRAIN + TEST))
    assert out.shape == (len(TRAIN) + len(TEST), 64) == (10, enc.dim(NOTE))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert np.abs(out[:, len(TRAIN):]).sum() == 0.0  # rank <= 8 training texts
    assert np.array_equal(out, enc.encode(NOTE, _docs(TRAIN + TEST)))


def test_state_round_trip_encodes_an_external_cohort_identically():
    enc = TfidfExpert(dim=5, ngram=1)
    enc.fit(NOTE, _docs(TRAIN))
    state = enc.get_state(NOTE)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    other = get_expert("tfidf")(dim=5, ngram=1)
    other.set_state(NOTE, state)
    assert np.array_equal(other.encode(NOTE, _docs(TEST)), enc.encode(NOTE, _docs(TEST)))
    with pytest.raises(DataError, match="fitted with"):
        TfidfExpert(dim=5, ngram=2).set_state(NOTE, state)
    with pytest.raises(DataError, match="lacks"):
        TfidfExpert(dim=5, ngram=1).set_state(NOTE, {"idf": state["idf"]})


def test_bad_use_gets_clear_errors():
    with pytest.raises(DataError, match="unknown option"):
        TfidfExpert(dims=3)
    with pytest.raises(DataError, match="must be int"):
        TfidfExpert(dim="3")
    with pytest.raises(DataError, match=">= 1"):
        TfidfExpert(dim=0)
    enc = TfidfExpert(dim=3)
    with pytest.raises(DataError, match="not fitted"):
        enc.encode(NOTE, _docs(TEST))
    with pytest.raises(DataError, match="text modalities"):
        enc.fit(ModalitySpec("labs", "tabular", ["a"]), [TabularData(["a"], np.ones(1))])
    with pytest.raises(DataError, match="expected TextData"):
        enc.fit(NOTE, [TextData("a b"), None])
    with pytest.raises(DataError, match="min_df"):
        TfidfExpert(min_df=5).fit(NOTE, _docs(["one text", "another one"]))


def test_tokenize_makes_word_ngrams_in_order():
    assert tokenize("A small-ish Effusion, 2 cm", 2) == [
        "small", "ish", "effusion", "cm", "small ish", "ish effusion", "effusion cm"]
