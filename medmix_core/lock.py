"""One writer per folder: a lock file naming its holder (pid, host, command, time).

Stores and run folders are written by one process at a time. The lock is a file created
with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems); a lock left by a
process that died on this host is recognised (its pid is gone) and taken over. A lock of
another host cannot be checked from here, so it is refused with the command that removes
it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from medmix_core.errors import MedmixError

LOCK_NAME = ".medmix.lock"


class LockedError(MedmixError):
    """The folder is being written by another live process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(folder: str | os.PathLike) -> dict | None:
    """The holder recorded in ``folder``'s lock, or None when unlocked."""
    path = Path(folder) / LOCK_NAME
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {"pid": None, "host": None, "unreadable": True}


class FolderLock:
    """Exclusive lock of a folder while it is written; a context manager.

    Args:
        folder: the folder (created if needed).
        what: what the folder is, for messages ("store", "run folder").
    Raises:
        LockedError: another live process holds the lock (its pid, host, command and start
            time are in the message).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "command": " ".join(sys.argv[:6])[:300],
              "since": dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.folder)
                if holder is None:
                    continue  # released meanwhile
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    raise LockedError(f"{self.folder}: this process already writes this "
                                      f"{self.what}; one writer at a time.") from None
                stale = (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                         and not _alive(holder["pid"]))
                if stale:
                    self.path.unlink(missing_ok=True)  # its holder died on this host
                    continue
                raise LockedError(
                    f"{self.folder}: this {self.what} is being written by pid "
                    f"{holder.get('pid')} on host {holder.get('host')} since "
                    f"{holder.get('since')} ({holder.get('command') or 'unknown command'}). "
                    f"Wait for it to finish or use another folder; if that process is "
                    f"certainly gone, delete {self.path}.") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise LockedError(f"{self.folder}: could not take the lock {self.path}; another "
                          f"process keeps creating it. Try again.")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
