"""File helpers the core and plugins share: medmix's cache folder and cached file hashes.

A file's sha256 is remembered under its path, size, modification and change times and
inode: a changed file (even one whose mtime was put back, which moves its ctime) is hashed
again, an unchanged one is not read twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

_memo: dict[tuple, str] = {}
_lock = threading.Lock()
HASH_CACHE = "sha256.json"


def cache_dir() -> Path:
    """medmix's cache folder: ``$MEDMIX_CACHE_DIR``, else ``~/.cache/medmix``."""
    env = os.environ.get("MEDMIX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medmix"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _disk_cache() -> Path:
    return cache_dir() / HASH_CACHE


def _read_disk() -> dict[str, str]:
    try:
        data = json.loads(_disk_cache().read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _write_disk(entries: dict[str, str]) -> None:
    path = _disk_cache()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs re-hashing


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of ``path``, from the cache when the file is unchanged since it was hashed."""
    path = Path(path)
    key = _key(path)
    with _lock:
        if key in _memo:
            return _memo[key]
    text_key = json.dumps(key)
    disk = _read_disk()
    digest = disk.get(text_key)
    if not isinstance(digest, str):
        digest = sha256_file(path)
        if _key(path) == key:  # not changed while we read it
            disk = _read_disk()
            disk[text_key] = digest
            if len(disk) > 200_000:  # bounded: forget the oldest half
                disk = dict(list(disk.items())[len(disk) // 2:])
            _write_disk(disk)
    with _lock:
        _memo[key] = digest
    return digest


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars and arrays, tuples and paths; NaN and Inf become
    None (JSON null: an unknown value, never a number)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
