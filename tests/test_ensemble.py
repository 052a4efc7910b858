"""The deployed model is the seeds' ensemble: ``predict`` averages the seeds' probabilities,
and metrics.json reports the ensemble beside the mean ± std over seeds."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from medmix_core.cli import app
from medmix_core.metrics import compute_metrics

runner = CliRunner()


def test_the_ensemble_is_the_mean_of_the_seeds(tmp_path, synth_store_path):
    out = tmp_path / "R"
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--seeds", "3",
                              "--epochs", "3", "--d", "8", "--bootstrap", "0",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "ensemble" in res.output
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    per_seed = torch.tensor([[float(r[f"prob_seed{s}"]) for s in (0, 1, 2)] for r in rows])
    mean = torch.tensor([float(r["prob"]) for r in rows])
    assert torch.allclose(per_seed.mean(1), mean, atol=2e-6)  # 6 decimals in the CSV
    labels = torch.tensor([float(r["label"]) for r in rows])
    want = compute_metrics(mean[:, None], labels, "binary", 0.5)
    assert m["test_ensemble"]["auroc"] == pytest.approx(want["auroc"], abs=1e-4)
    assert m["test_ensemble"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-4)
    # predict deploys the same ensemble
    p = runner.invoke(app, ["predict", str(out), "--source", str(synth_store_path),
                            "--out", str(tmp_path / "p.csv")])
    assert p.exit_code == 0, p.output
    got = {r["sample_id"]: float(r["prob"]) for r in csv.DictReader(open(tmp_path / "p.csv"))}
    for r in rows:
        assert got[r["sample_id"]] == pytest.approx(float(r["prob"]), abs=1e-6)
