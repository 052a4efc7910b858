"""Hostile and second-use paths: occupied results folders, incomplete runs, unknown labels,
leaking splits, damaged shards, two writers, and the messages bad input gets.

Every test here failed on the code before the fixes it names.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from medmix_datasets.synthetic import write_synthetic_store
from safetensors.torch import load_file, save_file
from torchmetrics.functional.classification import binary_auroc
from typer.testing import CliRunner

from medmix_core.batch import StoreTensors
from medmix_core.cli import app
from medmix_core.config import RunConfig, make_config
from medmix_core.errors import MedmixError, StoreError
from medmix_core.files import sha256_file
from medmix_core.lock import LOCK_NAME, FolderLock, LockedError
from medmix_core.metrics import compute_metrics
from medmix_core.runner import run
from medmix_core.runs import RunFolderError, open_run, read_info
from medmix_core.store import EmbeddingStore

runner = CliRunner()
FAST = ["--epochs", "2", "--patience", "2", "--d", "8", "--bootstrap", "0"]


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_labels(store: Path, task: str, values: np.ndarray) -> None:
    """Rewrite one task's labels in a store copy, keeping the manifest consistent."""
    man = json.loads((store / "manifest.json").read_text())
    labels = load_file(str(store / man["labels_file"]))
    labels[task] = torch.as_tensor(np.asarray(values, dtype=np.float32))
    save_file(labels, str(store / man["labels_file"]))
    man["labels_sha256"] = sha256_file(store / man["labels_file"])
    (store / "manifest.json").write_text(json.dumps(man))


def _cfg(store: Path, out: Path, **kw) -> RunConfig:
    base = dict(store=str(store), out=str(out), epochs=2, patience=2, d=8, bootstrap=0,
                seeds=1, progress=False)
    base.update(kw)
    return RunConfig(**base)


# ------------------------------------------------------------------ one run per folder
def test_a_second_run_into_an_occupied_out_is_refused_and_changes_nothing(
        tmp_path, synth_store_path):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--seeds", "3", "--out", out,
                *FAST).exit_code == 0
    before = _snapshot(out)
    res = _cli("run", "--store", synth_store_path, "--fuser", "concat", "--seeds", "1",
               "--out", out, *FAST)
    assert res.exit_code == 2
    assert "already holds a complete run (seeds [0, 1, 2])" in res.output
    assert "--overwrite" in res.output
    assert _snapshot(out) == before


def test_overwrite_clears_the_old_run_first(tmp_path, synth_store_path):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--seeds", "3", "--out", out,
                *FAST).exit_code == 0
    res = _cli("run", "--store", synth_store_path, "--fuser", "concat", "--seeds", "1",
               "--out", out, "--overwrite", *FAST)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("seed_*")) == ["seed_0"]  # old seeds are gone
    assert json.loads((out / "metrics.json").read_text())["fuser"] == "concat"
    p = _cli("predict", out, "--source", synth_store_path, "--out", tmp_path / "p.csv")
    assert p.exit_code == 0, p.output
    head = next(csv.reader(open(tmp_path / "p.csv")))
    assert [h for h in head if h.startswith("prob_seed")] == ["prob_seed0"]


def test_a_failing_run_over_a_complete_folder_writes_nothing(tmp_path, synth_store_path):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--out", out, *FAST).exit_code == 0
    before = _snapshot(out)
    for bad in (["--device", "cuda:7"], ["--external-test", tmp_path / "nowhere"],
                ["--threshold", "2"]):
        res = _cli("run", "--store", synth_store_path, "--out", out, "--overwrite", *FAST, *bad)
        assert res.exit_code == 2, (bad, res.output)
        assert "Traceback" not in res.output
    assert _snapshot(out) == before


def test_a_run_that_fails_while_training_leaves_no_folder(tmp_path, synth_store_path,
                                                          monkeypatch):
    import medmix_core.runner as runner_mod

    def boom(*a, **k):
        raise MedmixError("Training loss became nan at epoch 0 (seed 0).")

    monkeypatch.setattr(runner_mod, "train_seed", boom)
    with pytest.raises(MedmixError, match="nan"):
        run(_cfg(synth_store_path, tmp_path / "R"))
    assert not (tmp_path / "R").exists()
    (tmp_path / "empty").mkdir()  # a folder the user made is kept, empty
    with pytest.raises(MedmixError):
        run(_cfg(synth_store_path, tmp_path / "empty"))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_out_that_is_a_file_read_only_or_the_store_gets_a_message(tmp_path, synth_store_path,
                                                                  monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for cmd in (["run", "--store", synth_store_path, *FAST, "--out", f],
                ["extract", "--dataset", "synthetic", "--experts", "stats", "--out", f],
                ["sweep", "--store", synth_store_path, "--out", f]):
        res = _cli(*cmd)
        assert res.exit_code == 2 and "is an existing file, not a folder" in res.output, cmd
    res = _cli("run", "--store", synth_store_path, "--out", synth_store_path, *FAST)
    assert res.exit_code == 2 and "overlap" in res.output
    res = _cli("run", "--store", synth_store_path, "--out", synth_store_path / "inside", *FAST)
    assert res.exit_code == 2 and "overlap" in res.output
    # a read-only file system answers access(W_OK) with EROFS, whatever the permissions
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro
                        else real(p, mode, **k))
    for cmd in (["run", "--store", synth_store_path, *FAST, "--out", ro / "R"],
                ["extract", "--dataset", "synthetic", "--experts", "stats", "--out", ro / "S"],
                ["predict", tmp_path / "nothing", "--source", synth_store_path]):
        res = _cli(*cmd)
        assert res.exit_code == 2 and "Traceback" not in res.output, cmd
    res = _cli("run", "--store", synth_store_path, *FAST, "--out", ro / "R")
    assert "is not writable" in res.output and not (ro / "R").exists()


def test_predict_into_a_read_only_folder_is_refused(tmp_path, synth_store_path, monkeypatch):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--out", out, *FAST).exit_code == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro
                        else real(p, mode, **k))
    res = _cli("predict", out, "--source", synth_store_path, "--out", ro / "p.csv")
    assert res.exit_code == 2 and "is not writable" in res.output


def test_sweep_into_an_occupied_folder_is_refused(tmp_path, synth_store_path):
    out = tmp_path / "S"
    args = ["sweep", "--store", synth_store_path, "--rates", "0.5", "--epochs", "1",
            "--patience", "1", "--out", out]
    assert _cli(*args).exit_code == 0
    before = _snapshot(out)
    res = _cli(*args)
    assert res.exit_code == 2 and "already holds a sweep" in res.output
    assert _snapshot(out) == before
    res = _cli(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert read_info(out)["status"] == "complete"


def test_a_folder_medmix_did_not_write_is_never_cleared(tmp_path, synth_store_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my thesis")
    res = _cli("run", "--store", synth_store_path, "--out", out, "--overwrite", *FAST)
    assert res.exit_code == 2 and "medmix did not write" in res.output
    assert (out / "notes.txt").read_text() == "my thesis"


def test_predict_refuses_an_incomplete_run_and_says_how_to_resume(tmp_path, synth_store_path):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--seeds", "3", "--out", out,
                *FAST).exit_code == 0
    # what a run killed after its first seed leaves: run.json still "running"
    info = json.loads((out / "run.json").read_text())
    info.update(status="running", finished_seeds=[0])
    (out / "run.json").write_text(json.dumps(info))
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "seed_1")
    shutil.rmtree(out / "seed_2")
    res = _cli("predict", out, "--source", synth_store_path, "--out", tmp_path / "p.csv")
    assert res.exit_code == 2
    assert "incomplete run" in res.output and "seeds [0] of [0, 1, 2]" in res.output
    assert "--allow-incomplete" in res.output and not (tmp_path / "p.csv").exists()
    res = _cli("predict", out, "--source", synth_store_path, "--out", tmp_path / "p.csv",
               "--allow-incomplete")
    assert res.exit_code == 0 and "predicting with seeds [0] of [0, 1, 2]" in res.output
    res = _cli("run", "--store", synth_store_path, "--out", out, *FAST)
    assert res.exit_code == 2 and "incomplete run" in res.output
    for cmd in (["report", out], ["export", out, "--out", tmp_path / "m.onnx"]):
        res = _cli(*cmd)
        assert res.exit_code == 2 and "incomplete run" in res.output, (cmd, res.output)


def test_a_legacy_folder_whose_seeds_do_not_match_its_metrics_is_refused(
        tmp_path, synth_store_path):
    out = tmp_path / "R"
    assert _cli("run", "--store", synth_store_path, "--seeds", "2", "--out", out,
                *FAST).exit_code == 0
    (out / "run.json").unlink()  # a folder of an older medmix, mixed by a second run
    m = json.loads((out / "metrics.json").read_text())
    m["seeds"] = [0]
    (out / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(RunFolderError, match="mixes runs"):
        open_run(out)


def test_comparison_folder_follows_the_same_rules(tmp_path, synth_store_path):
    out = tmp_path / "T"
    args = ["run", "--store", synth_store_path, "--fuser", "medmix,concat", "--out", out, *FAST]
    assert _cli(*args).exit_code == 0
    assert (out / "comparison.md").is_file() and read_info(out)["kind"] == "comparison"
    assert read_info(out / "medmix")["status"] == "complete"
    before = _snapshot(out)
    res = _cli(*args)
    assert res.exit_code == 2 and "already holds a comparison" in res.output
    assert _snapshot(out) == before


# ------------------------------------------------------------------ labels
def test_unknown_labels_are_left_out_of_every_metric(tmp_path, synth_store_path):
    store = _copy_store(synth_store_path, tmp_path / "store")
    st = EmbeddingStore.open(store)
    task = st.tasks[0].name
    y = st.labels(task).numpy().copy()
    test = np.array(st.splits["test"])
    unknown = test[::7]
    y[unknown] = np.nan
    y[np.array(st.splits["train"])[::9]] = np.nan
    _set_labels(store, task, y)
    m = run(_cfg(store, tmp_path / "R"))
    rows = list(csv.DictReader(open(tmp_path / "R" / "predictions.csv")))
    assert len(rows) == len(test)
    assert sum(r["label"] == "" for r in rows) == len(unknown)  # unknown stays unknown
    known = [r for r in rows if r["label"] != ""]
    p = torch.tensor([float(r["prob"]) for r in known])
    lab = torch.tensor([int(r["label"]) for r in known])
    assert m["per_seed"][0]["auroc"] == pytest.approx(float(binary_auroc(p, lab)), abs=1e-5)
    assert m["n_test"] == len(known) and m["n_test_unknown_label"] == len(unknown)
    assert m["per_seed"][0]["n_unknown"] == len(unknown)
    # the same probabilities with the unknown rows counted as negatives give another AUROC
    all_p = torch.tensor([float(r["prob"]) for r in rows])
    as_zero = torch.tensor([0 if r["label"] == "" else int(r["label"]) for r in rows])
    assert float(binary_auroc(all_p, as_zero)) != pytest.approx(m["per_seed"][0]["auroc"])


def test_metrics_mask_unknown_labels_per_label():
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.8, 0.3], [0.3, 0.7]])
    nan = float("nan")
    labels = torch.tensor([[1.0, nan], [0.0, 1.0], [nan, 0.0], [0.0, 1.0]])
    m = compute_metrics(probs, labels, "multilabel")
    assert m["n"] == 4 and m["n_unknown"] == 0
    assert m["per_label"][0]["auroc"] == 1.0 and m["per_label"][1]["auroc"] == 1.0
    b = compute_metrics(probs[:, :1], torch.tensor([nan, nan, nan, nan]), "binary")
    assert b["n"] == 0 and all(np.isnan(b[k]) for k in ("auroc", "macro_f1", "accuracy"))
    mc = compute_metrics(torch.softmax(probs, 1), torch.tensor([0, -1, 0, 1]), "multiclass")
    assert mc["n"] == 3 and mc["n_unknown"] == 1


def test_a_multilabel_row_with_one_unknown_label_trains_on_the_others():
    from medmix_core.batch import Batch
    from medmix_core.training import task_loss

    nan = float("nan")
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]], requires_grad=True)
    labels = torch.tensor([[1.0, nan], [0.0, 1.0]])
    b = Batch(experts={}, expert_mask={}, modality_mask=torch.ones(2, 1, dtype=torch.bool),
              labels=labels, label_mask=torch.tensor([True, True]))
    loss = task_loss(logits, b, "multilabel", None)
    known = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[[0, 1, 1], [0, 0, 1]], torch.tensor([1.0, 0.0, 1.0]))
    assert float(loss.detach()) == pytest.approx(float(known))
    loss.backward()
    assert logits.grad[0, 1] == 0  # the unknown label pulls nothing


@pytest.mark.parametrize("what", ["all unknown", "label 2", "train shares test rows"])
def test_stores_that_cannot_be_trained_on_are_refused_before_anything_is_written(
        tmp_path, synth_store_path, what):
    store = _copy_store(synth_store_path, tmp_path / "store")
    st = EmbeddingStore.open(store)
    task = st.tasks[0].name
    if what == "all unknown":
        _set_labels(store, task, np.full(st.n_samples, np.nan))
        match = "no known labels|0 known labels"
    elif what == "label 2":
        y = st.labels(task).numpy().copy()
        y[st.splits["train"][:5]] = 2
        _set_labels(store, task, y)
        match = "neither 0 nor 1"
    else:
        man = json.loads((store / "manifest.json").read_text())
        man["splits"]["train"] = sorted(man["splits"]["train"] + man["splits"]["test"][:30])
        (store / "manifest.json").write_text(json.dumps(man))
        match = "share 30 rows"
    res = _cli("run", "--store", store, "--out", tmp_path / "R", *FAST)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert __import__("re").search(match, res.output), res.output
    assert not (tmp_path / "R").exists()


# ------------------------------------------------------------------ damaged stores
def _flip_bytes_keep_size(path: Path) -> None:
    data = bytearray(path.read_bytes())
    st = path.stat()
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, not the header
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back


def test_flipped_bytes_in_a_shard_are_caught_by_run_and_remade_by_extract(tmp_path):
    src = _copy_store_from_extract(tmp_path)
    shard = next((src / "shards").rglob("*.safetensors"))
    good = shard.read_bytes()
    st = EmbeddingStore.open(src)
    st.load(next(iter(st.experts.values()))[0])  # its hash is now cached
    _flip_bytes_keep_size(shard)
    res = _cli("run", "--store", src, "--out", tmp_path / "R", *FAST)
    assert res.exit_code == 2 and "sha256 differs" in res.output, res.output
    assert not (tmp_path / "R").exists()
    res = _cli("extract", "--dataset", "synthetic", "--experts", "stats", "--out", src,
               "--no-progress")
    assert res.exit_code == 0, res.output
    assert "sha256 differs" in res.output  # said, then re-made
    assert shard.read_bytes() == good
    assert _cli("run", "--store", src, "--out", tmp_path / "R", *FAST).exit_code == 0


def _copy_store_from_extract(tmp_path: Path) -> Path:
    out = tmp_path / "S"
    res = _cli("extract", "--dataset", "synthetic", "--experts", "stats", "--out", out,
               "--no-progress")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("drop", ["dim", "name", "shards"])
def test_a_manifest_entry_without_a_key_is_a_store_error(tmp_path, synth_store_path, drop):
    store = _copy_store(synth_store_path, tmp_path / "store")
    man = json.loads((store / "manifest.json").read_text())
    first = next(iter(man["experts"]))
    del man["experts"][first][0][drop]
    (store / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match=f"lacks or mistypes .*{drop}"):
        EmbeddingStore.open(store)
    res = _cli("run", "--store", store, "--out", tmp_path / "R", *FAST)
    assert res.exit_code == 2 and "Traceback" not in res.output


# ------------------------------------------------------------------ two writers
def test_a_second_writer_of_a_store_is_refused_with_the_holder(tmp_path):
    import socket

    out = tmp_path / "S"
    with FolderLock(out, "store"):
        with pytest.raises(LockedError, match="one writer at a time"):
            FolderLock(out, "store").acquire()
    assert not (out / LOCK_NAME).exists()
    # a live holder on this host (pid 1 is always alive) is named, with its command
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(),
                                             "command": "medmix extract", "since": "09:00"}))
    res = _cli("extract", "--dataset", "synthetic", "--experts", "stats", "--out", out)
    assert res.exit_code == 2
    assert f"pid 1 on host {socket.gethostname()} since 09:00 (medmix extract)" in res.output


def test_two_extract_processes_into_one_store_never_lose_an_expert(tmp_path):
    import subprocess
    import sys

    from medmix_datasets.physionet2012 import write_subset

    src = write_subset(tmp_path / "src", 40)
    out = tmp_path / "S"
    code = ("import sys; from medmix_core.extract import extract; "
            "extract('physionet2012', sys.argv[1], [sys.argv[2]], source=sys.argv[3], "
            "progress=False)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), e, str(src)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e in ("grid", "stats")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    finished = [e for e, p in zip(("grid", "stats"), procs) if p.returncode == 0]
    # each either ran alone or was refused, naming the holder; none is silently lost
    assert finished, outs
    for p, o in zip(procs, outs):
        assert p.returncode == 0 or "is being written by pid" in o, o
    assert EmbeddingStore.open(out).expert_names() == sorted(finished)
    for e in ("grid", "stats"):  # and a second round, one after the other, keeps both
        res = _cli("extract", "--source", src, "--experts", e, "--out", out, "--no-progress")
        assert res.exit_code == 0, res.output
    assert EmbeddingStore.open(out).expert_names() == ["grid", "stats"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "S"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(),
                                             "since": "yesterday"}))
    res = _cli("extract", "--dataset", "synthetic", "--experts", "stats", "--out", out,
               "--no-progress")
    assert res.exit_code == 0, res.output
    assert not (out / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_refused_with_what_to_do(tmp_path):
    out = tmp_path / "S"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    res = _cli("extract", "--dataset", "synthetic", "--experts", "stats", "--out", out)
    assert res.exit_code == 2 and "host elsewhere" in res.output
    assert f"delete {out / LOCK_NAME}" in res.output


# ------------------------------------------------------------------ messages
def test_an_unknown_expert_is_called_an_expert(tmp_path, synth_store_path):
    res = _cli("run", "--experts", "nosuchexpert", "--out", tmp_path / "R", *FAST)
    assert res.exit_code == 2
    assert "Unknown expert 'nosuchexpert'" in res.output and "teacher" not in res.output
    assert not (tmp_path / "R").exists()


def test_unknown_fuser_options_and_bad_flags_name_the_flag(tmp_path, synth_store_path):
    base = ["run", "--store", synth_store_path, "--out", tmp_path / "R", *FAST]
    res = _cli(*base, "--fuser-options", '{"weighting": "inverse"}')
    assert res.exit_code == 2 and "not options of fuser 'medmix'" in res.output
    assert "router_hidden" in res.output  # what it does accept
    res = _cli(*base, "--fuser-options", "{weighting: inverse}")
    assert res.exit_code == 2 and "--fuser-options" in res.output and "JSON" in res.output
    res = _cli(*base, "--fuser-options", "[1, 2]")
    assert res.exit_code == 2 and "JSON object" in res.output
    for thr in ("2", "0", "-0.1", "foo"):
        res = _cli(*base, "--threshold", thr)
        assert res.exit_code == 2 and "--threshold" in res.output, res.output
    res = _cli("sweep", "--store", synth_store_path, "--rates", "0.1,x", "--out",
               tmp_path / "S")
    assert res.exit_code == 2 and "--rates" in res.output
    assert not (tmp_path / "R").exists() and not (tmp_path / "S").exists()


def test_nan_loss_message_names_real_options_and_no_warning_leaks(tmp_path, synth_store_path):
    store = _copy_store(synth_store_path, tmp_path / "store")
    man = json.loads((store / "manifest.json").read_text())
    entry = next(iter(man["experts"].values()))[0]
    for sh in entry["shards"]:
        p = store / sh["file"]
        t = load_file(str(p))
        t["emb"] = t["emb"] * 1e30  # finite, and overflows inside the network
        save_file(t, str(p))
        sh["bytes"], sh["sha256"] = p.stat().st_size, sha256_file(p)
    (store / "manifest.json").write_text(json.dumps(man))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MedmixError) as err:
            run(_cfg(store, tmp_path / "R", lr=1e-3))
    msg = str(err.value)
    assert "Training loss became" in msg and "--amp" not in msg and "--lr" in msg
    assert not (tmp_path / "R").exists()


def test_device_rule_is_one_function():
    from medmix_core.training import resolve_device

    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(MedmixError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(MedmixError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    with pytest.raises(MedmixError, match="device"):
        make_config(device="tpu")
    assert RunConfig(device="cuda:1").device == "cuda:1"


# ------------------------------------------------------------------ experts by name
def test_a_cohort_is_laid_out_by_name_whatever_its_store_order(tmp_path):
    a = write_synthetic_store(tmp_path / "a", n=60, experts_per_modality=2, teacher_dim=None)
    man = json.loads((a.path / "manifest.json").read_text())
    b_path = _copy_store(a.path, tmp_path / "b")
    man_b = json.loads((b_path / "manifest.json").read_text())
    for m in man_b["experts"]:
        man_b["experts"][m] = man_b["experts"][m][::-1]  # same experts, other order
    (b_path / "manifest.json").write_text(json.dumps(man_b))
    ta = StoreTensors.from_store(a)
    layout = {m: [e["name"] for e in es] for m, es in man["experts"].items()}
    tb = StoreTensors.from_store(EmbeddingStore.open(b_path), layout=layout, dims=ta.dims())
    assert tb.experts == ta.experts
    for m in ta.modalities:
        for x, y in zip(ta.emb[m], tb.emb[m]):
            assert torch.equal(x, y)
        assert torch.equal(ta.mask[m], tb.mask[m])
    # a modality the cohort lacks is absent for every row, not an error
    layout2 = {**layout, "scan": ["ct-expert"]}
    tc = StoreTensors.from_store(a, layout=layout2, dims={**ta.dims(), "scan": [7]})
    assert not tc.mask["scan"].any() and tc.emb["scan"][0].shape == (60, 7)
    assert not tc.modality_mask()[:, -1].any()
    with pytest.raises(StoreError, match="expert dims differ"):
        StoreTensors.from_store(a, layout=layout, dims={m: [d + 1 for d in v]
                                                        for m, v in ta.dims().items()})


def test_a_comparison_checks_every_fuser_before_training_any(tmp_path, synth_store_path):
    res = _cli("run", "--store", synth_store_path, "--fuser", "medmix,concat", "--teacher",
               "teacher", "--out", tmp_path / "T", *FAST)
    assert res.exit_code == 2 and "'concat' exposes no modality representations" in res.output
    assert "seed 0: training" not in res.output  # medmix was not trained first
    assert not (tmp_path / "T").exists()
