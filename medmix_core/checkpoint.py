"""Training checkpoints: everything a seed needs to continue as if it had never stopped.

A checkpoint is one file written atomically (temp file, fsync, rename) at the end of an
epoch: model, optimizer, grad scaler, LR schedule, the RNG states training draws from
(torch's global CPU and CUDA generators, the seed's own ``torch.Generator``, Python's and
numpy's), early-stopping state, epoch and history. Loading one and training on gives
bitwise the same weights on the CPU as never having stopped.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmix_core.errors import MedmixError
from medmix_core.store import atomic_write_bytes

FORMAT = "medmix-checkpoint"
VERSION = 1


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every RNG training draws from (``gen``: the seed's own generator)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        state["gen"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a kill at any moment leaves the previous
    checkpoint or this one, never a half-written file."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved at ``path``.

    Raises:
        MedmixError: the file is not a medmix checkpoint or cannot be read.
    """
    path = Path(path)
    try:
        # weights_only=False: RNG states hold Python tuples; the file is our own
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise MedmixError(f"{path} cannot be read as a training checkpoint ({exc}). Delete it "
                          f"to train that seed from its start.") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MedmixError(f"{path} is not a medmix training checkpoint. Delete it to train "
                          f"that seed from its start.")
    if state.get("version") != VERSION:
        raise MedmixError(f"{path} is a checkpoint of format version {state.get('version')}; "
                          f"this medmix reads version {VERSION}. Delete it to train that seed "
                          f"from its start.")
    return state
