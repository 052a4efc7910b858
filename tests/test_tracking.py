"""Experiment tracking: MLflow and TensorBoard logs, read back with each library's reader."""

from __future__ import annotations

import json

import pytest

from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.tracking import (
    epoch_scalars,
    final_scalars,
    flatten,
    make_tracker,
    run_files,
)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, synth_store_path):
    """A real short run (metrics.json, seeds, a report) and a real train_seed's records."""
    from medmix_core.batch import StoreTensors
    from medmix_core.report import render_report
    from medmix_core.runner import run
    from medmix_core.store import EmbeddingStore
    from medmix_core.training import make_spec, train_seed

    out = tmp_path_factory.mktemp("trk") / "run"
    cfg = RunConfig(store=str(synth_store_path), epochs=4, patience=10, d=16, seeds=[0, 1],
                    bootstrap=20, out=str(out), progress=False)
    run(cfg, log=lambda *_: None)
    render_report(out, n_boot=10)
    store = EmbeddingStore.open(synth_store_path)
    tensors = StoreTensors.from_store(store)
    records: list[dict] = []
    res = train_seed(cfg, tensors, make_spec(tensors), store.splits, 0,
                     on_epoch=records.append)
    assert records == res.history and len(records) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return out, config, metrics, records


def _drive(tracker, out, config, metrics, records, files):
    tracker.open(out, config)
    for rec in records:
        tracker.log_epoch(0, rec)
    tracker.log_final(metrics, files)
    tracker.close()


def test_final_scalars_come_from_metrics_json_and_skip_nulls():
    m = {"seeds": [3], "test": {"auroc": {"mean": 0.8, "std": 0.01},
                                "auprc": {"mean": None, "std": None}},
         "per_seed": [{"auroc": 0.8, "auprc": None}], "test_ci95": {"auroc": [0.7, 0.9]},
         "seed_info": [{"seed": 3, "best_epoch": 5, "val": {"auroc": 0.75}}]}
    got = final_scalars(m)
    assert got == {"test/auroc_mean": 0.8, "test/auroc_std": 0.01, "test/auroc_ci95_lo": 0.7,
                   "test/auroc_ci95_hi": 0.9, "seed_3/test_auroc": 0.8,
                   "seed_3/best_epoch": 5.0, "seed_3/val_auroc": 0.75}
    assert epoch_scalars(2, {"epoch": 4, "val_loss": 0.5, "note": "x"}) == (
        4, {"seed_2/val_loss": 0.5})
    with pytest.raises(MedmixError, match="without 'epoch'"):
        epoch_scalars(0, {"val_loss": 1.0})
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_unknown_tracker_and_misplaced_uri_are_clear_errors():
    with pytest.raises(MedmixError, match="expected one of mlflow, tensorboard"):
        make_tracker("wandb")
    pytest.importorskip("tensorboard")
    with pytest.raises(MedmixError, match="--tracking-uri is for --tracker mlflow"):
        make_tracker("tensorboard", tracking_uri="http://x")


@pytest.mark.slow
def test_tensorboard_events_read_back_match_metrics_json(real_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, config, metrics, records = real_run
    _drive(make_tracker("tensorboard"), out, config, metrics, records, run_files(out))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                    "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in ("train_loss", "val_loss"):
        events = acc.Scalars(f"seed_0/{key}")
        assert [e.step for e in events] == [r["epoch"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
    want = final_scalars(metrics)
    assert want["test/auroc_mean"] == metrics["test"]["auroc"]["mean"]
    for k, v in want.items():
        assert acc.Scalars(k)[-1].value == pytest.approx(v, rel=1e-6), k
    assert "plots/reliability" in tags["images"] and "plots/decision_curve" in tags["images"]
    text = {t for t in tags["tensors"]}
    assert {"config/text_summary", "tables/report/text_summary"} <= text


@pytest.mark.slow
def test_mlflow_file_store_read_back_matches_metrics_json(real_run, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, config, metrics, records = real_run
    uri = (tmp_path / "mlruns").as_uri()
    tracker = make_tracker("mlflow", tracking_uri=uri, experiment="tests")
    _drive(tracker, out, config, metrics, records, run_files(out))
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    hist = client.get_metric_history(run.info.run_id, "seed_0/val_loss")
    assert [h.step for h in sorted(hist, key=lambda h: h.step)] == [0, 1, 2, 3]
    assert [h.value for h in sorted(hist, key=lambda h: h.step)] == pytest.approx(
        [r["val_loss"] for r in records])
    for k, v in final_scalars(metrics).items():
        assert run.data.metrics[k] == pytest.approx(v), k
    assert run.data.metrics["test/auroc_mean"] == pytest.approx(
        metrics["test"]["auroc"]["mean"])
    params = run.data.params
    assert params["fuser"] == config["fuser"] and params["d"] == "16"
    assert json.loads(params["seeds"]) == config["seeds"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.md", "model_card.md", "reliability.png",
            "seed_0", "seed_1"} <= arts
    model = {a.path for a in client.list_artifacts(run.info.run_id, "seed_0")}
    assert {"seed_0/model.safetensors", "seed_0/model.json"} <= model


@pytest.mark.slow
def test_mlflow_default_store_is_inside_the_run_folder_and_failure_is_recorded(real_run,
                                                                               tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out, config, _, records = real_run
    with pytest.raises(RuntimeError), make_tracker("mlflow") as tracker:
        tracker.open(out, config)
        tracker.log_epoch(0, records[0])
        raise RuntimeError("training failed")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    exp = client.get_experiment_by_name("medmix")
    runs = client.search_runs([exp.experiment_id])
    assert runs[0].info.status == "FAILED"


def test_the_cli_flag_logs_the_run_to_tensorboard(tmp_path, synth_store_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from medmix_core.cli import app

    out = tmp_path / "R"
    res = CliRunner().invoke(app, ["run", "--store", str(synth_store_path), "--epochs", "3",
                                   "--d", "8", "--bootstrap", "0", "--out", str(out),
                                   "--tracker", "tensorboard"])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    m = json.loads((out / "metrics.json").read_text())
    tags = acc.Tags()["scalars"]
    assert any(t.endswith("val_loss") for t in tags), tags
    auroc = [t for t in tags if t == "test/auroc_mean"]
    assert auroc and acc.Scalars(auroc[0])[-1].value == pytest.approx(
        m["test"]["auroc"]["mean"], abs=1e-6)
    res = CliRunner().invoke(app, ["run", "--store", str(synth_store_path), "--out",
                                   str(tmp_path / "S"), "--tracker", "wandb"])
    assert res.exit_code == 2 and "mlflow or tensorboard" in res.output
