"""predict and --external-test on raw PhysioNet stays, encoded with the run's fitted state."""

from __future__ import annotations

import csv
import json

import pytest
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset
from typer.testing import CliRunner

from medmix_core.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def icu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("icu")
    ids = sorted(int(s.id) for s in PhysioNet2012().samples())
    train_src = write_subset(tmp / "train", ids[:240])
    ext_src = write_subset(tmp / "ext", ids[240:300])
    out = tmp / "run"
    res = runner.invoke(app, ["run", "--source", str(train_src), "--experts", "stats",
                              "--store", str(tmp / "store"), "--seeds", "2", "--epochs", "3",
                              "--d", "16", "--out", str(out), "--external-test", str(ext_src)])
    assert res.exit_code == 0, res.output
    return tmp, out


def test_external_cohort_is_scored_with_training_statistics(icu_run):
    tmp, out = icu_run
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["external"]) == {"auroc", "auprc", "macro_f1", "accuracy"}
    rows = list(csv.DictReader(open(out / "external_predictions.csv")))
    assert len(rows) == 60
    ext_store = json.loads(next(tmp.glob("*-external-*/manifest.json")).read_text())
    assert ext_store["report"]["fit_from"]  # encoded with the training store's fitted state


def test_predict_on_raw_stays_reproduces_the_test_predictions(icu_run):
    tmp, out = icu_run
    test = list(csv.DictReader(open(out / "predictions.csv")))[:5]
    few = write_subset(tmp / "few", [int(r["sample_id"]) for r in test],
                       source=str(tmp / "train"))
    res = runner.invoke(app, ["predict", str(out), "--source", str(few), "--out",
                              str(tmp / "p.csv")])
    assert res.exit_code == 0, res.output
    got = {r["sample_id"]: r for r in csv.DictReader(open(tmp / "p.csv"))}
    for r in test:
        assert float(got[r["sample_id"]]["prob"]) == pytest.approx(float(r["prob"]), abs=1e-6)
        assert float(got[r["sample_id"]]["prob_seed0"]) == pytest.approx(
            float(r["prob_seed0"]), abs=1e-6)
