"""OpenI comparison: MedMIX, the baseline fusers and the committee's variants, 5 seeds each.

Extracts the OpenI store once (the ``--experts`` on the reports' notes, and the
``--teacher`` on the training notes; no image pixels unless the source holds them, so the
frontal and lateral views are then missing for every report), then trains, for
``--seeds`` seeds each:

- ``--set fusers``: every ``--fusers`` entry on the whole committee;
- ``--set committee``: MedMIX with each expert alone, with uniform expert weights
  (``medmix-uniform``), without each expert family present in the store (``general``,
  ``domain``, ``rag``) and without distillation (when a teacher is given); the full
  committee's row is the ``medmix`` run of the fusers set when both sets run.

Writes a JSON file and a Markdown page (test mean ± std of macro AUROC, AUPRC, macro-F1
and accuracy over the 15 findings, validation AUROC, and wall times) to ``--results``.

Usage:
    python benchmarks/bench_openi.py --source /path/to/torchxrayvision-*.whl
        [--experts tfidf,minilm,rag] [--teacher mpnet] [--fusers medmix,meanavg,...]
        [--set fusers,committee] [--seeds 5] [--threads 1]
        [--store /tmp/stores/openi-text] [--runs /tmp/runs/openi-text]
        [--results docs/assets/results]
    python benchmarks/bench_openi.py --download /tmp/txrv ...   # fetch the wheel, then run
    python benchmarks/bench_openi.py --reuse ...                # tables from finished runs

Each run is also one ``medmix run`` command (printed in the JSON as ``command``), e.g.
``medmix run --store STORE --fuser medmix --experts minilm --teacher mpnet --seeds 5
--threads 1 --device cpu --out RUNS/medmix-minilm``. The data are CC BY-NC-ND 4.0: keep
the store and run folders outside the repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, write_json

from medmix_core.config import RunConfig, make_config
from medmix_core.errors import MedmixError
from medmix_core.extract import extract
from medmix_core.runner import run
from medmix_core.store import EmbeddingStore, atomic_write_text

FUSERS = "medmix,meanavg,concat,max,attention,m3care"
METRICS = ("auroc", "auprc", "macro_f1", "accuracy")
SETS = ("fusers", "committee")
FAMILY_ORDER = ("general", "domain", "rag")


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps torchxrayvision`` into ``folder`` (never installs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "torchxrayvision",
                    "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("torchxrayvision-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no torchxrayvision wheel in {folder}.")
    return wheels[-1]


def committee_variants(families: dict[str, list[str]], teacher: str | None
                       ) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, run folder name, RunConfig values) of the committee's variants.

    Args:
        families: family -> the store's experts of that family, in store order.
        teacher: the teacher of the full committee (None: no distillation variant).
    """
    experts = [e for fam in families.values() for e in fam]
    out = [(f"{e} alone", f"medmix-{e}", {"experts": [e]}) for e in experts]
    out.append(("uniform expert weights (medmix-uniform)", "medmix-uniform",
                {"fuser": "medmix-uniform"}))
    for fam in FAMILY_ORDER:
        if fam in families and len(families) > 1:
            out.append((f"without {fam} ({', '.join(families[fam])})", f"medmix-no-{fam}",
                        {"drop_experts": [fam]}))
    if teacher:
        out.append(("without distillation", "medmix-no-distill", {"distill": False}))
    return out


def command(store: Path, out: Path, seeds: int, threads: int, values: dict[str, Any]) -> str:
    """The ``medmix run`` command line equivalent to one benchmark run."""
    parts = ["medmix run", f"--store {store}", f"--fuser {values.get('fuser', 'medmix')}"]
    if values.get("experts"):
        parts.append(f"--experts {','.join(values['experts'])}")
    if values.get("drop_experts"):
        parts.append(f"--drop-experts {','.join(values['drop_experts'])}")
    if values.get("teacher"):
        parts.append(f"--teacher {values['teacher']}")
    if values.get("distill") is False:
        parts.append("--no-distill")
    parts += [f"--seeds {seeds}", f"--threads {threads}", "--device cpu", f"--out {out}",
              "--overwrite"]
    return " ".join(parts)


def summary(metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the tables need from one run's metrics.json."""
    val = [s["val"]["auroc"] for s in metrics["seed_info"]
           if s.get("val") and s["val"].get("auroc") is not None]
    return {"test": {m: metrics["test"][m] for m in METRICS},
            "val_auroc": {"mean": statistics.fmean(val),
                          "std": statistics.stdev(val) if len(val) > 1 else 0.0},
            "seconds": seconds, "n_test": metrics["n_test"],
            "modalities": metrics["modalities"], "experts": metrics["experts"],
            "teacher": metrics.get("teacher"), "distill": metrics.get("distill"),
            "per_seed_auroc": [s["auroc"] for s in metrics["per_seed"]],
            "test_ci95_auroc": (metrics.get("test_ci95") or {}).get("auroc")}


def finished(out: Path, cfg: RunConfig, experts: list[str]) -> dict[str, Any] | None:
    """The metrics of a finished run in ``out`` made with the same settings, else None."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text("utf-8"))
    same = (metrics.get("fuser") == cfg.fuser and sorted(metrics.get("experts", [])) == experts
            and metrics.get("teacher") == (cfg.teacher if cfg.distill_on else None)
            and bool(metrics.get("distill")) == cfg.distill_on
            and metrics.get("seeds") == list(cfg.seeds))
    return metrics if same else None


def train(store: Path, out: Path, values: dict[str, Any], experts: list[str],
          args: argparse.Namespace) -> dict[str, Any]:
    """One run (with --reuse, its finished folder when it matches) -> summary and command.

    A fuser without modality representations cannot be distilled; it runs without the
    teacher, and its row says so (``distill`` false).
    """
    values = {"fuser": "medmix", "teacher": args.teacher, **values}
    cfg = make_config(store=str(store), seeds=args.seeds, device="cpu",
                      threads=args.threads or 1, out=str(out), progress=False, **values)
    metrics = finished(out, cfg, experts) if args.reuse else None
    if metrics is None:
        try:
            metrics = run(cfg, log=lambda msg: print("  " + msg), overwrite=True)
        except MedmixError as exc:
            if not (cfg.distill_on and "exposes no modality representations" in str(exc)):
                raise
            print(f"  {cfg.fuser}: {exc} Training it without distillation.")
            values["distill"] = False
            cfg = cfg.model_copy(update={"distill": False})
            metrics = run(cfg, log=lambda msg: print("  " + msg), overwrite=True)
    seconds = sum(s["seconds"] for s in metrics["seed_info"])
    cmd = command(store, out, args.seeds, args.threads or 1, values)
    row = {**summary(metrics, seconds), "fuser": values["fuser"], "command": cmd}
    print(f"{out.name}: test AUROC {row['test']['auroc']['mean']:.4f} "
          f"± {row['test']['auroc']['std']:.4f}, val {row['val_auroc']['mean']:.4f} "
          f"({seconds:.0f} s)")
    return row


def _cells(r: dict[str, Any]) -> str:
    return " | ".join(f"{r['test'][m]['mean']:.4f} ± {r['test'][m]['std']:.4f}" for m in METRICS)


def tables(result: dict[str, Any]) -> str:
    """The Markdown page of the comparison."""
    info, rows0 = result["machine"], (result["fusers"] or result["committee"])
    first = rows0[0]
    seconds = f"training seconds summed over the {result['seeds']} seeds"
    text = (f"OpenI, task `findings` (15 labels), test split ({first['n_test']} reports "
            f"scored), "
            f"{result['seeds']} seeds, experts `{result['experts']}`, teacher "
            f"{result['teacher'] or 'none'}; modalities with embeddings: "
            f"{', '.join(first['modalities'])}. Machine: {info['cpu_model']}, "
            f"{info['usable_cores']} usable cores, {result['threads']} training thread(s)"
            f"{', under load from other work' if info.get('under_load') else ''}.\n")
    if result["fusers"]:
        text += ("\n| fuser | AUROC | AUPRC | macro-F1 | accuracy | val AUROC | time |\n"
                 "|---|---|---|---|---|---|---|\n")
        for r in result["fusers"]:
            name = r["fuser"] + (" (no distillation)" if result["teacher"] and not r["distill"]
                                 else "")
            text += (f"| {name} | {_cells(r)} | {r['val_auroc']['mean']:.4f} | "
                     f"{r['seconds']:.0f} s |\n")
    if result["committee"]:
        text += ("\nMedMIX committee variants (same store; every variant distils from the "
                 "teacher unless it says otherwise):\n\n"
                 "| variant | AUROC | AUPRC | macro-F1 | accuracy | val AUROC | time |\n"
                 "|---|---|---|---|---|---|---|\n")
        for r in result["committee"]:
            text += (f"| {r['variant']} | {_cells(r)} | {r['val_auroc']['mean']:.4f} | "
                     f"{r['seconds']:.0f} s |\n")
    return text + f"\nTimes: {seconds}.\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None,
                   help="the torchxrayvision wheel, NLMCXR_reports.tgz or a folder")
    p.add_argument("--download", type=Path, default=None,
                   help="pip-download the torchxrayvision wheel into this folder and use it")
    p.add_argument("--experts", default="tfidf,minilm,rag")
    p.add_argument("--teacher", default="mpnet", help="a teacher, or 'none'")
    p.add_argument("--fusers", default=FUSERS)
    p.add_argument("--set", default="fusers,committee",
                   help=f"comma-separated: {', '.join(SETS)}")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--store", type=Path, default=Path("/tmp/stores/openi-text"))
    p.add_argument("--runs", type=Path, default=Path("/tmp/runs/openi-text"))
    p.add_argument("--results", type=Path, default=Path("docs/assets/results"),
                   help="folder for openi.json and openi.md")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished run folders made with the same settings; train the "
                        "others")
    add_common_args(p)
    args = p.parse_args(argv)
    args.teacher = None if args.teacher in (None, "", "none") else args.teacher
    sets = [s.strip() for s in args.set.split(",") if s.strip()]
    bad = sorted(set(sets) - set(SETS))
    if bad or not sets:
        raise SystemExit(f"--set {args.set!r}: unknown {bad}; choose from {', '.join(SETS)}.")
    info = setup(args, f"bench_openi: {args.set} x {args.seeds} seeds on OpenI")
    source = str(download_wheel(args.download)) if args.download else args.source
    if source is None and not (args.store / "manifest.json").is_file():
        raise SystemExit("give --source (the torchxrayvision wheel, NLMCXR_reports.tgz or a "
                         "folder) or --download FOLDER, or an extracted --store")
    experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    t0 = time.perf_counter()
    if source is not None:  # resumable: an up-to-date store is returned untouched
        extract("openi", args.store, experts, [args.teacher] if args.teacher else [],
                source=source, device="cpu", progress=False)
    extract_s = time.perf_counter() - t0
    store = EmbeddingStore.open(args.store)
    families: dict[str, list[str]] = {}
    for entry in store.experts.get("note", []):
        if entry.name in experts:
            families.setdefault(entry.family, []).append(entry.name)

    fusers, committee = [], []
    if "fusers" in sets:
        for fuser in args.fusers.split(","):
            fusers.append(train(args.store, args.runs / fuser, {"fuser": fuser},
                                sorted(experts), args))
    if "committee" in sets:
        full = next((r for r in fusers if r["fuser"] == "medmix"), None)
        if full is None:
            full = train(args.store, args.runs / "medmix", {}, sorted(experts), args)
        committee.append({**full, "variant": f"full committee ({', '.join(experts)})"})
        for label, folder, values in committee_variants(families, args.teacher):
            used = values.get("experts") or [
                e for fam, names in families.items() for e in names
                if fam not in values.get("drop_experts", [])]
            committee.append({**train(args.store, args.runs / folder, values, sorted(used),
                                      args), "variant": label})
    result = {"machine": info, "source": source, "experts": args.experts,
              "teacher": args.teacher, "seeds": args.seeds, "threads": args.threads or 1,
              "extract_seconds": extract_s if source is not None else None,
              "wall_seconds": time.perf_counter() - t0,
              "store_provenance": {e.name: e.provenance for e in store.experts.get("note", [])},
              "seconds_are": "training time summed over seeds",
              "fusers": fusers, "committee": committee}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.json or args.results / "openi.json", result)
    atomic_write_text(args.results / "openi.md", tables(result))
    print(f"wrote {args.results / 'openi.md'}")
    return result


if __name__ == "__main__":
    main()
