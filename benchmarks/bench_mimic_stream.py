"""Streaming throughput and peak memory of the MIMIC-IV cohort build on a scaled fixture.

Writes the test fixture of ``tests/mimic_fixtures.py`` (MIMIC-IV 3.1 layout, gzipped) with
``--rows`` extra ``chartevents`` rows of an itemid outside the 46 variables (the bulk of a
real chartevents is such rows), builds the ``mimic4mm`` cohort once from the raw tables and
once from the cache, and reports rows per second, the extrapolated time for MIMIC-IV's
~300 M chartevents rows, and the peak resident memory of the build (peak RSS minus the RSS
before it; with ``--heap`` also the peak Python heap, in a second build under tracemalloc,
which slows Python allocation several-fold and so is not timed).

Usage:
    python benchmarks/bench_mimic_stream.py [--rows 5000000] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import add_common_args, setup, write_json  # noqa: E402
from medmix_datasets.mimic4mm import Mimic4MM  # noqa: E402
from mimic_fixtures import write_mimic4  # noqa: E402

CHARTEVENTS_ROWS = 300_000_000  # icu/chartevents of MIMIC-IV 2.x/3.x: about 300 M rows


def _rss() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5_000_000, help="extra chartevents rows")
    p.add_argument("--filler", type=int, default=2000, help="fixture stays")
    p.add_argument("--keep", type=Path, default=None, help="write the fixture here (kept)")
    p.add_argument("--heap", action="store_true", help="also trace the Python heap (slow)")
    add_common_args(p)
    args = p.parse_args()
    info = setup(args, "mimic4mm: streaming chartevents")
    root = args.keep or Path(tempfile.mkdtemp(prefix="mimic-bench-"))
    t0 = time.perf_counter()
    src = write_mimic4(root, "3.1", n_filler=args.filler, extra_chart_rows=args.rows)
    chart = src["mimic_iv"] / "icu" / "chartevents.csv.gz"
    print(f"fixture: {args.filler} filler stays, {chart.stat().st_size / 1e6:.0f} MB gzipped "
          f"chartevents, written in {time.perf_counter() - t0:.0f} s")
    opts = dict(cxr=str(src["cxr"]), note=str(src["note"]), cache_dir=str(root / "cache"),
                progress=False)
    warnings.simplefilter("ignore")
    rss_before = _rss()
    t0 = time.perf_counter()
    ds = Mimic4MM(str(src["mimic_iv"]), **opts)
    samples = ds.samples()
    build_s = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    heap_peak = None
    if args.heap:
        tracemalloc.start()
        Mimic4MM(str(src["mimic_iv"]), **{**opts, "cache": False}).samples()
        heap_peak = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    rep = ds.report()
    rows = rep["tables"]["icu/chartevents"]["rows"]
    chart_s = rep["tables"]["icu/chartevents"]["seconds"]
    t0 = time.perf_counter()
    again = Mimic4MM(str(src["mimic_iv"]), **opts)
    again.samples()
    cached_s = time.perf_counter() - t0
    assert again.report()["cache"]["hit"]
    res = {
        "machine": info, "stays": len(samples), "chartevents_rows": rows,
        "chartevents_gz_mb": round(chart.stat().st_size / 1e6, 1),
        "chartevents_seconds": round(chart_s, 2),
        "rows_per_second": round(rows / chart_s),
        "extrapolated_minutes_300M": round(CHARTEVENTS_ROWS / (rows / chart_s) / 60, 1),
        "build_seconds": round(build_s, 2), "cached_seconds": round(cached_s, 2),
        "rss_before_mb": round(rss_before / 2**20, 1), "peak_rss_mb": round(rss_peak / 2**20, 1),
        "build_peak_rss_mb": round((rss_peak - rss_before) / 2**20, 1),
        "peak_python_heap_mb": heap_peak,
    }
    for k, v in res.items():
        if k != "machine":
            print(f"{k:>28}: {v}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
