"""The ``rag-medcpt`` expert (MedMIX Appendix B) on tiny same-architecture MedCPT and Qwen2
models and a small knowledge base written here, against an independent reference; the
MedlinePlus parser; and the rule that the index holds knowledge-base documents only."""

from __future__ import annotations

import inspect
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medmix_core.bridges import Bridge
from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.types import ImageData, ModalitySpec, TabularData, TextData

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

from medmix_experts.foundation.base import ExpertOptionError  # noqa: E402
from medmix_experts.foundation.knowledge import (  # noqa: E402
    KnowledgeBaseNotFoundError,
    find_kb,
    html_to_text,
    load_kb,
    parse_medlineplus,
    read_folder,
)
from medmix_experts.foundation.rag_medcpt import (  # noqa: E402
    RAGMedCPTExpert,
    fit_projection,
    serialise_row,
    text_hash,
)
from tiny_models import CLINICAL_TEXTS, make_medcpt, make_qwen2  # noqa: E402

NOTE = ModalitySpec("note", "text")

# the layout NLM publishes (attributes and children as in mplus_topics_*.xml); summaries
# hold HTML as escaped text
TOPICS_XML = """<?xml version="1.0" encoding="UTF-8"?>
<health-topics total="3" date-generated="01/04/2025 01:30:04">
  <health-topic meta-desc="Pneumonia is an infection in one or both of the lungs."
      title="Pneumonia" url="https://medlineplus.gov/pneumonia.html" id="61"
      language="English" date-created="10/22/1998">
    <also-called>Lung infection</also-called>
    <also-called>Community acquired pneumonia</also-called>
    <full-summary>&lt;p&gt;Pneumonia is an
      &lt;a href="https://medlineplus.gov/x.html"&gt;infection&lt;/a&gt; in one or both
      of the lungs; chest x-ray shows infiltrates.&lt;/p&gt;&lt;ul&gt;&lt;li&gt;fever&lt;/li&gt;
      &lt;li&gt;cough &amp;amp; oxygen saturation 88%&lt;/li&gt;&lt;/ul&gt;</full-summary>
    <group url="https://medlineplus.gov/lungsandbreathing.html" id="25">Lungs and Breathing</group>
    <mesh-heading><descriptor id="D011014">Pneumonia</descriptor></mesh-heading>
    <site title="Pneumonia (Mayo)" url="https://example.org" language="English"/>
  </health-topic>
  <health-topic title="Neumonía" url="https://medlineplus.gov/spanish/pneumonia.html"
      id="62" language="Spanish" date-created="10/22/1998">
    <full-summary>&lt;p&gt;La neumonía es una infección.&lt;/p&gt;</full-summary>
  </health-topic>
  <health-topic title="Kidney Failure" url="https://medlineplus.gov/kidneyfailure.html"
      id="63" language="English" date-created="10/22/1998">
    <full-summary>&lt;p&gt;History of chronic kidney disease: creatinine 2.1 mg/dL,
      lactate rising.&lt;/p&gt;</full-summary>
  </health-topic>
  <health-topic title="Sepsis" url="https://medlineplus.gov/sepsis.html" id="64"
      language="English" date-created="10/22/1998">
    <full-summary>&lt;p&gt;Patient admitted with sepsis; started on ceftriaxone and
      azithromycin.&lt;/p&gt;</full-summary>
  </health-topic>
</health-topics>
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag_medcpt_models")
    q, _ = make_medcpt(root / "query", seed=1)
    a, _ = make_medcpt(root / "article", seed=2)
    llm, _ = make_qwen2(root / "qwen2", seed=3)
    return root, q, a, llm


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    path = tmp_path_factory.mktemp("kb") / "mplus_topics_2025-01-04.xml"
    path.write_text(TOPICS_XML, encoding="utf-8")
    return path


def make(models, kb, **kw) -> RAGMedCPTExpert:
    root = models[0]
    opts = {"query_path": str(root / "query"), "article_path": str(root / "article"),
            "qwen2_path": str(root / "qwen2"), "kb": str(kb), "k": 2, "batch_size": 3}
    opts.update(kw)
    return RAGMedCPTExpert(**opts)


# ----------------------------------------------------------------------------- knowledge base
def test_medlineplus_parser_reads_the_published_layout(kb, tmp_path):
    docs = parse_medlineplus(kb)
    assert [d.title for d in docs] == ["Pneumonia", "Kidney Failure", "Sepsis"]  # English
    p = docs[0]
    assert p.doc_id == "61" and p.url == "https://medlineplus.gov/pneumonia.html"
    assert p.text.startswith("Pneumonia (also called: Lung infection, Community acquired "
                             "pneumonia).\n")
    assert "infection in one or both of the lungs" in p.text and "<" not in p.text
    assert "- fever" in p.text and "cough & oxygen saturation 88%" in p.text
    assert "Lungs and Breathing" not in p.text  # groups and sites are not summary text
    assert [d.title for d in parse_medlineplus(kb, language="Spanish")] == ["Neumonía"]
    assert len(parse_medlineplus(kb, language=None)) == 4
    # the zip NLM also publishes
    z = tmp_path / "mplus_topics_compressed_2025-01-04.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("mplus_topics_2025-01-04.xml", TOPICS_XML)
    assert [d.text for d in parse_medlineplus(z)] == [d.text for d in docs]
    assert html_to_text("<p>a <em>b</em></p><ul><li>c</li></ul>") == "a b\n- c"


def test_medlineplus_parser_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        parse_medlineplus(tmp_path / "none.xml")
    bad = tmp_path / "groups.xml"
    bad.write_text("<groups><group id='1'>x</group></groups>")
    with pytest.raises(DataError, match="root element <groups>"):
        parse_medlineplus(bad)
    broken = tmp_path / "broken.xml"
    broken.write_text("<health-topics><health-topic title='a'>")
    with pytest.raises(DataError, match="not well-formed"):
        parse_medlineplus(broken)
    empty = tmp_path / "empty.xml"
    empty.write_text("<health-topics total='0'></health-topics>")
    with pytest.raises(DataError, match="no <health-topic>"):
        parse_medlineplus(empty)
    untitled = tmp_path / "untitled.xml"
    untitled.write_text("<health-topics><health-topic id='9' language='English'/>"
                        "</health-topics>")
    with pytest.raises(DataError, match="no title"):
        parse_medlineplus(untitled)


def test_folder_kb_and_where_it_is_found(kb, tmp_path, monkeypatch):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Tachycardia\nA heart rate above 100 beats per minute.")
    (folder / "sub" / "b.txt").write_text("Fever\n\nA temperature above 38 C.")
    (folder / "notes.csv").write_text("id,note,label\n1,sepsis,1\n")  # never read
    (folder / "topics.xml").write_text(TOPICS_XML)
    docs = read_folder(folder)
    assert [d.title for d in docs] == ["Tachycardia", "Fever", "Pneumonia", "Kidney Failure",
                                       "Sepsis"]
    assert docs[1].text == "Fever\n\nA temperature above 38 C." and docs[1].doc_id == "sub/b.txt"
    assert not any("label" in d.text for d in docs)
    with pytest.raises(DataError, match="not a folder"):
        read_folder(tmp_path / "none")
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="holds no document"):
        read_folder(tmp_path / "bare")
    # where it is looked for: option, then MEDMIX_KB, then $MEDMIX_MODEL_DIR/medlineplus
    monkeypatch.delenv("MEDMIX_KB", raising=False)
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "models"))
    with pytest.raises(KnowledgeBaseNotFoundError) as err:
        find_kb()
    msg = str(err.value)
    assert "medlineplus.gov/xml.html" in msg and "MEDMIX_MODEL_DIR" in msg and "kb=" in msg
    assert isinstance(err.value, WeightsNotFoundError)
    mp = tmp_path / "models" / "medlineplus"
    mp.mkdir(parents=True)
    for name in ("mplus_topics_2024-06-01.xml", "mplus_topics_2025-01-04.xml",
                 "mplus_topics_compressed_2025-01-04.zip", "readme.txt"):
        (mp / name).write_text(TOPICS_XML)
    assert find_kb() == mp / "mplus_topics_2025-01-04.xml"  # newest, plain XML preferred
    monkeypatch.setenv("MEDMIX_KB", str(folder))
    assert find_kb() == folder
    assert find_kb(kb) == kb
    with pytest.raises(KnowledgeBaseNotFoundError, match="does not exist"):
        find_kb(tmp_path / "nope.xml")
    assert [d.title for d in load_kb(folder / "a.md")] == ["Tachycardia"]


# ----------------------------------------------------------------------------- stage 1
def test_rows_are_serialised_over_all_variables_in_fixed_order():
    spec = ModalitySpec("labs", "tabular", ["HR", "Lactate", "Temp"],
                        units={"HR": "bpm", "Lactate": "mmol/L"})
    row = TabularData(["Temp", "HR", "Lactate"], np.array([37.25, 112.0, np.nan]))
    assert serialise_row(row, spec) == "HR: 112 bpm; Lactate: not measured; Temp: 37.2"
    partial = TabularData(["HR"], np.array([0.0]))  # 0 is a value; an absent column is not
    assert serialise_row(partial, spec) == "HR: 0 bpm; Lactate: not measured; Temp: not measured"
    with pytest.raises(DataError, match="not declared"):
        serialise_row(TabularData(["HR", "K"], np.array([1.0, 2.0])), spec)
    with pytest.raises(DataError, match="Inf"):
        serialise_row(TabularData(["HR"], np.array([np.inf])), spec)
    with pytest.raises(DataError, match="2 variables but 1 values"):
        serialise_row(TabularData(["HR", "Temp"], np.array([1.0])), spec)


def test_projection_is_ridge_least_squares():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6)) * np.array([1, 2, 3, 4, 5, 6.0]) + 3.0
    t = a @ rng.normal(size=(6, 4)) + 0.5 + 0.01 * rng.normal(size=(40, 4))
    w, b = fit_projection(a, t, ridge=1e-2)
    # reference: augmented least squares on centred data
    ac, tc = a - a.mean(0), t - t.mean(0)
    lam = 1e-2 * np.trace(ac.T @ ac) / 6
    aug = np.vstack([ac, np.sqrt(lam) * np.eye(6)])
    ref = np.linalg.lstsq(aug, np.vstack([tc, np.zeros((6, 4))]), rcond=None)[0]
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, t.mean(0) - a.mean(0) @ ref, rtol=1e-4, atol=1e-4)
    w0, _ = fit_projection(a, t, ridge=1e-9)  # almost no penalty: close to the exact map
    assert np.abs(a @ w0 + (t.mean(0) - a.mean(0) @ w0) - t).max() < 0.05


# ----------------------------------------------------------------------------- stage 2
def _reference(models, kb, texts, k=2, ridge=1e-2):
    """Appendix B computed directly from the raw transformers models, one text at a time."""
    from transformers import AutoTokenizer

    root, q_model, a_model, llm = models
    btok = AutoTokenizer.from_pretrained(str(root / "query"))
    qtok = AutoTokenizer.from_pretrained(str(root / "qwen2"))
    docs = [d.text for d in parse_medlineplus(kb)]

    def cls(model, text, max_len):
        ids = btok(text, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).last_hidden_state[0, 0].double().numpy()

    def table(text):
        ids = qtok(text, truncation=True, max_length=511, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return llm.get_input_embeddings()(ids)[0].double()

    A = np.stack([cls(a_model, d, 512) for d in docs])  # [M, 32]
    T = np.stack([table(d).mean(0).numpy() for d in docs])  # [M, 32]
    ac, tc = A - A.mean(0), T - T.mean(0)
    lam = ridge * np.trace(ac.T @ ac) / A.shape[1]
    W = np.linalg.lstsq(np.vstack([ac, np.sqrt(lam) * np.eye(A.shape[1])]),
                        np.vstack([tc, np.zeros((A.shape[1], T.shape[1]))]), rcond=None)[0]
    b = T.mean(0) - A.mean(0) @ W
    out, tops = [], []
    for text in texts:
        q = cls(q_model, text, 64)
        cos = (A @ q) / (np.linalg.norm(A, axis=1) * np.linalg.norm(q))
        top = np.argsort(-cos, kind="stable")[:k]
        soft = A[top].mean(0) @ W + b
        x = torch.cat([torch.from_numpy(soft)[None], table(text)], 0)[None].float()
        with torch.no_grad():
            h = llm(inputs_embeds=x).last_hidden_state[0]
        out.append(h.mean(0).numpy())
        tops.append(top)
    return np.stack(out), np.stack(tops)


def test_matches_an_independent_reference(models, kb):
    rag = make(models, kb)
    assert rag.dim(NOTE) == 32 and rag.family == "rag" and rag.accepts(NOTE)
    pays = [TextData(t) for t in CLINICAL_TEXTS]
    rag.fit(NOTE, pays)
    out = rag.encode(NOTE, pays)
    ref, ref_top = _reference(models, kb, CLINICAL_TEXTS)
    _, top, sims = rag.retrieve(NOTE, CLINICAL_TEXTS)
    np.testing.assert_array_equal(top, ref_top)
    assert np.all(np.diff(sims, axis=1) <= 0)
    assert out.shape == (4, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-3)
    # padded batches equal one-at-a-time, and the soft token matters
    one = np.concatenate([rag.encode(NOTE, [p]) for p in pays])
    np.testing.assert_allclose(out, one, atol=1e-5)
    other_k = make(models, kb, k=1)
    assert not np.allclose(other_k.encode(NOTE, pays), out, atol=1e-4)


def test_index_is_the_knowledge_base_only(models, kb):
    """No record of any split (and no label) can be retrieved: the index is the documents."""
    train = [TextData(t) for t in CLINICAL_TEXTS[:3]]
    held_out = [TextData(CLINICAL_TEXTS[3]), TextData("Large right pneumothorax.")]
    rag = make(models, kb)
    rag.fit(NOTE, train)
    state = rag.get_state(NOTE)
    docs = parse_medlineplus(kb)
    np.testing.assert_array_equal(state["kb_hash"], [text_hash(d.text) for d in docs])
    assert state["kb_emb"].shape == (len(docs), 32)
    patient = {text_hash(p.text) for p in train + held_out}
    assert not patient & set(state["kb_hash"].tolist())
    # fitting on other payloads (or none) gives the same index: payloads are never read
    other = make(models, kb)
    other.fit(NOTE, held_out)
    for key, value in other.get_state(NOTE).items():
        np.testing.assert_array_equal(value, state[key])
    rag.encode(NOTE, held_out)
    for key, value in rag.get_state(NOTE).items():  # encoding never writes to the index
        np.testing.assert_array_equal(value, state[key])
    assert list(inspect.signature(RAGMedCPTExpert.fit).parameters) == ["self", "modality",
                                                                       "payloads"]


def test_state_round_trip_and_errors(models, kb, tmp_path):
    rag = make(models, kb)
    rag.fit(NOTE, [])
    pays = [TextData(t) for t in CLINICAL_TEXTS[:2]]
    folder = tmp_path / "other_kb"
    folder.mkdir()
    (folder / "a.txt").write_text("Unrelated\nGardening tips for roses and tulips.")
    (folder / "b.txt").write_text("Weather\nRain expected tomorrow.")
    restored = make(models, folder)  # another KB on disk: the saved state wins
    restored.set_state(NOTE, rag.get_state(NOTE))
    np.testing.assert_array_equal(restored.encode(NOTE, pays), rag.encode(NOTE, pays))
    assert not np.allclose(make(models, folder).encode(NOTE, pays), rag.encode(NOTE, pays))
    with pytest.raises(DataError, match="lacks"):
        restored.set_state(NOTE, {"kb_emb": np.zeros((3, 32), np.float32)})
    bad = dict(rag.get_state(NOTE), proj_w=np.zeros((32, 7), np.float32))
    with pytest.raises(DataError, match="projection"):
        restored.set_state(NOTE, bad)
    restored.set_state(NOTE, {})
    assert restored.get_state(NOTE) == {}
    prov = rag.provenance()
    assert prov["kb_documents"] == 3 and prov["knowledge_base"] == str(kb)
    assert prov["llm"]["expert"] == "qwen2" and prov["article_encoder"]["expert"] == "medcpt"
    json.dumps(prov)


def test_tabular_timeseries_and_input_errors(models, kb):
    from _shared import TOY, toy_ts

    rag = make(models, kb)
    labs = ModalitySpec("labs", "tabular", ["creatinine", "lactate"], units={"lactate": "mmol/L"})
    rows = [TabularData(["creatinine", "lactate"], np.array([2.1, np.nan])),
            TabularData(["creatinine", "lactate"], np.array([np.nan, 3.4]))]
    assert rag.texts(labs, rows) == ["creatinine: 2.1; lactate: not measured",
                                     "creatinine: not measured; lactate: 3.4 mmol/L"]
    out = rag.encode(labs, rows)
    np.testing.assert_allclose(out, rag.encode(NOTE, [TextData(t) for t in
                                                      rag.texts(labs, rows)]), atol=1e-6)
    ts = [toy_ts(a=[(1.0, 80.0), (5.0, 95.0)]), toy_ts(b=[(2.0, 1.5)])]
    texts = rag.texts(TOY, ts)
    assert texts[0].startswith("a: 95") and "b" not in texts[0]
    assert rag.encode(TOY, ts).shape == (2, 32)
    assert rag.encode(NOTE, []).shape == (0, 32)
    with pytest.raises(DataError, match="empty text"):
        rag.encode(NOTE, [TextData("  ")])
    with pytest.raises(DataError, match="expected TextData"):
        rag.encode(NOTE, [None])
    cxr = ModalitySpec("cxr", "image")
    no_bridge = make(models, kb, bridges={})
    assert not no_bridge.accepts(cxr)
    with pytest.raises(DataError, match="through a bridge"):
        no_bridge.texts(cxr, [ImageData([np.zeros((4, 4, 3), np.uint8)])])


def test_options_and_absent_weights(models, kb, tmp_path, monkeypatch):
    with pytest.raises(ExpertOptionError, match="Unknown option"):
        make(models, kb, top_k=3)
    with pytest.raises(ExpertOptionError, match="k=0"):
        make(models, kb, k=0)
    with pytest.raises(ExpertOptionError, match="bridges"):
        make(models, kb, bridges={"note": "maira2"})
    with pytest.raises(ExpertOptionError, match="ridge"):
        make(models, kb, ridge=0)
    # nothing on this machine: the weights error names where it looked and what to do
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("MEDMIX_KB", raising=False)
    with pytest.raises(WeightsNotFoundError) as err:
        RAGMedCPTExpert()
    assert "ncbi/MedCPT-Query-Encoder" in str(err.value) and "MEDMIX_MODEL_DIR" in str(err.value)
    # weights present, knowledge base absent: a clear error too, before any model loads
    root = models[0]
    with pytest.raises(KnowledgeBaseNotFoundError, match="mplus_topics"):
        RAGMedCPTExpert(query_path=str(root / "query"), article_path=str(root / "article"),
                        qwen2_path=str(root / "qwen2"))


class _MeanBridge(Bridge):
    """A stand-in bridge: the image's mean intensity as words (deterministic)."""

    name = "mean-words"
    kinds = ("image",)

    def generate(self, modality, payloads):
        words = ["clear lungs", "bilateral infiltrates", "pleural effusion"]
        return [words[int(np.asarray(p.views[0]).mean()) % 3] for p in payloads]


def test_images_go_through_the_registered_bridge(models, kb):
    from conftest import registered

    from medmix_core import hookimpl

    class Plugin:
        @hookimpl
        def register_bridges(self, register):
            register("mean-words", _MeanBridge)

    cxr = ModalitySpec("cxr", "image")
    imgs = [ImageData([np.full((4, 4, 3), v, np.uint8)]) for v in (0, 1, 2)]
    with registered(Plugin()):
        rag = make(models, kb, bridges={"image": "mean-words"})
        assert rag.accepts(cxr)
        assert rag.texts(cxr, imgs) == ["clear lungs", "bilateral infiltrates",
                                        "pleural effusion"]
        out = rag.encode(cxr, imgs)
    np.testing.assert_allclose(out, rag.encode(NOTE, [TextData(t) for t in
                                                      ["clear lungs", "bilateral infiltrates",
                                                       "pleural effusion"]]), atol=1e-6)
    assert rag.provenance()["bridges"]["image"]["bridge"] == "mean-words"


@pytest.mark.slow
def test_extraction_indexes_the_knowledge_base_only(models, kb, tmp_path):
    """Through `medmix extract`: the saved index is the documents; no note of any split,
    and no label, is in it."""
    from conftest import registered

    from medmix_core import hookimpl
    from medmix_core.extract import extract

    class Plugin:
        @hookimpl
        def register_experts(self, register):
            register("rag-medcpt", RAGMedCPTExpert)

    notes = CLINICAL_TEXTS + ["Large right pneumothorax.", "Pulmonary edema."]
    splits = ["train", "train", "train", "val", "test", "val"]
    rows = ["id,note,sepsis,split"] + [f"r{i},\"{t}\",{int('sepsis' in t)},{s}"
                                       for i, (t, s) in enumerate(zip(notes, splits))]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    spec = {"manifest": "cohort.csv", "id": "id",
            "modalities": {"note": {"kind": "text", "column": "note"}},
            "tasks": [{"name": "sepsis", "type": "binary", "column": "sepsis"}],
            "splits": {"column": "split"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    root = models[0]
    opts = {"query_path": str(root / "query"), "article_path": str(root / "article"),
            "qwen2_path": str(root / "qwen2"), "kb": str(kb), "k": 2}
    try:
        already = RAGMedCPTExpert.name in __import__(
            "medmix_core.plugins", fromlist=["registry"]).registry().names("experts")
    except Exception:  # pragma: no cover
        already = False
    ctx = registered(Plugin()) if not already else __import__("contextlib").nullcontext()
    with ctx:
        store = extract("manifest", tmp_path / "store", ["rag-medcpt"],
                        source=str(tmp_path / "spec.json"),
                        expert_options={"rag-medcpt": opts}, progress=False)
    state = store.load_state(store.entry("note", "rag-medcpt"))
    np.testing.assert_array_equal(state["kb_hash"],
                                  [text_hash(d.text) for d in parse_medlineplus(kb)])
    assert not {text_hash(t) for t in notes} & set(state["kb_hash"].tolist())
    emb, mask = store.load(store.entry("note", "rag-medcpt"))
    assert mask.all() and emb.shape == (6, 32)
    ref, _ = _reference(models, kb, notes)
    np.testing.assert_allclose(emb.numpy(), ref, atol=2e-4, rtol=1e-3)
