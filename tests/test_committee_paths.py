"""The paths a user takes after ``make demo``, with the CPU default committee (stats, grid,
seqssl, minilm, rag) on real PhysioNet stays: a second cohort (``--external-test``),
``predict`` on new patients without outcomes, and a rerun.

The training store is completed in three extractions, as ``medmix run`` completes a cached
store, so its experts are listed in another order than a fresh extraction of the external
cohort lists them; the run must match experts by name.
"""

from __future__ import annotations

import csv
import json

import pytest
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset
from typer.testing import CliRunner

from medmix_core.cli import app
from medmix_core.extract import extract
from medmix_core.store import EmbeddingStore

runner = CliRunner()
COMMITTEE = ["stats", "grid", "seqssl", "minilm", "rag"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def committee_run(tmp_path_factory):
    pytest.importorskip("transformers", reason="minilm and rag need transformers")
    tmp = tmp_path_factory.mktemp("committee")
    ids = sorted(int(s.id) for s in PhysioNet2012().samples())
    train_src = write_subset(tmp / "train", ids[:300])
    ext_src = write_subset(tmp / "ext", ids[300:360])
    store = tmp / "store"
    for names in (["stats", "seqssl"], ["minilm", "rag"], ["grid"]):  # completed in turn
        opts = {"seqssl": {"epochs": 2}} if "seqssl" in names else None
        extract("physionet2012", store, names, source=str(train_src), progress=False,
                expert_options=opts)
    listed = [e.name for e in EmbeddingStore.open(store).experts["vitals"]]
    assert listed == ["stats", "seqssl", "minilm", "rag", "grid"]  # not COMMITTEE's order
    out = tmp / "run"
    res = runner.invoke(app, [
        "run", "--source", str(train_src), "--store", str(store),
        "--experts", ",".join(COMMITTEE), "--seeds", "2", "--epochs", "3", "--d", "16",
        "--bootstrap", "0", "--out", str(out), "--external-test", str(ext_src)])
    assert res.exit_code == 0, res.output
    return tmp, out, ext_src


def test_external_cohort_with_the_committee(committee_run):
    tmp, out, _ = committee_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["experts_by_modality"]["vitals"] == ["stats", "seqssl", "minilm", "rag", "grid"]
    assert set(m["experts"]) == set(COMMITTEE)
    assert 0.0 <= m["external"]["auroc"]["mean"] <= 1.0
    ext = next(tmp.glob("store-external-*"))
    fresh = [e.name for e in EmbeddingStore.open(ext).experts["vitals"]]
    assert sorted(fresh) == sorted(COMMITTEE)
    assert len(list(csv.DictReader(open(out / "external_predictions.csv")))) == 60


def test_predict_new_patients_without_outcomes_with_the_committee(committee_run, tmp_path):
    tmp, out, ext_src = committee_run
    new = write_subset(tmp_path / "new", sorted(int(p.stem) for p in
                                              (ext_src / "set-a").glob("*.txt"))[:20],
                       source=str(ext_src))
    (new / "Outcomes-a.txt").unlink()  # new patients have no outcomes yet
    res = runner.invoke(app, ["predict", str(out), "--source", str(new), "--out",
                              str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    got = {r["sample_id"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    want = {r["sample_id"]: r for r in csv.DictReader(open(out / "external_predictions.csv"))}
    assert len(got) == 20
    for sid, r in got.items():  # the same stays score the same, whatever the store order
        assert float(r["prob"]) == pytest.approx(float(want[sid]["prob"]), abs=1e-5)
        assert float(r["prob_seed1"]) == pytest.approx(float(want[sid]["prob_seed1"]), abs=1e-5)


def test_a_rerun_into_the_same_folder_is_refused_without_overwrite(committee_run):
    tmp, out, _ = committee_run
    before = (out / "metrics.json").read_bytes()
    res = runner.invoke(app, ["run", "--store", str(tmp / "store"), "--experts", "stats",
                              "--fuser", "concat", "--out", str(out), "--epochs", "1"])
    assert res.exit_code == 2 and "already holds a complete run" in res.output
    assert (out / "metrics.json").read_bytes() == before
