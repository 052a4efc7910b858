"""What a measurement was taken on: CPU model, cores, torch threads, device, load."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, with family/model and the widest SIMD flag
    (virtual machines often report a bare "AMD EPYC"); else what platform reports."""
    info = _cpuinfo()
    name = info.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    extra = []
    if "cpu family" in info and "model" in info:
        extra.append(f"family {info['cpu family']} model {info['model']}")
    flags = set(info.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    if simd:
        extra.append(simd)
    return f"{name} ({', '.join(extra)})" if extra else name


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, torch threads, device, load.

    Args:
        device: the device measured (None: CPU only).
    Returns:
        a JSON-ready dict.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(dev),
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info



def busy_cpu_note(info: dict[str, Any]) -> str | None:
    """A warning when CPU timings are suspect: the load average exceeds the usable cores
    while torch runs several threads; None otherwise.

    Args:
        info: from :func:`machine_info`.
    """
    load = (info.get("loadavg") or [0.0])[0]
    if (not str(info.get("device", "cpu")).startswith("cpu") or info["torch_threads"] <= 1
            or load <= (info["usable_cores"] or 1)):
        return None
    return (f"Load average {load} on {info['usable_cores']} cores with "
            f"{info['torch_threads']} torch threads: parallel ops wait for their sibling "
            f"threads to be scheduled, which can slow timings many-fold; profile with one "
            f"thread (torch.set_num_threads(1)) on a busy machine.")
