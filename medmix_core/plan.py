"""The default committee: the largest one whose extraction fits a time budget on this device.

``medmix run`` with no ``--experts`` and no ``--store`` asks the dataset for its committee
(:attr:`Dataset.committee`, cheapest first, and :attr:`Dataset.committee_teacher`) and for
what each member costs to extract on the bundled data (:attr:`Dataset.extract_seconds`,
measured on a reference machine: 2 CPU cores for ``"cpu"``, one GPU for ``"cuda"``). It
takes members in order while the first run, extraction included, stays within
:data:`FIRST_RUN_BUDGET_S` (the first member that does not fit ends the committee);
experts already in the store cost nothing. Members whose weights are absent are left out
with the reason. The costs describe the bundled data, so a run on ``--source`` data or
with ``--dataset-options`` keeps the dataset's ``default_experts``. The printed plan
names what was used, what was left out and the flags that add it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from medmix_core.errors import MedmixError, WeightsNotFoundError

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
    distill: bool = True
    flags: str = ""  # flags the printed command repeats (e.g. --dataset NAME)

    def describe(self) -> str:
        """A few lines for the console: used, left out, and the command for the rest."""
        used = ", ".join(self.experts)
        if self.teacher:
            used += f" + teacher {self.teacher}" + (" (distillation on)" if self.distill
                                                    else " (distillation off)")
        cost = (f"; about {_minutes(self.extract_s)} to extract once, then cached"
                if self.extract_s > 0 else "; already extracted")
        lines = [f"Default committee on {self.device}: {used}{cost}."]
        if self.left_out:
            lines.append("Left out: " + "; ".join(f"{n} ({why})" for n, why in self.left_out)
                         + ".")
            flag = (self.flags + " " if self.flags else "") + f"--experts {','.join(self.full)}"
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


def usable_cores() -> int:
    """CPU cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_committee(ds_cls: Any, have: set[str], have_teachers: set[str], device: str,
                   encoder_factory, cores: int | None = None,
                   budget_s: float | None = None,
                   options: dict[str, dict[str, Any]] | None = None,
                   teacher: str | None | bool = True) -> Plan:
    """Choose the default committee of a dataset for this device.

    Members are taken in committee order while the estimated extraction still fits; the
    first that does not fit ends the committee (a later member may build on an earlier
    one, as ``rag`` reuses ``minilm``'s text embeddings), and it and every later member are
    left out. A member whose weights are absent is skipped with the reason.

    Args:
        ds_cls: the dataset class (its ``committee``, ``committee_teacher``,
            ``default_experts``, ``extract_seconds`` and ``train_seconds``).
        have: experts the store already holds (free).
        have_teachers: teachers the store already holds.
        device: ``"cpu"`` or ``"cuda"`` (see :func:`device_kind`).
        encoder_factory: name -> encoder class (to check weights without loading them).
        cores: CPU cores (default :func:`usable_cores`); CPU costs scale by
            ``REFERENCE_CORES / min(cores, 8)``.
        budget_s: seconds for the first run (default :data:`FIRST_RUN_BUDGET_S`).
        options: per encoder name, the constructor options the run will use.
        teacher: True: the dataset's teacher if it fits; a name: that teacher, required
            (its cost is charged first); False or None: no teacher.
    Returns:
        the :class:`Plan`.
    """
    options = options or {}
    base = list(getattr(ds_cls, "default_experts", ()) or ())
    committee = list(getattr(ds_cls, "committee", ()) or ()) or base
    ds_teacher = getattr(ds_cls, "committee_teacher", None)
    costs = (getattr(ds_cls, "extract_seconds", {}) or {}).get(device, {})
    train_s = float((getattr(ds_cls, "train_seconds", {}) or {}).get(device, 0.0))
    scale = 1.0
    if device == "cpu":
        scale = REFERENCE_CORES / max(1, min(cores or usable_cores(), 8))
    budget = (FIRST_RUN_BUDGET_S[device] if budget_s is None else budget_s) - train_s

    def estimate(name: str, held: set[str]) -> float:
        if name in held:
            return 0.0
        cost = costs.get(name)
        return math.inf if cost is None else cost * scale

    def more(est: float) -> str:
        return "cost unknown here" if math.isinf(est) else f"about {_minutes(est)} more"

    def weights_missing(name: str) -> str | None:
        try:
            encoder_factory(name)(**options.get(name, {})).check_weights()
        except WeightsNotFoundError as exc:
            return f"weights absent: {exc}"
        except MedmixError as exc:  # e.g. an option the encoder refuses
            return f"not usable: {exc}"
        return None

    chosen: list[str] = []
    left: list[tuple[str, str]] = []
    spent = 0.0
    picked_teacher = None
    if isinstance(teacher, str):  # asked for by name: always used, paid for first
        picked_teacher = teacher
        spent += 0.0 if math.isinf(estimate(teacher, have_teachers)) else estimate(
            teacher, have_teachers)
    full_stop = False
    for name in committee + [n for n in base if n not in committee]:
        est = estimate(name, have)
        if name not in base and (full_stop or spent + est > budget):
            full_stop = True
            left.append((name, more(est)))
            continue
        missing = None if name in have else weights_missing(name)
        if missing:
            left.append((name, missing))
            continue
        chosen.append(name)
        spent += 0.0 if math.isinf(est) else est
    chosen += sorted(have - set(chosen))  # anything else already paid for

    if teacher is True and ds_teacher:
        est = estimate(ds_teacher, have_teachers)
        if full_stop or spent + est > budget:
            left.append((f"teacher {ds_teacher}", more(est)))
        else:
            missing = None if ds_teacher in have_teachers else weights_missing(ds_teacher)
            if missing:
                left.append((f"teacher {ds_teacher}", missing))
            else:
                picked_teacher = ds_teacher
                spent += est
    full = list(dict.fromkeys(committee + base + chosen))
    return Plan(experts=chosen, teacher=picked_teacher, left_out=left, extract_s=spent,
                device=device, full=full,
                full_teacher=picked_teacher if isinstance(teacher, str) else ds_teacher)
