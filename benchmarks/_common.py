"""Helpers shared by the benchmark scripts: machine description, threads, JSON output."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from medmix_core.profile import machine_info
from medmix_core.store import atomic_write_text

BUNDLED_STORE = "stores/physionet2012"
CREATE_BUNDLED = ("medmix extract --dataset physionet2012 --experts stats,grid "
                  "--out stores/physionet2012")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def setup(args: argparse.Namespace, title: str) -> dict[str, Any]:
    """Apply --threads, print and return the machine description."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a file
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    info["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load = info.get("loadavg", [0.0])[0]
    cores = info["usable_cores"] or 1
    info["under_load"] = load > 0.5 * cores
    print(f"== {title}")
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores ({info['usable_cores']} "
          f"usable), torch {info['torch']} with {info['torch_threads']} threads, "
          f"device cpu; load average {info.get('loadavg')}")
    if info["under_load"]:
        print(f"note: load average {load} on {cores} cores: other processes share this "
              f"machine, so these figures were taken under load.")
    return info


def store_or_hint(path: str | os.PathLike) -> Path | None:
    """The store folder if it holds a store, else None after printing how to create it."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    print(f"no store at {p}. Create the bundled one with `{CREATE_BUNDLED}` "
          f"(from the repository root), or pass another store path.")
    return None


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        atomic_write_text(path, json.dumps(data, indent=1, default=str))
        print(f"wrote {path}")
