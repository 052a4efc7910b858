"""The results folder of ``medmix run`` / ``sweep``: one module owns its format.

Layout of a run folder::

    run.json             what the folder is and how far it got (written first, updated
                         after every seed, "complete" last)
    config.json          the resolved RunConfig
    encoders.json + state/   experts, their dims and fitted state, for predict
    seed_<s>/model.safetensors + model.json   the deployed model of each finished seed
    seed_<s>/result.json + predictions.safetensors   a finished seed's metrics and test
                         probabilities, from which metrics.json and predictions.csv are made
    checkpoints/seed_<s>.pt   the per-epoch training checkpoint of a seed still training
    metrics.json         per-seed and mean ± std metrics (written when every seed is done)
    predictions.csv      test rows: ids, labels, probabilities, modality weights

A comparison (``--fuser a,b``) or sweep folder holds run folders and its own tables, with
a ``run.json`` of kind ``comparison`` or ``sweep``.

Rules: one folder holds one run. A folder that exists and is not empty is refused unless
the caller passes ``overwrite``, which clears it first, and only if medmix wrote it, or
``resume``, which continues the run in it when it was started with the same request
(the configuration as the user gave it) and refuses any other. The folder is locked while
written (:mod:`medmix_core.lock`). A run that fails is removed (a resumed one is kept,
marked failed), so a folder never looks finished when it is not; one that was killed
keeps ``status: running`` (``interrupted`` after Ctrl-C or SIGTERM) and is reported as
incomplete by ``predict`` and ``report``, which name the command that resumes it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from medmix_core.errors import MedmixError
from medmix_core.lock import LOCK_NAME, FolderLock, read_lock
from medmix_core.store import atomic_write_text

RUN_FILE = "run.json"
FORMAT = "medmix-run"
FORMAT_VERSION = 1
#: files by which a folder written by an older medmix (before run.json) is recognised
_LEGACY = ("config.json", "metrics.json", "sweep.json", "comparison.md")


class RunFolderError(MedmixError):
    """A results folder that cannot be used as asked (occupied, incomplete, not a run)."""


#: request fields that may change between a run and its resumption
RESUMABLE_CHANGES = ("out", "progress", "threads")


def request_of(cfg: Any) -> dict[str, Any]:
    """The part of a configuration a resumed run must share with the run it continues."""
    data = json.loads(cfg.model_dump_json()) if hasattr(cfg, "model_dump_json") else dict(cfg)
    return {k: v for k, v in data.items() if k not in RESUMABLE_CHANGES}


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(now))
    return [f"{k}: {stored.get(k)!r} then, {now.get(k)!r} now" for k in keys
            if stored.get(k) != now.get(k)]


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def written_by_medmix(path: Path) -> bool:
    """True for a folder that medmix wrote (a run, comparison or sweep folder)."""
    return (path / RUN_FILE).is_file() or any((path / f).exists() for f in _LEGACY)


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` can become a folder here: not a file, on a writable file system.

    Raises:
        RunFolderError: naming the flag, what was found and what to do.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{flag} {str(path)!r} is an existing file, not a folder. Pass "
                             f"a folder path (it is created if absent).")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise RunFolderError(f"{flag} {str(path)!r}: {str(base)!r} is a file, so no folder "
                             f"can be made under it. Pass another path.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag} {str(path)!r}: {str(base)!r} is not writable (read-only "
                             f"file system or no permission). Pass a writable folder.")
    return path


class RunFolder:
    """A results folder: refuses occupation, locks while writing, records progress."""

    def __init__(self, path: str | os.PathLike, kind: str = "run") -> None:
        self.path = Path(path)
        self.kind = kind
        self._lock: FolderLock | None = None
        self._created = False
        self._info: dict[str, Any] = {}
        self._request: dict[str, Any] | None = None
        #: the folder holds a run of the same request that this one continues
        self.resuming = False
        #: ... and that run is complete: nothing is left to do
        self.done = False

    # ------------------------------------------------------------------ writing
    @classmethod
    def prepare(cls, path: str | os.PathLike, kind: str = "run", overwrite: bool = False,
                flag: str = "--out", resume: bool = False,
                request: dict[str, Any] | None = None) -> RunFolder:
        """Check, before anything is written, that ``path`` may receive this run.

        Args:
            path: the results folder.
            kind: "run", "comparison", "sweep" or "reproduce".
            overwrite: clear a folder medmix wrote and start over.
            flag: the option named in messages.
            resume: continue the run in ``path`` (:attr:`resuming`; :attr:`done` when it is
                complete) if it was started with the same ``request``; start when ``path``
                is empty or absent, so a pre-emptible job can always pass it.
            request: what the run was asked (:func:`request_of`), stored in ``run.json``.
        Raises:
            RunFolderError: ``path`` is a file or not writable, holds another run (without
                ``overwrite``; with ``resume``, one of another request or kind), holds
                files medmix did not write, or is being written.
        """
        path = check_writable(path, flag)
        folder = cls(path, kind)
        folder._request = request
        if path.is_dir() and any(path.iterdir()):
            holder = read_lock(path)
            if holder is not None and not holder.get("unreadable"):
                FolderLock(path, "run folder").acquire().release()  # raises if live
            if not written_by_medmix(path):
                raise RunFolderError(
                    f"{flag} {str(path)!r} is a folder with files that medmix did not write "
                    f"({', '.join(sorted(p.name for p in path.iterdir())[:5])}). Pass a new or "
                    f"empty folder; medmix never clears folders it did not make.")
            if resume and not overwrite:
                folder._check_resumable(request, flag)
                return folder
            if not overwrite:
                info = read_info(path)
                hint = (" or --resume to continue it" if info.get("status") != "complete"
                        and info.get("request") is not None else "")
                raise RunFolderError(
                    f"{flag} {str(path)!r} already holds {describe(path)}. One folder holds "
                    f"one run: pass another {flag}, --overwrite to delete it and start "
                    f"over{hint}.")
        return folder

    def _check_resumable(self, request: dict[str, Any] | None, flag: str) -> None:
        info = read_info(self.path)
        if info.get("kind", "run") != self.kind:
            raise RunFolderError(f"{flag} {str(self.path)!r} holds a {info.get('kind')} "
                                 f"folder; this is a {self.kind}, so it cannot resume it. Pass "
                                 f"another {flag}.")
        stored = info.get("request")
        if stored is None:
            raise RunFolderError(f"{flag} {str(self.path)!r} holds {describe(self.path)} "
                                 f"written without a record of its request, so resuming it "
                                 f"cannot be checked. Pass another {flag} or --overwrite.")
        if request is not None:
            diff = _differences(stored, request)
            if diff:
                raise RunFolderError(
                    f"{flag} {str(self.path)!r} holds a {self.kind} started with another "
                    f"configuration ({'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); "
                    f"--resume continues only the same command. Pass another {flag}, or "
                    f"--overwrite to start over.")
        self.resuming = True
        self.done = info.get("status") == "complete"
        self._info = dict(info)

    def start(self, seeds: list[int] | None = None, **info: Any) -> RunFolder:
        """Lock the folder and write ``run.json`` with status ``running``: after clearing
        what an earlier run left (prepare allowed it), or, when :attr:`resuming`, keeping
        it."""
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = FolderLock(self.path, "run folder").acquire()
            if self.resuming:
                self._info.update(status="running", resumed=_now(),
                                  resumes=int(self._info.get("resumes", 0)) + 1, **info)
                self._save()
                return self
            for p in list(self.path.iterdir()):
                if p.name == LOCK_NAME:
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self._info = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                          "status": "running", "seeds": list(seeds or []),
                          "finished_seeds": [], "started": _now(),
                          "command": " ".join(sys.argv), "request": self._request,
                          **info}
            self._save()
        except OSError as exc:
            self.release()
            raise RunFolderError(f"Cannot write the results folder {self.path}: {exc}. Pass "
                                 f"a writable --out.") from exc
        return self

    def _save(self) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps(self._info, indent=1))

    def seed_dir(self, seed: int) -> Path:
        return self.path / f"seed_{seed}"

    def checkpoint(self, seed: int, phase: str = "train") -> Path:
        """The per-epoch training checkpoint of ``seed`` (``phase`` "train" or "refit")."""
        name = f"seed_{seed}.pt" if phase == "train" else f"seed_{seed}.{phase}.pt"
        return self.path / "checkpoints" / name

    def seed_result_done(self, seed: int) -> bool:
        """True when ``seed`` finished: its model and result files are all written."""
        d = self.seed_dir(seed)
        return all((d / f).is_file() for f in ("model.json", "model.safetensors",
                                               "result.json", "predictions.safetensors"))

    def seed_done(self, seed: int) -> None:
        self._info["finished_seeds"] = sorted({*self._info["finished_seeds"], int(seed)})
        self._save()

    def update(self, **info: Any) -> None:
        self._info.update(info)
        self._save()

    def finish(self) -> None:
        """Mark the run complete, drop its training checkpoints, release the lock."""
        self._info.update(status="complete", finished=_now())
        self._info.pop("error", None)
        self._save()
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
        self.release()

    def abort(self, exc: BaseException) -> None:
        """A run that failed leaves nothing behind: its files are removed (and the folder,
        if this run made it). A run interrupted by the user is kept, marked interrupted."""
        if isinstance(exc, KeyboardInterrupt) or self.resuming:
            # a resumed folder holds an earlier attempt's work: kept, marked as it stopped
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self._info.update(status=status, finished=_now(), error=str(exc) or None)
            try:
                self._save()
            finally:
                self.release()
            return
        try:
            for p in list(self.path.iterdir()):
                if p.name != LOCK_NAME:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except OSError:
            pass
        self.release()
        if self._created:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_text(self, rel: str, text: str) -> Path:
        atomic_write_text(self.path / rel, text)
        return self.path / rel

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=1))

    # ------------------------------------------------------------------ reading
    def info(self) -> dict[str, Any]:
        """``run.json`` (for a folder of an older medmix: what its files imply)."""
        if self._info:
            return dict(self._info)
        return read_info(self.path)

    def finished_seeds(self) -> list[Path]:
        """The seed folders holding a saved model, in seed order."""
        seeds = [p for p in self.path.glob("seed_*")
                 if p.name[5:].isdigit() and (p / "model.json").is_file()]
        return sorted(seeds, key=lambda p: int(p.name[5:]))

    def read_json(self, rel: str) -> dict[str, Any]:
        p = self.path / rel
        if not p.is_file():
            raise RunFolderError(f"{p} is missing: {self.path} is not a complete medmix run "
                                 f"folder (expected {rel} written by `medmix run`).")
        try:
            return json.loads(p.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{p} is not valid JSON ({exc}); the run folder is damaged. "
                                 f"Re-run `medmix run --out {self.path} --overwrite`.") from exc

    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    def encoders(self) -> dict[str, Any]:
        return self.read_json("encoders.json")

    def metrics(self) -> dict[str, Any]:
        return self.read_json("metrics.json")


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of ``path``; for a folder of an older medmix, its status inferred from
    its files (complete when metrics.json lists exactly the saved seeds)."""
    path = Path(path)
    p = path / RUN_FILE
    if p.is_file():
        try:
            return json.loads(p.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{p} is not valid JSON ({exc}); the folder is damaged.") \
                from exc
    saved = sorted(int(s.name[5:]) for s in path.glob("seed_*")
                   if s.name[5:].isdigit() and (s / "model.json").is_file())
    info: dict[str, Any] = {"format": FORMAT, "version": 0, "kind": "run",
                            "seeds": saved, "finished_seeds": saved, "status": "running"}
    if (path / "sweep.json").is_file():
        info.update(kind="sweep", status="complete")
    elif (path / "metrics.json").is_file():
        try:
            seeds = json.loads((path / "metrics.json").read_text("utf-8")).get("seeds", [])
        except (json.JSONDecodeError, UnicodeDecodeError):
            seeds = None
        info["seeds"] = seeds or saved
        info["status"] = "complete" if seeds == saved else "mixed"
    return info


def describe(path: str | os.PathLike) -> str:
    """A phrase for what ``path`` holds, for messages."""
    info = read_info(path)
    kind = info.get("kind", "run")
    status = info.get("status")
    if kind != "run":
        return f"a {kind} ({status})"
    done, seeds = info.get("finished_seeds", []), info.get("seeds", [])
    if status == "complete":
        return f"a complete run (seeds {seeds})"
    return f"an incomplete run (status {status}; seeds finished {done} of {seeds})"


def open_run(path: str | os.PathLike, allow_incomplete: bool = False) -> RunFolder:
    """A finished run folder, for predict and report.

    Raises:
        RunFolderError: not a run folder, or a run whose seeds did not all finish (unless
            ``allow_incomplete``), or one whose seed folders do not match its metrics.
    """
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise RunFolderError(f"{str(path)!r} is not a medmix run folder (expected run.json, "
                             f"config.json and seed_*/ written by `medmix run --out "
                             f"{path}`).")
    folder = RunFolder(path)
    info = read_info(path)
    if info.get("kind", "run") != "run":
        raise RunFolderError(f"{path} is a {info['kind']} folder; pass one of its run "
                             f"folders (a subfolder per fuser).")
    saved = [int(p.name[5:]) for p in folder.finished_seeds()]
    if not saved:
        again = ("the same command with --resume" if info.get("request") is not None
                 else f"`medmix run --out {path} --overwrite`")
        raise RunFolderError(f"{path} holds no trained model (no seed_*/model.json): the run "
                             f"did not finish a seed (status {info.get('status')}). Run "
                             f"{again}.")
    if info.get("status") == "mixed":
        raise RunFolderError(f"{path} mixes runs: metrics.json lists seeds {info['seeds']} but "
                             f"the folder holds models of seeds {saved}. Re-run it into a "
                             f"new folder.")
    if info.get("status") != "complete" and not allow_incomplete:
        command = str(info.get("command") or "medmix run ...")
        if "--resume" not in command.split():
            command += " --resume"
        again = (f"Resume it with the same command plus --resume: `{command}`"
                 if info.get("request") is not None else
                 "Re-run the same command with --overwrite to train it again")
        raise RunFolderError(
            f"{path} holds an incomplete run (status {info.get('status')}): seeds "
            f"{saved} of {info.get('seeds')} finished. {again}, or pass --allow-incomplete "
            f"to use the {len(saved)} finished seed(s).")
    return folder
