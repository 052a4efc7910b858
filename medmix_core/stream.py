"""Streamed embeddings: rows read from a store's shard files on demand, for stores larger
than memory.

:class:`StreamedRows` stands in for an in-memory ``[N, d]`` embedding tensor in
:class:`medmix_core.batch.StoreTensors`: it has ``shape``, ``len`` and ``rows[idx]``, and a
read maps the shard file, copies exactly the rows asked for and unmaps it again, so the
process holds no store pages once the read returns and its resident memory stays bounded
however large the store is. The shard files are safetensors; their data region is found
from the header (an 8-byte little-endian length, then a JSON table of dtype, shape and
data_offsets per tensor), so nothing but the header, the mask and the rows read is touched.

Present rows must be finite. The in-memory mode checks a whole shard when it loads it; the
streamed mode checks the rows of each read, and raises the same :class:`StoreError` naming
the shard.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmix_core.errors import StoreError
from medmix_core.store import EmbeddingStore, EncoderEntry

#: safetensors dtype -> numpy dtype of the bytes (BF16 is read as int16 and bit-cast)
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.int16}
_MASK_DTYPES = {"U8": np.uint8, "BOOL": np.bool_, "I8": np.int8}
#: headers beyond this are not safetensors (the format itself caps them at 100 MB)
_MAX_HEADER = 100_000_000
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class _Region:
    """Where one tensor's bytes lie in a shard file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, _Region]:
    """The tensors of a safetensors file and where their bytes lie (the header only).

    Raises:
        StoreError: the file is unreadable, its header is malformed, or a tensor's bytes
            lie outside the file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            table = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{p}: not a readable safetensors file ({exc}). Delete it and re-run "
                         f"`medmix extract` with the same --out.") from exc
    base = 8 + n
    out = {}
    for name, t in table.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(v) for v in t["data_offsets"])
            region = _Region(str(t["dtype"]), tuple(int(s) for s in t["shape"]), base + lo,
                             hi - lo)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{p}: tensor {name!r} has a malformed header entry ({exc}); "
                             f"re-run `medmix extract` with the same --out.") from exc
        if lo < 0 or hi < lo or region.offset + region.nbytes > size:
            raise StoreError(f"{p}: tensor {name!r} claims bytes [{lo}, {hi}) of the data "
                             f"region, beyond the file's {size} bytes: the file is truncated. "
                             f"Delete it and re-run `medmix extract` with the same --out.")
        out[name] = region
    return out


class StreamedRows:
    """An ``[N, d]`` float32 embedding table left in a store's shard files.

    ``rows[idx]`` (idx a 1-D LongTensor, negative indices counted from the end) returns a
    new float32 tensor ``[len(idx), d]`` equal to the in-memory table's ``x[idx]``. Each read
    opens and maps the shards it needs, copies the rows and unmaps them: the object holds
    no file or map between reads.

    Args:
        path: the store folder.
        entry: the expert or teacher whose shards hold the rows.
        present: ``[N]`` bool, the stored mask; present rows read must be finite.
    Raises:
        StoreError: a shard whose "emb" is not ``[rows, entry.dim]`` of a float dtype.
    """

    def __init__(self, path: Path, entry: EncoderEntry, present: torch.Tensor) -> None:
        self.files: list[Path] = []
        self._regions: list[_Region] = []
        starts = []
        for shard in entry.shards:
            p = Path(path) / shard["file"]
            emb = read_header(p).get("emb")
            rows = shard["stop"] - shard["start"]
            if emb is None or emb.dtype not in _DTYPES or emb.shape != (rows, entry.dim):
                found = "none" if emb is None else f"{emb.dtype} {list(emb.shape)}"
                raise StoreError(f"{p}: expected a float tensor 'emb' [{rows}, {entry.dim}], "
                                 f"found {found}. Re-run `medmix extract` with the same --out.")
            item = np.dtype(_DTYPES[emb.dtype]).itemsize
            if emb.nbytes != rows * entry.dim * item:
                raise StoreError(f"{p}: 'emb' holds {emb.nbytes} bytes, expected "
                                 f"{rows * entry.dim * item} for {list(emb.shape)} "
                                 f"{emb.dtype}; re-run `medmix extract` with the same --out.")
            self.files.append(p)
            self._regions.append(emb)
            starts.append(shard["start"])
        self.n, self.d = int(present.shape[0]), int(entry.dim)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._present = present.numpy().astype(bool, copy=True)
        self.reads = 0  # rows read so far (for throughput figures)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d)

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the whole table as float32 (what the in-memory mode would hold)."""
        return self.n * self.d * 4

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.read(idx)

    def _by_shard(self, rows: np.ndarray):
        """(shard, positions in ``rows``, local rows) per shard, local rows in file order."""
        which = np.searchsorted(self._starts, rows, side="right") - 1  # shard of each row
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            local = rows[pos] - self._starts[s]
            order = np.argsort(local, kind="stable")  # file order: fewer, closer page reads
            yield int(s), pos[order], local[order]

    def prefetch(self, idx: torch.Tensor) -> None:
        """Announce the reads of rows ``idx`` to the kernel without waiting for them."""
        for s, _, local in self._by_shard(_as_rows(idx, self.n)):
            try:
                fd = os.open(self.files[s], os.O_RDONLY)
            except OSError:
                continue  # the read itself reports the problem
            try:
                _prefetch(fd, self._regions[s].offset, self._row_bytes(s), local)
            finally:
                os.close(fd)

    def read(self, idx: torch.Tensor, prefetch: bool = True) -> torch.Tensor:
        """Rows ``idx`` as float32 ``[len(idx), d]`` (``prefetch=False``: the caller has
        announced them already, see :func:`take_rows`)."""
        rows = _as_rows(idx, self.n)
        out = torch.empty(len(rows), self.d, dtype=torch.float32)  # [B, d]
        for s, pos, local in self._by_shard(rows):
            got = self._read(s, local, prefetch)
            self._check_finite(s, got, rows[pos])
            out[torch.from_numpy(pos)] = got
        self.reads += len(rows)
        return out

    def _row_bytes(self, s: int) -> int:
        return self.d * np.dtype(_DTYPES[self._regions[s].dtype]).itemsize

    def _read(self, s: int, local: np.ndarray, prefetch: bool = True) -> torch.Tensor:
        """Rows ``local`` (sorted) of shard ``s`` as float32 ``[len(local), d]``."""
        region, p = self._regions[s], self.files[s]
        dtype = _DTYPES[region.dtype]
        try:
            with open(p, "rb") as fh:
                if prefetch:
                    _prefetch(fh.fileno(), region.offset, self._row_bytes(s), local)
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            with mm:
                if hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_RANDOM)  # fault in the pages asked for, no read-around
                table = np.frombuffer(mm, dtype=dtype, count=region.shape[0] * self.d,
                                      offset=region.offset).reshape(region.shape)
                raw = table[local]  # a copy: the map can close under it
                del table  # the buffer export must end before the map closes
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p}: cannot read rows of the shard ({exc}). Re-run `medmix "
                             f"extract` with the same --out to re-make it.") from exc
        x = torch.from_numpy(raw)
        if region.dtype == "BF16":
            x = x.view(torch.bfloat16)
        # the same conversion as the in-memory mode's .float(), so values match bit for bit
        return x.float()

    def _check_finite(self, s: int, got: torch.Tensor, rows: np.ndarray) -> None:
        present = torch.from_numpy(self._present[rows])
        bad = present & ~torch.isfinite(got).all(dim=1)
        if bool(bad.any()):
            raise StoreError(f"{self.files[s]}: {int(bad.sum())} present rows hold NaN or Inf "
                             f"(store rows {rows[bad.numpy()][:5].tolist()}). Masked rows may "
                             f"hold anything, present ones must be finite; re-extract this "
                             f"expert.")


def _prefetch(fd: int, base: int, row_bytes: int, local: np.ndarray) -> None:
    """Ask the kernel to read rows ``local`` (sorted) of a file ahead, all at once.

    Faulting the rows in one by one waits for each disk read in turn; announcing them
    first lets the reads run concurrently, and the copy then finds them in the page cache.
    Adjacent rows (within a page) are merged into one range.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    lo = base + local * row_bytes  # [R] first byte of each row
    hi = lo + row_bytes
    new = np.ones(len(lo), dtype=bool)
    new[1:] = lo[1:] > hi[:-1] + _PAGE  # a gap of more than a page starts a new range
    starts, ends = lo[new], np.maximum.reduceat(hi, np.flatnonzero(new))
    for a, b in zip(starts.tolist(), ends.tolist()):
        os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)


class ZeroRows:
    """An ``[N, d]`` table of zeros that holds no memory: the stand-in for a modality a
    cohort lacks (absent for every row, so never read without its False mask)."""

    def __init__(self, n: int, d: int) -> None:
        self.n, self.d = int(n), int(d)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.d)

    def __len__(self) -> int:
        return self.n

    nbytes = 0

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(_as_rows(idx, self.n)), self.d)  # [B, d]


def take_rows(tables: list, idx: torch.Tensor) -> list[torch.Tensor]:
    """``[t[idx] for t in tables]``; the streamed tables' reads are all announced first, so
    the disk serves every table's rows of a batch concurrently."""
    streamed = [t for t in tables if isinstance(t, StreamedRows)]
    for t in streamed:
        t.prefetch(idx)
    return [t.read(idx, prefetch=False) if isinstance(t, StreamedRows) else rows_of(t, idx)
            for t in tables]


def rows_of(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for a 1-D index of rows: ``index_select`` where it applies, several times
    faster than advanced indexing on the CPU (a [4000, 960] table, 256 rows: 64 us against
    470 us)."""
    if (isinstance(t, torch.Tensor) and isinstance(idx, torch.Tensor) and idx.ndim == 1
            and not idx.is_floating_point() and idx.dtype != torch.bool
            and idx.device == t.device):
        if len(idx) and bool(idx.min() < 0):
            idx = torch.where(idx < 0, idx + len(t), idx)  # index_select takes none
        return t.index_select(0, idx.long())
    return t[idx]


def _as_rows(idx: torch.Tensor, n: int) -> np.ndarray:
    """``idx`` as int64 numpy rows in [0, n), negatives counted from the end."""
    rows = torch.as_tensor(idx)
    if rows.ndim != 1 or rows.dtype not in (torch.int64, torch.int32, torch.int16,
                                            torch.uint8, torch.int8):
        raise IndexError(f"streamed embeddings are indexed by a 1-D integer tensor of rows, "
                         f"got {rows.dtype} of shape {list(rows.shape)}.")
    out = rows.numpy().astype(np.int64, copy=True)
    out[out < 0] += n
    if len(out) and (out.min() < 0 or out.max() >= n):
        raise IndexError(f"row index out of range for {n} rows (got {int(rows.min())} .. "
                         f"{int(rows.max())}).")
    return out


def load_streamed(store: EmbeddingStore, entry: EncoderEntry
                  ) -> tuple[StreamedRows, torch.Tensor]:
    """The streamed counterpart of :meth:`EmbeddingStore.load`: rows left on disk, mask read.

    Each shard's sha256 is checked as :meth:`EmbeddingStore.load` does (hashed once per file
    version, read in chunks, so memory stays bounded); only the shard's "mask" tensor is
    read into memory.

    Returns:
        (rows, mask): a :class:`StreamedRows` ``[N, d]`` and the ``[N]`` bool mask.
    Raises:
        StoreError: a damaged shard (hash, header, mask shape or dtype).
    """
    masks = []
    for shard in entry.shards:
        store._check_hash(shard)
        p = store.path / shard["file"]
        region = read_header(p).get("mask")
        rows = shard["stop"] - shard["start"]
        if region is None or region.dtype not in _MASK_DTYPES or region.shape != (rows,) \
                or region.nbytes != rows * np.dtype(_MASK_DTYPES[region.dtype]).itemsize:
            found = "none" if region is None else f"{region.dtype} {list(region.shape)}"
            raise StoreError(f"{p}: expected a tensor 'mask' [{rows}] of uint8 or bool, found "
                             f"{found}. Re-run `medmix extract` with the same --out.")
        fd = os.open(p, os.O_RDONLY)
        try:
            raw = os.pread(fd, region.nbytes, region.offset)
        finally:
            os.close(fd)
        masks.append(torch.from_numpy(
            np.frombuffer(raw, dtype=_MASK_DTYPES[region.dtype]) != 0))
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)  # [N]
    return StreamedRows(store.path, entry, mask), mask


def embedding_bytes(store: EmbeddingStore, experts: list[str] | None = None,
                    teacher: str | None = None) -> int:
    """Bytes the chosen experts' (default: all) and teacher's embeddings take in memory as
    float32: what :meth:`StoreTensors.from_store` would hold without streaming (the teacher
    counts in the modalities with a chosen expert, the only ones it is loaded for)."""
    n, total = store.n_samples, 0
    for m, es in store.experts.items():
        chosen = [e for e in es if experts is None or e.name in experts]
        total += sum(n * e.dim * 4 for e in chosen)
        if chosen and teacher is not None:
            total += sum(n * e.dim * 4 for e in store.teachers.get(m, []) if e.name == teacher)
    return total


def available_memory() -> int:
    """Bytes of memory available now: /proc/meminfo's MemAvailable (which counts the page
    cache that can be reclaimed), else free physical pages from ``os.sysconf``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: stream, the safe choice


def should_stream(store: EmbeddingStore, experts: list[str] | None = None,
                  teacher: str | None = None, available: int | None = None) -> bool:
    """The automatic rule: stream when the chosen embeddings take more than half of the
    memory available now (``available`` overrides the measurement)."""
    avail = available_memory() if available is None else available
    return embedding_bytes(store, experts, teacher) > avail // 2
