"""Extraction throughput per expert, in stays (samples) per second.

For every registered expert that accepts a modality of the dataset (or those named with
--experts):
  * encoder: fit on the training split's present payloads, then encode every present
    payload of every accepted modality in the expert's batch size (the dataset is loaded
    once beforehand and not timed here);
  * extract: medmix_core.extract.extract() of that expert alone into a fresh store (dataset
    loading, validation, sharded writes and the manifest included).
Experts whose package, plugin or weights are absent are reported as skipped, with the reason.

Usage:
    python benchmarks/bench_extract.py [--dataset physionet2012] [--experts stats,grid]
        [--limit 400] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, write_json

from medmix_core.errors import MedmixError
from medmix_core.plugins import get_dataset, get_expert, load_errors, registry


def time_encoder(name: str, cls, mods, samples, train_rows) -> dict:
    """Fit + encode timings of one expert over every modality it accepts.

    ``samples`` may be the first --limit stays; stays/s is per stay timed.
    """
    enc = cls()
    accepted = [m for m in mods if enc.accepts(m)]
    fit_s = enc_s = 0.0
    payloads_n = 0
    per_mod = {}
    for m in accepted:
        payload = [s.modalities.get(m.name) for s in samples]
        present = [i for i, x in enumerate(payload) if x is not None]
        train = [payload[i] for i in present if i in train_rows]
        t0 = time.perf_counter()
        enc.fit(m, train)
        t1 = time.perf_counter()
        bs = max(1, int(getattr(enc, "batch_size", 256) or 256))
        for start in range(0, len(present), bs):
            x = enc.encode(m, [payload[i] for i in present[start:start + bs]])
            np.asarray(x)
        t2 = time.perf_counter()
        fit_s += t1 - t0
        enc_s += t2 - t1
        payloads_n += len(present)
        per_mod[m.name] = {"dim": int(enc.dim(m)), "payloads": len(present),
                           "fit_s": t1 - t0, "encode_s": t2 - t1}
    total = fit_s + enc_s
    return {"modalities": per_mod, "fit_s": fit_s, "encode_s": enc_s, "payloads": payloads_n,
            "encoder_stays_per_s": len(samples) / total if total > 0 else float("inf"),
            "n_parameters": int(enc.n_parameters())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="physionet2012")
    p.add_argument("--experts", default=None,
                   help="comma-separated experts (default: every registered expert that "
                        "accepts a modality of the dataset)")
    p.add_argument("--no-extract", action="store_true",
                   help="time the encoders only, not the full extract()")
    p.add_argument("--limit", type=int, default=0,
                   help="time each encoder on the first N stays only (0 = all); fit then "
                        "sees only their training rows, so an expert whose fit grows with "
                        "the training set (a retrieval index) looks faster than extract()")
    p.add_argument("--extract-budget", type=float, default=300.0,
                   help="skip extract() of an expert whose encoder timing predicts more "
                        "than this many seconds for the whole dataset")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, f"bench_extract: expert throughput on {args.dataset}")

    ds_cls = get_dataset(args.dataset)
    t0 = time.perf_counter()
    ds = ds_cls()
    samples = ds.samples()
    mods = ds.modalities()
    splits = ds.splits(samples)
    load_s = time.perf_counter() - t0
    n = len(samples)
    print(f"dataset {args.dataset}: {n} stays, modalities "
          f"{[f'{m.name}({m.kind})' for m in mods]}; loaded in {load_s:.2f}s")
    train_rows = {int(i) for i in splits["train"]}
    timed = samples[:args.limit] if args.limit > 0 else samples

    results = {"machine": info, "dataset": args.dataset, "n_stays": n,
               "encoder_stays_timed": len(timed), "dataset_load_s": load_s, "experts": {},
               "skipped": {}}
    if args.experts:
        names = [e.strip() for e in args.experts.split(",") if e.strip()]
    else:
        names = registry().names("experts")
    kinds = {m.kind for m in mods}
    for name in names:
        try:
            cls = get_expert(name)
        except MedmixError as exc:
            results["skipped"][name] = str(exc)
            continue
        if not kinds & set(getattr(cls, "kinds", ())):
            if args.experts:  # asked for by name: say why it is not timed
                results["skipped"][name] = (f"accepts {list(getattr(cls, 'kinds', ()))}, no "
                                            f"modality of {args.dataset} ({sorted(kinds)})")
            continue
        print(f"{name:>12}: timing the encoder on {len(timed)} stays ...")
        try:
            rec = time_encoder(name, cls, mods, timed, train_rows)
        except (MedmixError, ImportError, OSError) as exc:
            results["skipped"][name] = f"{type(exc).__name__}: {exc}"
            continue
        if not rec["modalities"]:
            results["skipped"][name] = f"accepts no modality of {args.dataset}"
            continue
        predicted = n / rec["encoder_stays_per_s"] + load_s
        if not args.no_extract and predicted > args.extract_budget:
            rec["extract_skipped"] = (f"predicted {predicted:.0f}s for {n} stays > "
                                      f"--extract-budget {args.extract_budget:.0f}s")
        elif not args.no_extract:
            from medmix_core.extract import extract

            with tempfile.TemporaryDirectory(prefix="medmix-extract-") as tmp:
                t0 = time.perf_counter()
                extract(args.dataset, Path(tmp) / "store", [name], progress=False)
                rec["extract_s"] = time.perf_counter() - t0
            rec["extract_stays_per_s"] = n / rec["extract_s"]
        results["experts"][name] = rec
        dims = ", ".join(f"{m} {v['dim']}" for m, v in rec["modalities"].items())
        line = (f"{name:>12}: encoder {rec['encoder_stays_per_s']:,.0f} stays/s (fit "
                f"{rec['fit_s']:.2f}s, encode {rec['encode_s']:.2f}s, {rec['payloads']} "
                f"payloads; dims {dims})")
        if "extract_s" in rec:
            line += (f"; extract() {rec['extract_stays_per_s']:,.0f} stays/s "
                     f"({rec['extract_s']:.1f}s end to end)")
        elif "extract_skipped" in rec:
            line += f"; extract() not run: {rec['extract_skipped']}"
        print(line)
    for plugin, err in sorted(load_errors().items()):
        results["skipped"][f"plugin:{plugin}"] = f"plugin failed to load: {err}"
    for name, why in results["skipped"].items():
        print(f"{name:>12}: skipped - {why.splitlines()[0]}")  # full reason in the JSON
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
