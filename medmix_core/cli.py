"""The ``medmix`` command line (Typer). Plugins add commands through ``register_commands``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from medmix_core.errors import MedmixError

app = typer.Typer(
    help="medmix: multimodal clinical prediction with missing modalities (MedMIX and baselines).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _fail(exc: Exception) -> None:
    typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _csv(v: str | None) -> list[str] | None:
    from medmix_core.config import parse_names

    return parse_names(v)


def parse_threshold(value: str | None) -> float | str | None:
    """``--threshold``: a probability in (0, 1) or ``val``."""
    if value is None or value == "val":
        return value
    try:
        thr = float(value)
    except ValueError:
        raise MedmixError(f"--threshold {value!r}: expected a number strictly between 0 and 1 "
                          f"(e.g. 0.3) or 'val' (chosen on validation).") from None
    if not 0.0 < thr < 1.0:
        raise MedmixError(f"--threshold {value}: a decision threshold is a probability strictly "
                          f"between 0 and 1, or 'val'.")
    return thr


def parse_json_option(value: str | None, flag: str) -> dict[str, Any] | None:
    """A JSON object given on the command line, e.g. ``--fuser-options '{"k": 1}'``."""
    if not value:
        return None
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        raise MedmixError(f"{flag} {value!r} is not valid JSON ({exc.msg} at column "
                          f"{exc.colno}); expected an object such as '{{\"router_hidden\": "
                          f"64}}' (quote keys with double quotes).") from None
    if not isinstance(obj, dict):
        raise MedmixError(f"{flag} {value!r}: expected a JSON object of option names to "
                          f"values, found {type(obj).__name__}.")
    return obj


def parse_expert_options(items: list[str] | None) -> dict[str, dict[str, Any]] | None:
    """``["biomedclip.model_path=/w", "grid.bin_hours=6"]`` -> nested dict (JSON values)."""
    if not items:
        return None
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, opt = key.partition(".")
        if not sep or not dot or not name or not opt:
            raise MedmixError(f"--expert-option {item!r}: expected EXPERT.OPTION=VALUE, e.g. "
                              f"biomedclip.model_path=/models/biomedclip or grid.bin_hours=6.")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[opt] = value
    return out

def parse_dataset_options(items: list[str] | None) -> dict[str, Any] | None:
    """``["split_seed=3", "mesh=major+automatic"]`` -> dict (JSON values, else strings)."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MedmixError(f"--dataset-option {item!r}: expected KEY=VALUE, e.g. "
                              f"split_seed=3 (see the dataset's page for its options).")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


DATASET_OPTION_HELP = ("Option of the dataset plugin, KEY=VALUE (repeatable), e.g. "
                       "split_seed=3; unknown keys are the dataset's errors.")

EXPERT_OPTION_HELP = ("Option for one expert's constructor, EXPERT.OPTION=VALUE (repeatable), "
                      "e.g. biomedclip.model_path=/models/biomedclip.")


def build_config(config: Path | None, flags: dict[str, Any], sources: dict | None = None):
    """Defaults, then the project file (medmix.yaml or [tool.medmix] in ./pyproject.toml),
    then --config FILE, then flags. ``sources`` (if given) receives where each value came from.
    """
    from medmix_core.config import load_config_file, load_project_defaults, make_config

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    project, where = load_project_defaults(Path.cwd())
    for k, v in project.items():
        values[k], origin[k] = v, where
    if config is not None:
        for k, v in load_config_file(config).items():
            values[k], origin[k] = v, str(config)
    for k, v in flags.items():
        if v is not None:
            values[k], origin[k] = v, "command line"
    if values.get("preset") != "paper":  # the paper's recipe takes no dataset defaults
        for k, v in _dataset_run_defaults(values).items():
            if k not in values:
                values[k], origin[k] = v, f"dataset {values.get('dataset') or 'physionet2012'}"
    cfg = make_config(**values)
    if sources is not None:
        sources.update({k: origin.get(k, "default") for k in type(cfg).model_fields})
    return cfg


def _dataset_run_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Training settings the run's dataset recommends (``Dataset.run_defaults``, chosen on
    its validation split); they sit between the built-in defaults and the project file.
    A ``--store`` of another dataset gets none."""
    from medmix_core.config import RunConfig
    from medmix_core.plugins import get_dataset

    name = values.get("dataset") or RunConfig.model_fields["dataset"].default
    store = values.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        try:
            made_by = json.loads((Path(store) / "manifest.json").read_text("utf-8"))
            made_by = (made_by.get("dataset") or {}).get("name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            made_by = None  # opening the store later reports the damage
        if made_by != name:
            return {}
    try:
        return dict(getattr(get_dataset(name), "run_defaults", {}) or {})
    except MedmixError:
        return {}  # an unknown dataset name is reported by the run itself


@app.command()
def run(
    dataset: str | None = typer.Option(None, help="Dataset plugin (default physionet2012, bundled)."),
    source: str | None = typer.Option(None, help="Raw data path for the dataset (default: bundled)."),
    dataset_option: list[str] | None = typer.Option(None, help=DATASET_OPTION_HELP),
    spec: str | None = typer.Option(None, help="Cohort spec (YAML/JSON) for the manifest dataset; implies --dataset manifest."),
    store: str | None = typer.Option(None, help="Embedding store folder (default stores/<dataset>)."),
    fuser: str | None = typer.Option(None, help="Fuser plugin, or several comma-separated for a comparison table (default medmix)."),
    experts: str | None = typer.Option(None, help="Comma-separated experts (default: all in the store, or the dataset's default committee)."),
    drop_experts: str | None = typer.Option(None, help="Experts to leave out, by name or family (general, domain, rag): the ablation."),
    expert_option: list[str] | None = typer.Option(None, help=EXPERT_OPTION_HELP),
    teacher: str | None = typer.Option(None, help="Teacher whose embeddings drive distillation (training only)."),
    distill: bool | None = typer.Option(None, "--distill/--no-distill", help="Teacher-student distillation (default: on when --teacher is given)."),
    task: str | None = typer.Option(None, help="Task name (default: the dataset's first, mortality for physionet2012)."),
    seeds: int | None = typer.Option(None, help="Number of seeds: trains seeds 0..N-1 and reports mean ± std."),
    epochs: int | None = typer.Option(None, help="Maximum epochs (default 200)."),
    patience: int | None = typer.Option(None, help="Early-stopping patience on validation loss (default 20)."),
    lr: float | None = typer.Option(None, help="Base learning rate (router: 0.3 x)."),
    batch_size: int | None = typer.Option(None, help="Minibatch size (default 256)."),
    d: int | None = typer.Option(None, help="Shared representation width d (default 128)."),
    dropout: float | None = typer.Option(None, help="Dropout of the expert projections."),
    modality_dropout: float | None = typer.Option(None, help="Training-time modality dropout on masks."),
    expert_dropout: float | None = typer.Option(None, help="Training-time expert dropout on masks."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay."),
    keep_modalities: str | None = typer.Option(None, help="Use only these modalities (comma-separated)."),
    fuser_options: str | None = typer.Option(None, help='Fuser options as JSON, e.g. \'{"router_hidden": 64}\' for medmix; unknown keys are errors that list the fuser\'s options.'),
    threshold: str | None = typer.Option(None, help="Decision threshold: a number in (0, 1) (default 0.5) or 'val' (maximise macro-F1 on validation)."),
    device: str | None = typer.Option(None, help="auto (default: a CUDA GPU if there is one, else CPU) | cpu | cuda | cuda:N."),
    threads: int | None = typer.Option(None, help="CPU threads for training (default 1: the fusion networks are small)."),
    out: str | None = typer.Option(None, help="Results folder (default runs/<timestamp>-<fuser>); an occupied one is refused."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run already in --out, then write this one."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out started with the same configuration (finished seeds kept, the others from their last epoch); starts when --out is empty."),
    sequential: bool | None = typer.Option(None, "--sequential/--together", help="Train the seeds one after another instead of together as one vectorised model (the default where the fuser allows)."),
    data_parallel: bool | None = typer.Option(None, "--data-parallel", help="Under torchrun / --nproc: every process trains each seed on its share of each batch (DDP) instead of the processes sharing out the seeds."),
    stream: bool | None = typer.Option(None, "--stream/--in-memory", help="Read embeddings from disk batch by batch (a store larger than memory) or load them; default: by the store's size."),
    nproc: int | None = typer.Option(None, help="Start this many processes through torch.distributed.run (one per GPU, or CPU processes): the same as `torchrun --nproc-per-node N --no-python medmix ...`."),
    external_test: str | None = typer.Option(None, help="Second cohort (store, or raw source) to evaluate the trained models on."),
    external_dataset: str | None = typer.Option(None, help="Dataset plugin that reads a raw --external-test source (default: --dataset)."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap resamples for 95% CIs of the test metrics (0 = off)."),
    preset: str | None = typer.Option(None, help="Training recipe: default (built-in defaults and the dataset's run defaults) or paper (the paper's: lr 1e-5, patience 20, up to 200 epochs, no mask augmentation, convex mix, no dataset run defaults)."),
    refit: bool | None = typer.Option(None, "--refit/--no-refit", help="Retrain each seed on train + validation for the epoch count chosen on validation, and deploy that model."),
    tracker: str | None = typer.Option(None, help="Log the run to mlflow or tensorboard (extra 'tracking')."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: a file store in RUN/mlruns)."),
    config: Path | None = typer.Option(None, help="JSON or YAML config file; flags override it."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the resolved configuration and exit."),
) -> None:
    """Train and evaluate a fuser on a store (extracted on first use) and write a results folder.

    With no arguments: bundled PhysioNet 2012, in-hospital mortality, fuser medmix.
    """
    relaunch(nproc)
    try:
        thr = parse_threshold(threshold)
        fopts = parse_json_option(fuser_options, "--fuser-options")
        fusers = _csv(fuser) or [None]
        if spec is not None:
            dataset = dataset or "manifest"
            source = source or str(Path(spec).resolve())
        flags = dict(dataset=dataset, source=source, store=store, experts=_csv(experts),
                     dataset_options=parse_dataset_options(dataset_option),
                     drop_experts=_csv(drop_experts),
                     expert_options=parse_expert_options(expert_option), teacher=teacher, distill=distill, task=task,
                     seeds=seeds, epochs=epochs, patience=patience, lr=lr, batch_size=batch_size,
                     d=d, dropout=dropout, modality_dropout=modality_dropout,
                     expert_dropout=expert_dropout, weight_decay=weight_decay,
                     keep_modalities=_csv(keep_modalities), fuser_options=fopts, threshold=thr,
                     device=device, threads=threads, external_test=external_test,
                     external_dataset=external_dataset, bootstrap=bootstrap,
                     preset=preset, refit=refit, sequential=sequential,
                     data_parallel=data_parallel, stream=stream)
        sources: dict[str, str] = {}
        base = build_config(config, flags, sources)
        if show_config:
            data = json.loads(base.model_dump_json())
            width = max(len(k) for k in data)
            for k, v in data.items():
                typer.echo(f"{k:<{width}}  {json.dumps(v):<40}  ({sources[k]})")
            return
        from medmix_core.report import print_metrics
        from medmix_core.runner import compare
        from medmix_core.runner import run as run_one

        if tracker is not None and tracker not in ("mlflow", "tensorboard"):
            raise MedmixError(f"--tracker {tracker!r}: expected mlflow or tensorboard.")
        if len(fusers) == 1:
            cfg = base if fusers[0] is None else base.model_copy(update={"fuser": fusers[0]})
            if out is not None:
                cfg = cfg.model_copy(update={"out": out})
            metrics = run_one(cfg, overwrite=overwrite, resume=resume,
                              tracker=_tracker(tracker, tracking_uri))
            if is_main():
                print_metrics(metrics)
        else:
            if tracker is not None:
                raise MedmixError("--tracker logs one run; give one --fuser, or track each "
                                  "fuser's run separately.")
            for metrics in compare(base, fusers, out, overwrite, resume=resume):
                if is_main():
                    print_metrics(metrics)
    except (MedmixError, OSError) as exc:
        _fail(exc)


def _tracker(name: str | None, uri: str | None):
    if name is None:
        return None
    from medmix_core.tracking import make_tracker

    return make_tracker(name, uri)


@app.command()
def extract(
    dataset: str = typer.Option("physionet2012", help="Dataset plugin."),
    experts: str = typer.Option("stats,grid", help="Comma-separated expert plugins."),
    out: Path = typer.Option(..., help="Store folder to write (resumes if it exists)."),
    source: str | None = typer.Option(None, help="Raw data path (default: the dataset's bundled data)."),
    teacher: str | None = typer.Option(None, help="Teacher plugin(s), comma-separated (training split only)."),
    device: str = typer.Option("auto", help="auto (default: a CUDA GPU if there is one, else CPU) | cpu | cuda | cuda:N."),
    shard_size: int = typer.Option(1024, help="Rows per shard (the unit of resumption)."),
    fit_from: Path | None = typer.Option(None, help="Reuse the fitted expert state of this store or run folder (encode an external cohort with training statistics)."),
    expert_option: list[str] | None = typer.Option(None, help=EXPERT_OPTION_HELP),
    teacher_rows: str = typer.Option("train", help="Rows a teacher encodes: train (default; teachers are training-only) or all."),
    split_seed: int | None = typer.Option(None, help="Seed of the dataset's stratified train/val/test split."),
    dataset_option: list[str] | None = typer.Option(None, help=DATASET_OPTION_HELP),
    all_rows_split: str | None = typer.Option(None, help="Put every row in this split (train, val or test), e.g. test for a cohort only predicted on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store in --out that was made from other data."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar per expert."),
    nproc: int | None = typer.Option(None, help="Start this many processes through torch.distributed.run; each encodes its share of the shards (one GPU each)."),
) -> None:
    """Encode a dataset with expert plugins into an EmbeddingStore (batched, resumable)."""
    relaunch(nproc)
    try:
        from medmix_core.extract import extract as do_extract
        from medmix_core.training import resolve_device

        st = do_extract(dataset, out, _csv(experts) or [], _csv(teacher) or [], source=source,
                        device=str(resolve_device(device)), shard_size=shard_size,
                        fit_from=fit_from,
                        expert_options=parse_expert_options(expert_option),
                        teacher_rows=teacher_rows, overwrite=overwrite,
                        dataset_options=_dataset_options(dataset_option, split_seed),
                        progress=progress, all_rows_split=all_rows_split)
        if not is_main():
            return  # rank 0 reports the store
        typer.echo(f"Store {st.path}: {st.n_samples} samples, tasks "
                   f"{[t.name for t in st.tasks]}, splits "
                   f"{ {k: len(v) for k, v in st.splits.items()} }")
        typer.echo("Missing rate per modality:")
        for m, r in st.modality_missing_rates().items():
            typer.echo(f"  {m:<12} {r * 100:6.2f} %")
    except (MedmixError, OSError) as exc:
        _fail(exc)


def _dataset_options(items: list[str] | None, split_seed: int | None) -> dict | None:
    opts = parse_dataset_options(items) or {}
    if split_seed is not None:
        opts["split_seed"] = split_seed
    return opts or None


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List installed plugins: distribution, module, hooks, and the names they register."""
    from medmix_core.plugins import load_errors, plugin_info, registry

    try:
        info = plugin_info()
    except MedmixError as exc:
        _fail(exc)
    errors = load_errors()
    if as_json:
        typer.echo(json.dumps({"plugins": info, "errors": errors}, indent=1))
        return
    reg = registry()
    for p in info:
        typer.echo(f"{p['name']}  ({p['distribution']}; module {p['module']})")
        typer.echo(f"  hooks: {', '.join(p['hooks'])}")
        for kind, names in p["registers"].items():
            parts = []
            for n in names:
                obj = reg.entries[kind][n].obj
                if kind in ("experts", "teachers"):
                    kinds = "/".join(getattr(obj, "kinds", ()))
                    parts.append(f"{n} [{kinds}; {getattr(obj, 'family', '')}]")
                else:
                    parts.append(n)
            typer.echo(f"  {kind}: {', '.join(parts)}")
    for name, err in errors.items():
        typer.secho(f"{name}  FAILED TO LOAD: {err}", fg=typer.colors.RED)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A results folder written by `medmix run`."),
    source: str = typer.Option(..., help="New patients: a store, or raw data for the run's dataset."),
    out: Path | None = typer.Option(None, help="CSV to write (default RUN_DIR/predict.csv)."),
    device: str = typer.Option("auto", help="auto (default: a CUDA GPU if there is one, else CPU) | cpu | cuda | cuda:N."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Predict with the seeds that finished when the run did not (they are named)."),
) -> None:
    """Apply a trained run's deployed (teacher-free) models to new patients (no outcomes needed)."""
    try:
        from medmix_core.predict import predict as do_predict

        path = do_predict(run_dir, source, out, device=device,
                          allow_incomplete=allow_incomplete, log=typer.echo)
        typer.echo(f"Wrote {path}")
    except (MedmixError, OSError) as exc:
        _fail(exc)


@app.command()
def sweep(
    protocol: str = typer.Option("test-random", help="natural, train-one, test-one, train-random, test-random, train-bernoulli, test-bernoulli, mar, mnar."),
    rates: str = typer.Option("0.1,0.3,0.5,0.7,1.0", help="Comma-separated rates (p or r)."),
    fuser: str = typer.Option("medmix", help="Comma-separated fusers to compare."),
    out: Path = typer.Option(..., help="Sweep folder (tables, plots, one run folder per fuser/rate); an occupied one is refused."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the sweep already in --out, then write this one."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep in --out started with the same options: finished cells are kept, unfinished ones continue."),
    nproc: int | None = typer.Option(None, help="Start this many processes through torch.distributed.run; each cell's seeds are shared out over them."),
    sequential: bool | None = typer.Option(None, "--sequential/--together", help="Train each cell's seeds one after another instead of together as one vectorised model."),
    modality: str | None = typer.Option(None, help="Modality for *-one/mar/mnar (default: each in turn)."),
    strength: float = typer.Option(0.0, help="mar/mnar dependence strength (logit units)."),
    covariate: str | None = typer.Option(None, help="mar covariate (default n_available: modalities observed per sample)."),
    keep_last: bool = typer.Option(True, "--keep-last/--no-keep-last", help="Never drop a sample's last available modality."),
    seeds: int | None = typer.Option(None, help="Seeds per fuser (default 1)."),
    epochs: int | None = typer.Option(None, help="Maximum epochs per training."),
    patience: int | None = typer.Option(None, help="Early-stopping patience."),
    dataset: str | None = typer.Option(None, help="Dataset plugin."),
    source: str | None = typer.Option(None, help="Raw data path."),
    dataset_option: list[str] | None = typer.Option(None, help=DATASET_OPTION_HELP),
    store: str | None = typer.Option(None, help="Embedding store folder."),
    experts: str | None = typer.Option(None, help="Comma-separated experts."),
    teacher: str | None = typer.Option(None, help="Teacher for distillation."),
    task: str | None = typer.Option(None, help="Task name."),
    device: str | None = typer.Option(None, help="auto (default) | cpu | cuda | cuda:N."),
    external_test: str | None = typer.Option(None, help="External cohort store, evaluated under the same test-time protocol."),
    config: Path | None = typer.Option(None, help="JSON or YAML config file; flags override it."),
) -> None:
    """Missing-modality robustness: a protocol over rates, per fuser, mean ± std over seeds."""
    relaunch(nproc)
    try:
        from medmix_core.sweep import sweep as do_sweep

        base = build_config(config, dict(
            seeds=seeds, epochs=epochs, patience=patience, dataset=dataset, source=source,
            dataset_options=parse_dataset_options(dataset_option),
            store=store, experts=_csv(experts), teacher=teacher, task=task, device=device,
            external_test=external_test, sequential=sequential))
        rows = do_sweep(base, protocol, parse_rates(rates), _csv(fuser) or ["medmix"], out,
                        modality, strength, covariate, keep_last, overwrite=overwrite,
                        resume=resume)
        if is_main():
            typer.echo((out / "sweep.md").read_text())
            typer.echo(f"{len(rows)} rows; tables and plots in {out}")
    except (MedmixError, OSError) as exc:
        _fail(exc)


def parse_rates(value: str) -> list[float]:
    """``--rates 0.1,0.5``: missing rates in [0, 1]."""
    out = []
    for item in _csv(value) or []:
        try:
            r = float(item)
        except ValueError:
            raise MedmixError(f"--rates {value!r}: {item!r} is not a number; expected "
                              f"comma-separated rates in [0, 1], e.g. 0.1,0.3,0.5.") from None
        if not 0.0 <= r <= 1.0:
            raise MedmixError(f"--rates {value!r}: {r} is outside [0, 1].")
        out.append(r)
    if not out:
        raise MedmixError("--rates is empty; expected comma-separated rates, e.g. 0.1,0.5.")
    return out


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run or sweep folder."),
    subgroups: bool = typer.Option(True, "--subgroups/--no-subgroups", help="Metrics with bootstrap CIs per sample attribute and missingness pattern."),
    recalibrate: str | None = typer.Option(None, help="temperature, platt or isotonic: fit on validation, report before/after, save calibration.json (used by predict); none removes it."),
    thresholds: str | None = typer.Option(None, help="Decision thresholds for sensitivity/specificity/PPV/NPV, e.g. 0.1,0.2 (default 0.1,0.2,0.3,0.5)."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap resamples per subgroup (default: the run's --bootstrap)."),
    model_card: bool = typer.Option(True, "--model-card/--no-model-card", help="Write model_card.md (TRIPOD+AI items from the run's files)."),
) -> None:
    """Render a run or sweep folder into report.md: metrics with CIs, calibration, decision
    curves, subgroups, fusion weights, and a model card."""
    try:
        from medmix_core.report import render_report

        typer.echo(f"Wrote {render_report(path, subgroups=subgroups, recalibrate=recalibrate, thresholds=thresholds, n_boot=bootstrap, model_card=model_card)}")
    except (MedmixError, OSError) as exc:
        _fail(exc)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A results folder written by `medmix run`."),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    out: Path | None = typer.Option(None, help="File to write (default RUN_DIR/export/model.onnx or model.pt); OUT.json describes inputs and outputs."),
    seed: int | None = typer.Option(None, help="Export one seed (default: the mean over the run's seeds)."),
) -> None:
    """Export the deployed, teacher-free fuser: expert embeddings and masks in; probabilities,
    modality and router weights out."""
    try:
        from medmix_core.export import export_run

        typer.echo(f"Wrote {export_run(run_dir, format, out, seed)}")
    except (MedmixError, OSError) as exc:
        _fail(exc)


@app.command("new-plugin")
def new_plugin_cmd(
    name: str = typer.Argument(..., help="Distribution name, e.g. medmix-pca; the registered expert/fuser name drops the medmix- prefix."),
    dest: Path = typer.Option(Path("."), help="Parent folder: the skeleton is written to DEST/NAME (never over a non-empty folder)."),
    kind: str = typer.Option("both", help="What the skeleton registers: expert, fuser or both."),
) -> None:
    """Write a working plugin skeleton: pyproject with the entry point, hooks, a minimal expert and/or fuser, tests."""
    try:
        from medmix_core.scaffold import new_plugin

        root = new_plugin(name, dest, kind)
        typer.echo(f"Wrote {root}. Next: cd {root} && PYTHONPATH=. pytest, then pip install -e .")
    except MedmixError as exc:
        _fail(exc)


@app.command()
def profile(
    fuser: str = typer.Option("medmix", help="Fuser(s) to profile, comma-separated."),
    experts: str | None = typer.Option(None, help="Comma-separated experts (default: all in the store)."),
    store: str | None = typer.Option(None, help="Embedding store folder."),
    dataset: str | None = typer.Option(None, help="Dataset plugin (default physionet2012, bundled)."),
    source: str | None = typer.Option(None, help="Raw data path for the dataset."),
    teacher: str | None = typer.Option(None, help="Teacher (default: the store's first, if any)."),
    distill: bool | None = typer.Option(None, "--distill/--no-distill", help="Profile the training step with distillation."),
    device: str = typer.Option("auto", help="auto (default) | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(256, help="Rows per batch."),
    repeats: int = typer.Option(20, help="Timed batches (median and p90 reported)."),
    warmup: int = typer.Option(5, help="Untimed batches first."),
    include_experts: bool = typer.Option(False, "--include-experts", help="Count the upstream expert encoders that stay deployed (weight-free ones count 0)."),
    runs: list[Path] | None = typer.Option(None, help="Results folders of `medmix run` (repeatable): builds the efficiency table (Perf, Cost, EffScore) and its Pareto plot."),
    reference: str = typer.Option("medmix", help="Reference method of the efficiency table."),
    d: int | None = typer.Option(None, help="Shared width d."),
    fuser_options: str | None = typer.Option(None, help="Fuser options as JSON (for a single fuser)."),
    threads: int = typer.Option(1, help="CPU threads."),
    out: Path = typer.Option(Path("profile"), help="Folder for profile.json/.md (and efficiency.*)."),
) -> None:
    """Parameters, MACs (fvcore: one per multiply-add), peak memory, latency and throughput
    of fusers; with --runs, the paper's efficiency table."""
    try:
        import torch

        from medmix_core.efficiency import efficiency_table, write_efficiency
        from medmix_core.plugins import get_any_encoder
        from medmix_core.profile import (
            prepare_tensors,
            profile_fuser,
            profile_markdown,
            write_profile,
        )

        torch.set_num_threads(threads)
        cfg = build_config(None, dict(
            store=store, dataset=dataset, source=source, experts=_csv(experts), teacher=teacher,
            distill=distill, d=d, fuser_options=parse_json_option(fuser_options,
                                                                   "--fuser-options"),
            device=device))
        tensors = prepare_tensors(cfg)
        encs = None
        teacher_enc = None
        if include_experts:
            names = sorted({n for v in tensors.experts.values() for n in v})
            encs = [get_any_encoder(n)() for n in names]
            if tensors.teacher_name:
                teacher_enc = get_any_encoder(tensors.teacher_name)()
        # a run's own fuser options (e.g. the expert chosen on validation) are what we profile
        run_opts: dict[str, dict] = {}
        from medmix_core.runs import open_run

        for r in runs or []:
            seeds = open_run(r).finished_seeds()  # an incomplete run is refused
            meta = json.loads((seeds[0] / "model.json").read_text())
            opts = {k: v for k, v in meta["fuser_options"].items() if k not in ("d", "dropout")}
            run_opts[meta["fuser"]] = opts
        results = []
        names = _csv(fuser) or ["medmix"]
        for f in names:
            typer.echo(f"profiling {f} ...")
            opts = run_opts.get(f, cfg.fuser_options if len(names) == 1 else {})
            fcfg = cfg.model_copy(update={"fuser": f, "fuser_options": opts})
            results.append(profile_fuser(f, tensors, fcfg, device=device,
                                         batch_size=batch_size, include_experts=encs,
                                         repeats=repeats, warmup=warmup,
                                         teacher_encoder=teacher_enc))
        write_profile(results, out)
        typer.echo(profile_markdown(results))
        if runs:
            rows = efficiency_table(list(runs), {r["fuser"]: r for r in results}, reference)
            write_efficiency(rows, out, reference)
            typer.echo((out / "efficiency.md").read_text())
        typer.echo(f"Wrote {out}")
    except (MedmixError, OSError) as exc:
        _fail(exc)


def _reproduce_app() -> None:
    from medmix_core.reproduce import typer_command

    app.command("reproduce")(typer_command())


_reproduce_app()


def _register_plugin_commands() -> None:
    try:
        from medmix_core.plugins import get_plugin_manager

        get_plugin_manager().hook.register_commands(app=app)
    except Exception as exc:  # a broken plugin must not break the CLI
        typer.secho(f"Warning: a plugin's register_commands failed: {exc}", err=True)


def is_main() -> bool:
    """True in a single process and on rank 0 of a torchrun command (which prints)."""
    from medmix_core import distributed

    return not distributed.launched() or distributed.context().is_main


def relaunch(nproc: int | None) -> None:
    """``--nproc N``: run this same command in N processes through
    ``torch.distributed.run`` (standalone rendezvous on this node) and exit with its code."""
    from medmix_core import distributed

    if nproc is None or distributed.launched():
        return
    if nproc < 1:
        _fail(MedmixError(f"--nproc {nproc}: expected a number of processes >= 1."))
    if nproc == 1:
        return
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    # "--": options of the command (e.g. --d) are not torchrun's, even as prefixes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", "medmix_core.cli", "--", *args]
    raise typer.Exit(subprocess.call(cmd))


def _on_sigterm(signum, frame) -> None:
    # pre-emption: stop like Ctrl-C, so the folder is marked interrupted and unlocked
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    _register_plugin_commands()
    try:
        app()
    finally:
        if "medmix_core.distributed" in sys.modules:  # only a command that used it
            sys.modules["medmix_core.distributed"].shutdown()


if __name__ == "__main__":
    main()
