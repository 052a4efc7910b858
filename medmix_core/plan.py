"""The default committee: the largest one whose extraction fits a time budget on this device.

``medmix run`` with no ``--experts`` and no ``--store`` asks the dataset for its committee
(:attr:`Dataset.committee`, cheapest first, and :attr:`Dataset.committee_teacher`) and for
what each member costs to extract on the bundled data (:attr:`Dataset.extract_seconds`,
measured on a reference machine: 2 CPU cores for ``"cpu"``, one GPU for ``"cuda"``). It
takes members in order while the first run, extraction included, stays within
:data:`FIRST_RUN_BUDGET_S`; experts already in the store cost nothing. Members whose weights
are absent are left out with the reason. The printed plan names what was used, what was
left out and the flags that add it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from medmix_core.errors import WeightsNotFoundError

#: seconds a first ``medmix run`` may take, extraction and training together
FIRST_RUN_BUDGET_S = {"cpu": 600.0, "cuda": 600.0}
#: cores of the machine the ``"cpu"`` costs were measured on
REFERENCE_CORES = 2


@dataclass
class Plan:
    """What a default run extracts and trains with.

    Attributes:
        experts: expert names, in committee order.
        teacher: the teacher name, or None.
        left_out: (name, why) for each member not used.
        extract_s: estimated seconds of extraction still to do.
        device: ``"cpu"`` or ``"cuda"``.
    """

    experts: list[str]
    teacher: str | None
    left_out: list[tuple[str, str]] = field(default_factory=list)
    extract_s: float = 0.0
    device: str = "cpu"
    full: list[str] = field(default_factory=list)
    full_teacher: str | None = None

    def describe(self) -> str:
        """A few lines for the console: used, left out, and the command for the rest."""
        used = ", ".join(self.experts) + (f" + teacher {self.teacher} (distillation on)"
                                          if self.teacher else "")
        cost = (f"; about {_minutes(self.extract_s)} to extract once, then cached"
                if self.extract_s > 0 else "; already extracted")
        lines = [f"Default committee on {self.device}: {used}{cost}."]
        if self.left_out:
            lines.append("Left out: " + "; ".join(f"{n} ({why})" for n, why in self.left_out)
                         + ".")
            flag = f"--experts {','.join(self.full)}"
            if self.full_teacher:
                flag += f" --teacher {self.full_teacher}"
            lines.append(f"Add them with: medmix run {flag}")
        return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds / 60))} min"


def device_kind(device: str) -> str:
    """``"cuda"`` when ``device`` (``auto``/``cpu``/``cuda``/``cuda:N``) resolves to a GPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


def plan_committee(ds_cls: Any, have: set[str], have_teachers: set[str], device: str,
                   encoder_factory, cores: int | None = None,
                   budget_s: float | None = None) -> Plan:
    """Choose the default committee of a dataset for this device.

    Args:
        ds_cls: the dataset class (its ``committee``, ``committee_teacher``,
            ``default_experts``, ``extract_seconds`` and ``train_seconds``).
        have: experts the store already holds (free).
        have_teachers: teachers the store already holds.
        device: ``"cpu"`` or ``"cuda"`` (see :func:`device_kind`).
        encoder_factory: name -> encoder class (to check weights without loading them).
        cores: CPU cores (default ``os.cpu_count()``); CPU costs scale by
            ``REFERENCE_CORES / min(cores, 8)``.
        budget_s: seconds for the first run (default :data:`FIRST_RUN_BUDGET_S`).
    Returns:
        the :class:`Plan`.
    """
    base = list(getattr(ds_cls, "default_experts", ()) or ())
    committee = list(getattr(ds_cls, "committee", ()) or ()) or base
    teacher = getattr(ds_cls, "committee_teacher", None)
    costs = (getattr(ds_cls, "extract_seconds", {}) or {}).get(device, {})
    train_s = float((getattr(ds_cls, "train_seconds", {}) or {}).get(device, 0.0))
    scale = 1.0
    if device == "cpu":
        scale = REFERENCE_CORES / max(1, min(cores or os.cpu_count() or 1, 8))
    budget = (FIRST_RUN_BUDGET_S[device] if budget_s is None else budget_s) - train_s

    chosen: list[str] = []
    left: list[tuple[str, str]] = []
    spent = 0.0

    def weights_missing(name: str) -> str | None:
        try:
            encoder_factory(name)().check_weights()
        except WeightsNotFoundError as exc:
            return f"weights absent: {str(exc).split('. ')[0]}"
        return None

    for name in committee + [n for n in base if n not in committee]:
        if name in have:
            chosen.append(name)
            continue
        cost = costs.get(name)
        est = math.inf if cost is None else cost * scale
        if name not in base and spent + est > budget:
            more = "cost unknown here" if cost is None else f"about {_minutes(est)} more"
            left.append((name, more))
            continue
        missing = weights_missing(name)
        if missing:
            left.append((name, missing))
            continue
        chosen.append(name)
        spent += 0.0 if cost is None else est
    chosen += sorted(have - set(chosen))  # anything else already paid for

    picked_teacher = None
    if teacher:
        cost = costs.get(teacher)
        est = 0.0 if teacher in have_teachers else (math.inf if cost is None else cost * scale)
        if spent + est > budget:
            more = "cost unknown here" if cost is None else f"about {_minutes(est)} more"
            left.append((f"teacher {teacher}", more))
        else:
            missing = None if teacher in have_teachers else weights_missing(teacher)
            if missing:
                left.append((f"teacher {teacher}", missing))
            else:
                picked_teacher = teacher
                spent += est
    full = list(dict.fromkeys(committee + base + chosen))
    return Plan(experts=chosen, teacher=picked_teacher, left_out=left, extract_s=spent,
                device=device, full=full, full_teacher=teacher)
