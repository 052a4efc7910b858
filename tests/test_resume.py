"""Kill a real ``medmix run`` / ``medmix sweep`` at several points, resume it, and get
exactly what an uninterrupted run writes.

Every kill is SIGKILL of a real process (nothing runs on the way out), at a point read from
the folder itself: a seed's epoch checkpoint appearing, a seed's result appearing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmix_core.cli import app

# long enough to be caught mid-training, small enough to be quick
TRAIN = ["--epochs", "12", "--patience", "12", "--d", "16", "--bootstrap", "20",
         "--device", "cpu", "--threads", "1"]
MEDMIX = [sys.executable, "-m", "medmix_core.cli"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from medmix_datasets.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("resume") / "store", n=1500,
                                 teacher_dim=24, seed=3).path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([*MEDMIX, *map(str, args)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL ``proc``'s process group as soon as ``ready()``; False if it ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the kill point was never reached")


def _finish(*args) -> None:
    res = subprocess.run([*MEDMIX, *map(str, args)], env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _without_times(o):
    """metrics.json less the wall-clock seconds, which differ between any two runs."""
    if isinstance(o, dict):
        return {k: _without_times(v) for k, v in o.items() if k not in ("seconds", "out")}
    if isinstance(o, list):
        return [_without_times(v) for v in o]
    return o


def _results(folder: Path) -> tuple[dict, str, dict]:
    metrics = json.loads((folder / "metrics.json").read_text())
    weights = {p.parent.name: p.read_bytes()
               for p in sorted(folder.glob("seed_*/model.safetensors"))}
    return _without_times(metrics), (folder / "predictions.csv").read_text(), weights


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _finish("run", "--store", store, "--seeds", "3", "--out", out, "--sequential", *TRAIN)
    return _results(out)


def _checkpoint_after_epoch(path: Path, epoch: int):
    def ready() -> bool:
        if not path.is_file():
            return False
        try:
            import torch

            return torch.load(path, weights_only=False)["epoch"] >= epoch
        except Exception:  # noqa: BLE001 - mid-rename; the next poll reads it
            return False
    return ready


@pytest.mark.parametrize("point", ["seed0-epoch3", "seed0-done", "seed1-epoch8",
                                   "last-seed-done"])
def test_a_run_killed_and_resumed_writes_what_an_uninterrupted_run_writes(
        store, reference, tmp_path, point):
    out = tmp_path / "run"
    args = ["run", "--store", store, "--seeds", "3", "--out", out, "--sequential", *TRAIN]
    ready = {
        "seed0-epoch3": _checkpoint_after_epoch(out / "checkpoints" / "seed_0.pt", 3),
        "seed0-done": lambda: (out / "seed_0" / "result.json").is_file(),
        "seed1-epoch8": _checkpoint_after_epoch(out / "checkpoints" / "seed_1.pt", 8),
        "last-seed-done": lambda: (out / "seed_2" / "result.json").is_file(),
    }[point]
    killed = _kill_when(_start(*args), ready)
    assert killed, "the run ended before the kill point"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "running"  # a killed run never looks finished
    # without --resume the folder is refused and named as resumable
    res = CliRunner().invoke(app, [*map(str, args)])
    assert res.exit_code == 2 and "--resume" in res.output
    _finish(*args, "--resume")
    assert _results(out) == reference
    assert not (out / "checkpoints").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["resumes"] == 1


def test_resume_of_a_complete_run_trains_nothing_and_another_config_is_refused(store, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--store", store, "--seeds", "2", "--out", out, "--sequential", *TRAIN]
    _finish(*args, "--resume")  # nothing to resume: it simply starts
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = CliRunner().invoke(app, [*map(str, args), "--resume"])
    assert res.exit_code == 0, res.output
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "run.json"} == \
        {p: t for p, t in before.items() if p.name != "run.json"}
    res = CliRunner().invoke(app, [*map(str, args), "--resume", "--lr", "0.01"])
    assert res.exit_code == 2
    assert "another configuration" in res.output and "lr" in res.output


def test_report_and_predict_on_a_killed_run_say_how_to_resume(store, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--store", store, "--seeds", "2", "--out", out, "--sequential", *TRAIN]
    assert _kill_when(_start(*args), lambda: (out / "seed_0" / "result.json").is_file())
    for cmd in (["report", str(out)], ["predict", str(out), "--source", str(store)]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2, res.output
        assert "incomplete" in res.output and "--resume" in res.output


def test_a_sweep_killed_and_resumed_writes_what_an_uninterrupted_sweep_writes(store, tmp_path):
    base = ["sweep", "--store", store, "--protocol", "train-one", "--rates", "0.5",
            "--modality", "mod0", "--fuser", "concat", "--seeds", "2", "--epochs", "10",
            "--patience", "10", "--device", "cpu"]
    ref = tmp_path / "ref"
    _finish(*base, "--out", ref)
    out = tmp_path / "sw"
    # killed inside the second cell, after the first (natural) finished; seeds trained
    # together or one after another, whichever the fuser does
    cell = out / "concat" / "train-one_mod0__p_0.5" / "checkpoints"

    def in_second_cell() -> bool:
        return any(_checkpoint_after_epoch(p, 2)() for p in cell.glob("*.pt"))
    assert _kill_when(_start(*base, "--out", out), in_second_cell)
    natural = out / "concat" / "natural" / "metrics.json"
    assert natural.is_file()
    kept = natural.stat().st_mtime_ns
    _finish(*base, "--out", out, "--resume")
    assert natural.stat().st_mtime_ns == kept  # a finished cell is not trained again
    rows = [_without_times(r) for r in json.loads((out / "sweep.json").read_text())]
    assert rows == [_without_times(r) for r in json.loads((ref / "sweep.json").read_text())]


def test_an_interrupted_comparison_keeps_its_finished_fusers_and_resumes_the_rest(store,
                                                                                   tmp_path):
    from medmix_core.config import make_config
    from medmix_core.runner import compare

    base = make_config(store=str(store), seeds=[0, 1], epochs=4, patience=4, d=8,
                       bootstrap=0, device="cpu", progress=False, sequential=True)
    out = tmp_path / "cmp"

    def stop_at_second(line: str) -> None:
        if line.startswith("seed(s)") and (out / "concat" / "metrics.json").is_file():
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM in the second fuser's run
    with pytest.raises(KeyboardInterrupt):
        compare(base, ["concat", "meanavg"], out, log=stop_at_second)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    kept = (out / "concat" / "metrics.json").stat().st_mtime_ns
    results = compare(base, ["concat", "meanavg"], out, log=lambda s: None, resume=True)
    assert [r["fuser"] for r in results] == ["concat", "meanavg"]
    assert (out / "concat" / "metrics.json").stat().st_mtime_ns == kept
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    fresh = compare(base, ["concat", "meanavg"], tmp_path / "fresh", log=lambda s: None)
    assert [_without_times(r) for r in fresh] == [_without_times(r) for r in results]
