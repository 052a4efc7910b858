"""medmix sweep: test-time protocols reuse checkpoints, train-time ones retrain."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from medmix_core.cli import app

runner = CliRunner()


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*.safetensors"))}


def test_test_time_sweep_writes_tables_plots_and_leaves_the_store_untouched(tmp_path,
                                                                             synth_store_path):
    before = _digest(synth_store_path)
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", "--store", str(synth_store_path), "--protocol",
                              "test-one", "--modality", "mod0", "--rates", "0.5,1.0",
                              "--fuser", "medmix", "--seeds", "2", "--epochs", "3", "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["protocol"] for r in rows] == ["natural", "test-one(mod0, p=0.5)",
                                             "test-one(mod0, p=1)"]
    assert all(r["n_seeds"] == 2 for r in rows)
    # trained once: one run folder with two seeds, reused for every rate
    assert sorted(p.name for p in (out / "medmix").iterdir()) == ["natural"]
    for f in ("sweep.md", "sweep.csv", "sweep_auroc.png"):
        assert (out / f).is_file()
    assert _digest(synth_store_path) == before


def test_train_time_protocol_retrains_per_rate(tmp_path, synth_store_path):
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", "--store", str(synth_store_path), "--protocol",
                              "train-random", "--rates", "0.5", "--fuser", "medmix",
                              "--epochs", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "medmix").iterdir()) == ["natural",
                                                                  "train-random_r_0.5"]
    cfg = json.loads((out / "medmix" / "train-random_r_0.5" / "config.json").read_text())
    assert cfg["protocol"]["name"] == "train-random" and cfg["protocol"]["rate"] == 0.5


def test_unknown_protocol_is_a_clear_error(tmp_path, synth_store_path):
    res = runner.invoke(app, ["sweep", "--store", str(synth_store_path), "--protocol",
                              "test-randon", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Did you mean 'test-random'" in res.output
