"""The CLI end to end on a small synthetic store."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from medmix_core.cli import app

runner = CliRunner()


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("run", "extract", "plugins", "predict"):
        assert cmd in res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_store_path):
    out = tmp_path_factory.mktemp("run") / "r"
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--dataset", "synthetic",
                              "--seeds", "2", "--epochs", "5", "--d", "16", "--out", str(out),
                              "--teacher", "teacher", "--external-test", str(synth_store_path)])
    assert res.exit_code == 0, res.output
    return out


def test_run_writes_every_promised_file(trained):
    for f in ("config.json", "metrics.json", "predictions.csv", "encoders.json",
              "seed_0/model.safetensors", "seed_0/model.json", "seed_1/model.safetensors"):
        assert (trained / f).is_file(), f
    m = json.loads((trained / "metrics.json").read_text())
    assert m["fuser"] == "medmix" and m["seeds"] == [0, 1] and m["distill"] is True
    for k in ("auroc", "auprc", "macro_f1", "accuracy"):
        assert set(m["test"][k]) == {"mean", "std"}
        assert 0.0 <= m["test"][k]["mean"] <= 1.0
        assert set(m["external"][k]) == {"mean", "std"}
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["teacher"] == "teacher" and cfg["epochs"] == 5


def test_saved_model_holds_no_teacher_parameter(trained):
    from safetensors import safe_open

    with safe_open(str(trained / "seed_0" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("teacher" in k for k in keys)


def test_predict_reproduces_the_test_predictions(trained, synth_store_path, tmp_path):
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(trained), "--source", str(synth_store_path),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    pred = {r["sample_id"]: r for r in _rows(out)}
    test = _rows(trained / "predictions.csv")
    assert test
    for r in test:
        assert float(pred[r["sample_id"]]["prob"]) == pytest.approx(float(r["prob"]), abs=1e-5)
        assert float(pred[r["sample_id"]]["prob_seed1"]) == pytest.approx(float(r["prob_seed1"]),
                                                                          abs=1e-5)
    assert "router_mod0_e0" in pred[test[0]["sample_id"]]


def test_unknown_fuser_fails_fast_with_close_match(synth_store_path):
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--fuser", "medmx"])
    assert res.exit_code == 2
    assert "Did you mean 'medmix'" in res.output


def test_bad_flag_value_is_a_clear_error(synth_store_path):
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--device", "tpu"])
    assert res.exit_code == 2 and "device = 'tpu'" in res.output


def test_show_config_prints_values_and_where_they_came_from(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("fuser: meanavg\nepochs: 7\n")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "medmix.yaml").write_text("fuser: max\npatience: 4\nstore: st\n")
    monkeypatch.chdir(tmp_path / "proj")
    res = runner.invoke(app, ["run", "--config", str(tmp_path / "c.yaml"), "--epochs", "9",
                              "--show-config"])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()}
    assert '"meanavg"' in lines["fuser"] and "c.yaml" in lines["fuser"]
    assert "9" in lines["epochs"] and "(command line)" in lines["epochs"]
    assert "4" in lines["patience"] and "medmix.yaml" in lines["patience"]
    assert str(tmp_path / "proj" / "st") in lines["store"]
    assert "(default)" in lines["lr"]


def test_project_defaults_from_pyproject_tool_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.medmix]\nfuser = "concat"\n')
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", "--show-config"])
    assert res.exit_code == 0, res.output
    assert '"concat"' in [ln for ln in res.output.splitlines() if ln.startswith("fuser ")][0]


def test_dataset_run_defaults_sit_below_files_and_flags(tmp_path, monkeypatch,
                                                       synth_store_path):
    monkeypatch.chdir(tmp_path)

    def shown(*args):
        res = runner.invoke(app, ["run", *args, "--show-config"])
        assert res.exit_code == 0, res.output
        return {ln.split()[0]: ln for ln in res.output.splitlines()}

    lines = shown()
    assert "0.3" in lines["expert_dropout"] and "(dataset physionet2012)" in lines[
        "expert_dropout"]
    assert "(default)" in lines["lr"]  # only what the dataset declares
    lines = shown("--expert-dropout", "0.1")
    assert "0.1" in lines["expert_dropout"] and "(command line)" in lines["expert_dropout"]
    (tmp_path / "medmix.yaml").write_text("modality_dropout: 0.05\n")
    assert "medmix.yaml" in shown()["modality_dropout"]
    (tmp_path / "medmix.yaml").unlink()
    # another dataset, or a store made from one, gets none of physionet2012's
    assert "(default)" in shown("--dataset", "synthetic")["expert_dropout"]
    assert "(default)" in shown("--store", str(synth_store_path))["expert_dropout"]


def test_predict_on_a_folder_that_is_not_a_run(tmp_path, synth_store_path):
    res = runner.invoke(app, ["predict", str(tmp_path), "--source", str(synth_store_path)])
    assert res.exit_code == 2 and "is not a medmix run folder" in res.output


def test_profile_command_writes_profile_and_efficiency_table(trained, synth_store_path, tmp_path):
    out = tmp_path / "prof"
    res = runner.invoke(app, ["profile", "--store", str(synth_store_path), "--fuser", "medmix",
                              "--repeats", "2", "--warmup", "1", "--d", "16", "--out", str(out),
                              "--runs", str(trained)])
    assert res.exit_code == 0, res.output
    prof = json.loads((out / "profile.json").read_text())
    first = prof[0] if isinstance(prof, list) else prof
    assert first["fuser"] == "medmix"
    assert (out / "efficiency.md").is_file() and "EffScore" in (out / "efficiency.md").read_text()


def test_teacher_reading_fuser_refuses_a_training_only_teacher(tmp_path):
    """adacomed reads teacher embeddings at inference: a teacher extracted for the
    training rows only must be refused with the command that fixes it."""
    from medmix_core.extract import extract

    store = tmp_path / "st"
    extract("synthetic", store, ["stats"], ["stats"], progress=False,
            dataset_options={"n": 120})
    res = runner.invoke(app, ["run", "--dataset", "synthetic", "--store", str(store),
                              "--experts", "stats", "--teacher", "stats", "--fuser", "adacomed",
                              "--epochs", "1"])
    assert res.exit_code == 2
    assert "covers no test row" in res.output and "--teacher-rows all" in res.output
