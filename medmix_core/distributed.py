"""Several processes of one command, through PyTorch's own engine (``torchrun``).

``torchrun --nproc-per-node N --no-python medmix <command> ...`` starts N copies of a
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in the
environment. :func:`context` reads them once, initialises ``torch.distributed`` (gloo on
the CPU, NCCL for CUDA) and returns a :class:`Dist`; without torchrun it is a world of one
whose collectives do nothing, so every command runs unchanged in one process.

Rules every distributed command follows: rank 0 alone writes shared files (manifest,
tables, ``run.json``); a rank writes only the files of its own share of the work (its
shards, its seeds); every rank reaches the same barriers in the same order.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from medmix_core.errors import MedmixError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place among the processes of one command.

    Attributes:
        rank: 0 .. world - 1; rank 0 writes shared files.
        world: the number of processes (1 without torchrun).
        local_rank: the rank on this node (which GPU it takes).
        backend: "gloo", "nccl", or None for a world of one.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there are other processes to talk to."""
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of ``items``: every world-th one from its rank, so consecutive
        items (shards, seeds) spread evenly."""
        return list(items[self.rank::self.world])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when every rank passes ``ok``: a rank that failed makes the
        others stop at the same point instead of waiting at a barrier for ever."""
        return all(self.gather(bool(ok)))

    def device(self, name: str | None) -> str | None:
        """The device of this rank: ``cuda`` becomes ``cuda:<local_rank>`` (one GPU per
        process); anything else is kept."""
        if self.active and name in ("auto", "cuda", None) and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise MedmixError(f"Process {self.local_rank} of this node would take GPU "
                                  f"cuda:{self.local_rank}, but the node has "
                                  f"{torch.cuda.device_count()}. Start at most one process "
                                  f"per GPU (--nproc-per-node), or pass --device cpu.")
            return f"cuda:{self.local_rank}"
        return name


_CURRENT: Dist | None = None


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher that sets the
    same environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def context() -> Dist:
    """This process's :class:`Dist`; the process group is initialised on the first call."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if not launched():
        _CURRENT = Dist()
        return _CURRENT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    # one rule for every rank (a rank-dependent test would split the group): NCCL when
    # this node has a GPU for each of its processes
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = os.environ.get("MEDMIX_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n_local
        else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        try:
            tdist.init_process_group(backend, timeout=dt.timedelta(
                seconds=float(os.environ.get("MEDMIX_DIST_TIMEOUT", "1800"))))
        except (RuntimeError, ValueError) as exc:
            raise MedmixError(f"Cannot join the {world} processes of this command (rank "
                              f"{rank}, backend {backend}): {exc}. Start it with `torchrun "
                              f"--nproc-per-node N --no-python medmix ...`.") from exc
    _CURRENT = Dist(rank, world, local, backend)
    return _CURRENT


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    global _CURRENT
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _CURRENT = None
