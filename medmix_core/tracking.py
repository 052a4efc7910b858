"""Experiment tracking: a run's losses, config, results and files in MLflow or TensorBoard.

Both are optional extras (``pip install 'medmix[tracking]'``), imported only when chosen.
The runner drives a :class:`Tracker`::

    tracker = make_tracker("mlflow", tracking_uri=None)   # or "tensorboard"
    tracker.open(run_dir, config)                         # resolved RunConfig as a dict
    ... train_seed(..., on_epoch=lambda rec: tracker.log_epoch(seed, rec)) ...
    tracker.log_final(metrics, files)                     # metrics.json's dict; files to keep
    tracker.close()

Names. Per-epoch values are ``seed_<s>/<key>`` at step = epoch, one per numeric key of the
epoch record (train_loss, val_loss, distill_loss, aux_loss, lambda_d, and any the training
adds). Final values are those of :func:`final_scalars`, at step 0. MLflow keeps the config
as parameters (nested keys joined by ``.``) and the files as artifacts; TensorBoard keeps the
config and the tables as text and the PNG plots as images, in ``RUN/tensorboard`` (the
model files stay in the run folder beside it).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medmix_core.errors import MedmixError
from medmix_core.metrics import METRICS

TRACKERS = ("mlflow", "tensorboard")
#: MLflow's limit on a parameter value's length (characters)
PARAM_MAX = 6000


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json a tracker records: ``<split>/<metric>_mean|_std``,
    ``test/<metric>_ci95_lo|_hi``, ``seed_<s>/test_<metric>``, ``seed_<s>/val_<metric>``,
    ``seed_<s>/best_epoch``. Undefined (null) values are left out, never logged as 0."""
    out: dict[str, float] = {}
    for split in ("test", "external"):
        for k in METRICS:
            for stat in ("mean", "std"):
                v = _num(((metrics.get(split) or {}).get(k) or {}).get(stat))
                if v is not None:
                    out[f"{split}/{k}_{stat}"] = v
    for k, (lo, hi) in (metrics.get("test_ci95") or {}).items():
        for name, v in (("lo", lo), ("hi", hi)):
            if _num(v) is not None:
                out[f"test/{k}_ci95_{name}"] = float(v)
    seeds = metrics.get("seeds") or []
    for s, per in zip(seeds, metrics.get("per_seed") or []):
        for k in METRICS:
            if _num(per.get(k)) is not None:
                out[f"seed_{s}/test_{k}"] = float(per[k])
    for info in metrics.get("seed_info") or []:
        s = info["seed"]
        if _num(info.get("best_epoch")) is not None:
            out[f"seed_{s}/best_epoch"] = float(info["best_epoch"])
        for k in METRICS:
            v = _num((info.get("val") or {}).get(k))
            if v is not None:
                out[f"seed_{s}/val_{k}"] = v
    return out


def epoch_scalars(seed: int, record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"seed_<s>/<key>": value}) of one epoch record from ``train_seed``."""
    if "epoch" not in record:
        raise MedmixError(f"Epoch record without 'epoch': expected train_seed's record, "
                          f"found keys {sorted(record)}.")
    vals = {f"seed_{seed}/{k}": _num(v) for k, v in record.items() if k != "epoch"}
    return int(record["epoch"]), {k: v for k, v in vals.items() if v is not None}


class Tracker(ABC):
    """What the runner calls; one tracker per run."""

    name = ""

    @abstractmethod
    def open(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        """Start tracking the run written to ``run_dir``; record its resolved config."""

    @abstractmethod
    def log_epoch(self, seed: int, record: dict[str, Any]) -> None:
        """One epoch's record of one seed (train_seed's ``on_epoch`` argument)."""

    @abstractmethod
    def log_final(self, metrics: dict[str, Any], files: Iterable[str | Path] = ()) -> None:
        """The final metrics (metrics.json's dict) and the files to keep (tables, plots,
        the deployed model's files)."""

    @abstractmethod
    def close(self, status: str = "FINISHED") -> None:
        """Finish the run ("FINISHED", or "FAILED" when training raised)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type else "FINISHED")


class MLflowTracker(Tracker):
    """MLflow through its client API (no global fluent run): a local file store
    (``RUN/mlruns``) unless a tracking URI is given. MLflow 3 keeps the file store in
    maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which this tracker sets for a
    file URI; a ``sqlite:///`` or server URI needs no such opt-in.

    Args:
        tracking_uri: e.g. ``http://mlflow.example:5000``, ``file:/abs/mlruns``,
            ``sqlite:///mlflow.db``; None = ``file:RUN/mlruns``.
        experiment: experiment name (created when missing).
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "medmix") -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise MedmixError("--tracker mlflow needs MLflow: pip install 'medmix[tracking]' "
                              "(or pip install mlflow-skinny).") from exc
        self._client_cls = MlflowClient
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = None
        self.run_id: str | None = None

    def open(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_dir = Path(run_dir)
        uri = self.tracking_uri or (run_dir.resolve() / "mlruns").as_uri()
        self.tracking_uri = uri
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; a local
            # folder beside the run is what the user chose (a sqlite:/// URI is the other way)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self._client_cls(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, run_name=run_dir.name,
                                     tags={"medmix.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, _param_value(v)) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def log_epoch(self, seed: int, record: dict[str, Any]) -> None:
        step, values = epoch_scalars(seed, record)
        self._metrics(values, step)

    def log_final(self, metrics: dict[str, Any], files: Iterable[str | Path] = ()) -> None:
        self._metrics(final_scalars(metrics), 0)
        for f in files:
            f = Path(f)
            if f.is_dir():
                self.client.log_artifacts(self.run_id, str(f), artifact_path=f.name)
            elif f.is_file():
                sub = f.parent.name if f.parent.name.startswith("seed_") else None
                self.client.log_artifact(self.run_id, str(f), artifact_path=sub)

    def close(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= PARAM_MAX else s[:PARAM_MAX - 1] + "…"


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``RUN/tensorboard`` (``torch.utils.tensorboard``).

    Args:
        log_dir: where to write the events (default ``RUN/tensorboard``).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise MedmixError("--tracker tensorboard needs TensorBoard: pip install "
                              "'medmix[tracking]' (or pip install tensorboard).") from exc
        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir) if log_dir else None
        self.writer = None

    def open(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        self.log_dir = self.log_dir or Path(run_dir) / "tensorboard"
        self.writer = self._writer_cls(log_dir=str(self.log_dir))
        rows = "\n".join(f"| {k} | {_param_value(v)} |" for k, v in flatten(config).items())
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + rows, 0)

    def log_epoch(self, seed: int, record: dict[str, Any]) -> None:
        step, values = epoch_scalars(seed, record)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_final(self, metrics: dict[str, Any], files: Iterable[str | Path] = ()) -> None:
        for k, v in final_scalars(metrics).items():
            self.writer.add_scalar(k, v, 0)
        kept = []
        for f in map(Path, files):
            if f.suffix == ".png" and f.is_file():
                import matplotlib.image as mpimg

                img = mpimg.imread(str(f))  # [H, W, 3|4] float in [0, 1]
                self.writer.add_image(f"plots/{f.stem}", img[..., :3], 0, dataformats="HWC")
            elif f.suffix in (".md", ".csv") and f.is_file():
                text = f.read_text("utf-8")
                body = text if f.suffix == ".md" else "```\n" + text[:20000] + "\n```"
                self.writer.add_text(f"tables/{f.stem}", body, 0)
            elif f.exists():
                kept.append(str(f))
        if kept:  # event files hold no binaries: name where they are
            self.writer.add_text("files", "\n".join(f"- `{k}`" for k in kept), 0)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_tracker(name: str, tracking_uri: str | None = None,
                 experiment: str = "medmix") -> Tracker:
    """A tracker by name ("mlflow" or "tensorboard")."""
    if name == "mlflow":
        return MLflowTracker(tracking_uri, experiment)
    if name == "tensorboard":
        if tracking_uri:
            raise MedmixError("--tracking-uri is for --tracker mlflow; TensorBoard writes "
                              "event files into the run folder (RUN/tensorboard).")
        return TensorBoardTracker()
    raise MedmixError(f"Unknown tracker {name!r}: expected one of {', '.join(TRACKERS)}.")


def run_files(run_dir: str | Path) -> list[Path]:
    """The files of a run folder worth keeping in a tracker: tables, plots, the config,
    metrics, predictions, the model card and the deployed model of every seed."""
    run_dir = Path(run_dir)
    keep = [p for p in sorted(run_dir.iterdir()) if p.is_file()
            and p.suffix in (".json", ".csv", ".md", ".png")]
    for seed in sorted(run_dir.glob("seed_*")):
        keep += [p for p in sorted(seed.iterdir()) if p.is_file()]
    return keep
