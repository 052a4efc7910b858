"""Training on a store larger than memory: streamed batches, peak resident memory, read rate.

Writes a synthetic store of ``--gb`` GB (default 30, more than this machine's memory; ``--gb
1`` is a quick smoke run) through :class:`medmix_core.store.StoreWriter`, in the real store
format (two modalities of two experts each, dims 1536 / 512 and 4096 / 768, a 768-d teacher
per modality, binary task, 20 % of each modality missing), opens it with
``StoreTensors.from_store(..., stream=True)`` and measures:

* the open: manifest validation, sha256 check of every shard (hashed once per file
  version), masks and labels read;
* a read pass: ``--read-batches`` random batches through ``tensors.batch`` (rows/s, MB/s);
* training: one epoch of ``train_seed`` (the real training loop, with validation and the
  best-epoch reload) over ``--train-rows`` rows drawn at random from the whole store, with
  MedMIX (``--fuser``, default medmix) and distillation from the teacher;

and, sampled every 0.2 s, the process's resident memory (VmRSS, RssAnon, RssFile) with its
peak (VmHWM, reset before each phase where the kernel allows), the bytes fetched from
storage (/proc/self/io read_bytes) and major page faults, which tell whether the rows came
from the disk or the page cache. With ``--cold`` (default) each shard's cached pages are
dropped with ``posix_fadvise(DONTNEED)`` after it is written and again after the hash
check (this touches only the store's files; the machine-wide page cache is left alone).
The store is removed at the end, on failure and on Ctrl-C, unless ``--keep``.

Usage:
    python benchmarks/bench_large_store.py [--gb 30] [--dir /var/tmp] [--train-rows 65536]
        [--read-batches 200] [--fuser medmix] [--batch-size 256] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, setup, write_json  # noqa: E402

from medmix_core.batch import StoreTensors  # noqa: E402
from medmix_core.config import make_config  # noqa: E402
from medmix_core.store import (  # noqa: E402
    EmbeddingStore,
    EncoderEntry,
    StoreWriter,
    atomic_save_tensors,
)
from medmix_core.stream import available_memory, embedding_bytes, should_stream  # noqa: E402
from medmix_core.training import make_spec, train_seed  # noqa: E402
from medmix_core.types import ModalitySpec, TaskSpec  # noqa: E402

#: modality -> (expert name, dim); every modality also gets a TEACHER_DIM teacher
LAYOUT = {"image": [("dinov2", 1536), ("biomedclip", 512)],
          "note": [("llm", 4096), ("medcpt", 768)]}
TEACHER_DIM = 768
MISSING = 0.2  # share of rows without the modality
EXPERT_MISSING = 0.1  # share of a present modality's rows without one of its experts
SIGNAL_DIMS = 16  # columns of each embedding that carry the label
HELD_OUT = 4096  # rows in each of val and test
GB = 1e9
MiB = 1 << 20


# ------------------------------------------------------------------ process figures
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes (0 where absent)."""
    out = dict.fromkeys(("VmRSS", "VmHWM", "RssAnon", "RssFile"), 0)
    try:
        for line in open("/proc/self/status"):
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _io() -> dict[str, int]:
    """read_bytes (fetched from storage), rchar (read by syscalls) and major faults."""
    out = {"read_bytes": 0, "rchar": 0, "majflt": 0}
    try:
        for line in open("/proc/self/io"):
            key, _, val = line.partition(":")
            if key in out:
                out[key] = int(val)
        out["majflt"] = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[9])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples :func:`_status` every ``every`` seconds in a thread; keeps the peaks."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak = every, dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _phase(name: str, fn, results: dict) -> object:
    """Run ``fn`` with memory sampled and the I/O counted; record it under ``name``."""
    reset = _reset_peak()
    io0, t0 = _io(), time.perf_counter()
    with Sampler() as sm:
        value = fn()
    secs = time.perf_counter() - t0
    io1, st = _io(), _status()
    rec = {"seconds": secs, "peak_hwm_bytes": st["VmHWM"], "hwm_reset": reset,
           **{f"peak_{k}_bytes": v for k, v in sm.peak.items()},
           "storage_read_bytes": io1["read_bytes"] - io0["read_bytes"],
           "syscall_read_bytes": io1["rchar"] - io0["rchar"],
           "major_faults": io1["majflt"] - io0["majflt"]}
    results[name] = rec
    print(f"  [{name}] {secs:.1f}s; peak RSS {st['VmHWM'] / MiB:,.0f} MiB "
          f"({'since the phase began' if reset else 'of the whole process'}), sampled peaks "
          f"RssAnon {sm.peak['RssAnon'] / MiB:,.0f} MiB, RssFile "
          f"{sm.peak['RssFile'] / MiB:,.0f} MiB; read from storage "
          f"{rec['storage_read_bytes'] / MiB:,.0f} MiB, major faults {rec['major_faults']:,}")
    return value


# ------------------------------------------------------------------ the store
def _drop_cache(path: Path) -> None:
    """Write back and drop one file's cached pages (its own pages only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def row_bytes() -> int:
    """Bytes of one row over every expert and teacher (float32)."""
    return 4 * (sum(d for es in LAYOUT.values() for _, d in es) + TEACHER_DIM * len(LAYOUT))


def write_store(folder: Path, n: int, shard_rows: int, cold: bool, seed: int = 0
                ) -> EmbeddingStore:
    """Write the synthetic store shard by shard (vectorised numpy, one shard in memory),
    through the store module's shard paths, records, labels and manifest."""
    rng = np.random.default_rng(seed)
    w = StoreWriter(folder)
    y = (rng.random(n) < 0.3).astype(np.float32)  # [N] binary label
    sign = (2 * y - 1)[:, None]  # [N, 1] +-1: the signal every embedding carries
    avail = {m: rng.random(n) >= MISSING for m in LAYOUT}  # [N] modality present
    experts: dict[str, list[EncoderEntry]] = {m: [] for m in LAYOUT}
    teachers: dict[str, list[EncoderEntry]] = {m: [] for m in LAYOUT}
    specs = [(m, name, d, "expert") for m, es in LAYOUT.items() for name, d in es]
    specs += [(m, "teacher", TEACHER_DIM, "teacher") for m in LAYOUT]
    directions = {(m, name): np.random.default_rng(zlib.crc32(f"{m}/{name}".encode()))
                  .normal(size=SIGNAL_DIMS).astype(np.float32) for m, name, _, _ in specs}
    masks = {}
    for m, name, _, role in specs:
        if role == "teacher":
            masks[(m, name)] = avail[m]
        else:
            masks[(m, name)] = avail[m] & (rng.random(n) >= EXPERT_MISSING)
    for m in LAYOUT:  # "modality present" == "some expert present"
        first = LAYOUT[m][0][0]
        dead = avail[m] & ~np.any([masks[(m, e)] for e, _ in LAYOUT[m]], axis=0)
        masks[(m, first)] = masks[(m, first)] | dead
    shards = {(m, name): [] for m, name, _, _ in specs}
    # Gaussian noise is costly to draw: one block per expert, its rows permuted per shard
    rows0 = min(n, shard_rows)
    base = {(m, name): rng.standard_normal((rows0, d), dtype=np.float32)
            for m, name, d, _ in specs}
    bufs = {d: np.empty((rows0, d), dtype=np.float32) for _, _, d, _ in specs}
    t0, written = time.perf_counter(), 0
    for j, start in enumerate(range(0, n, shard_rows)):
        stop = min(n, start + shard_rows)
        rows = stop - start
        for m, name, d, role in specs:
            key = (m, name)
            emb = bufs[d][:rows]  # [rows, d], reused: no fresh pages to fault in per shard
            np.take(base[key], rng.permutation(rows0)[:rows], axis=0, out=emb)
            # the label's signal lives in the first SIGNAL_DIMS columns
            emb[:, :SIGNAL_DIMS] += 0.5 * sign[start:stop] * directions[key]
            mask = masks[key][start:stop]
            emb[~mask] = 0.0  # masked rows are stored as zeros, as StoreWriter does
            rel = w.shard_path(m, name, j, role=role)
            # finite by construction, so the writer's checks and copies are skipped
            atomic_save_tensors(folder / rel, {"emb": torch.from_numpy(emb),
                                               "mask": torch.from_numpy(mask.astype(np.uint8))})
            rec = w.shard_record(rel)  # bytes and sha256, as StoreWriter.write_shard records
            if cold:
                _drop_cache(folder / rel)
            shards[key].append({**rec, "start": start, "stop": stop})
            written += rec["bytes"]
        secs = time.perf_counter() - t0
        print(f"  wrote rows {stop:,}/{n:,}: {written / GB:.2f} GB in {secs:.0f}s "
              f"({written / MiB / secs:,.0f} MiB/s)", flush=True)
    for m, name, d, role in specs:
        table = experts if role == "expert" else teachers
        table[m].append(EncoderEntry(m, name, d, role, "synthetic", {"expert": name},
                                     shards[(m, name)]))
    labels_file, sha = w.write_labels({"target": y})
    order = rng.permutation(n)
    splits = {"val": sorted(order[:HELD_OUT].tolist()),
              "test": sorted(order[HELD_OUT:2 * HELD_OUT].tolist()),
              "train": sorted(order[2 * HELD_OUT:].tolist())}
    w.write_manifest(
        sample_ids=[f"s{i:08d}" for i in range(n)],
        modalities=[ModalitySpec(m, "tabular") for m in LAYOUT],
        tasks=[TaskSpec("target", "binary", [])], splits=splits, experts=experts,
        teachers=teachers, labels_file=labels_file, labels_sha256=sha,
        dataset={"name": "bench_large_store", "n": n, "seed": seed})
    return EmbeddingStore.open(folder)


# ------------------------------------------------------------------ the run
def _tables(tensors: StoreTensors) -> list:
    return [x for xs in tensors.emb.values() for x in xs] + list((tensors.teacher or {}).values())


def _bytes_read(tensors: StoreTensors) -> int:
    """Embedding bytes (float32) the streamed tables have returned so far."""
    return sum(x.reads * x.d * 4 for x in _tables(tensors))


def _rows_served(tensors: StoreTensors) -> int:
    """Batch rows served so far (each reads every expert, the teacher where loaded)."""
    return _tables(tensors)[0].reads


def run(args: argparse.Namespace, folder: Path, results: dict) -> None:
    rb = row_bytes()
    n = max(2 * HELD_OUT + args.batch_size, int(args.gb * GB / rb))
    shard_rows = max(1024, int(args.shard_mb * MiB // (4 * max(d for es in LAYOUT.values()
                                                               for _, d in es))))
    need = n * rb * 1.01 + 64 * MiB  # shard headers, labels, manifest
    free = shutil.disk_usage(folder.parent).free
    mem_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    results["store"] = {"rows": n, "row_bytes": rb, "bytes": n * rb, "shard_rows": shard_rows,
                        "layout": {m: dict(es) for m, es in LAYOUT.items()},
                        "teacher_dim": TEACHER_DIM, "disk_free_before": free,
                        "memory_total": mem_total, "memory_available": available_memory(),
                        "larger_than_memory": n * rb > mem_total}
    if need + args.disk_margin_gb * GB > free:
        raise SystemExit(f"bench_large_store: a {args.gb:g} GB store needs {need / GB:.1f} GB "
                         f"plus a {args.disk_margin_gb:g} GB margin in {folder.parent}, which "
                         f"has {free / GB:.1f} GB free. Pass a smaller --gb or a --dir on a "
                         f"larger disk.")
    print(f"store: {n:,} rows x {rb:,} bytes = {n * rb / GB:.1f} GB in {folder} "
          f"({free / GB:.0f} GB free; memory {mem_total / GB:.1f} GB total, "
          f"{available_memory() / GB:.1f} GB available) -> "
          f"{'larger' if n * rb > mem_total else 'smaller'} than memory")
    store = _phase("write", lambda: write_store(folder, n, shard_rows, args.cold), results)
    results["store"]["bytes_on_disk"] = sum(f.stat().st_size for f in folder.rglob("*")
                                            if f.is_file())
    auto = should_stream(store, None, "teacher")
    results["auto_stream"] = auto
    print(f"should_stream: {auto} (embeddings {embedding_bytes(store, None, 'teacher') / GB:.1f}"
          f" GB, available {available_memory() / GB:.1f} GB)")

    del store  # the open below is timed from the manifest on

    def open_streamed():
        opened = EmbeddingStore.open(folder)
        return opened, StoreTensors.from_store(opened, teacher="teacher", stream=True)

    store, tensors = _phase("open", open_streamed, results)
    if args.cold:
        for f in folder.rglob("*.safetensors"):
            _drop_cache(f)
    train = torch.as_tensor(store.splits["train"])
    gen = torch.Generator().manual_seed(0)

    def read_pass():
        rows = 0
        for _ in range(args.read_batches):
            idx = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
            tensors.batch(idx)
            rows += len(idx)
        return rows

    bytes0 = _bytes_read(tensors)
    rows = _phase("read", read_pass, results)
    rec = results["read"]
    read = _bytes_read(tensors) - bytes0
    rec.update(rows=rows, bytes_read=read, rows_per_s=rows / rec["seconds"],
               mb_per_s=read / 1e6 / rec["seconds"])
    print(f"  read {rows:,} random rows: {rec['rows_per_s']:,.0f} rows/s, "
          f"{rec['mb_per_s']:,.1f} MB/s of embeddings")

    k = len(train) if args.train_rows <= 0 else min(args.train_rows, len(train))
    sub = train[torch.randperm(len(train), generator=gen)[:k]].sort().values
    splits = {"train": sub.tolist(), "val": store.splits["val"]}
    cfg = make_config(fuser=args.fuser, teacher="teacher", epochs=1, patience=1,
                      batch_size=args.batch_size, d=args.d, distill_ramp_epochs=0,
                      **({"threads": args.threads} if args.threads else {}))
    bytes0, rows0 = _bytes_read(tensors), _rows_served(tensors)
    res = _phase("train", lambda: train_seed(cfg, tensors, make_spec(tensors), splits, 0),
                 results)
    rec = results["train"]
    read = _bytes_read(tensors) - bytes0
    n_val = len(store.splits["val"])
    rec.update(fuser=args.fuser, train_rows=k, val_rows=n_val, batch_size=args.batch_size,
               samples_per_s=k / rec["seconds"], bytes_read=read,
               rows_served=_rows_served(tensors) - rows0,
               mb_per_s=read / 1e6 / rec["seconds"],
               train_loss=res.history[0]["train_loss"], val_loss=res.history[0]["val_loss"],
               val_auroc=res.val_metrics.get("auroc"))
    print(f"  trained {args.fuser} one epoch on {k:,} rows (+ validation on {n_val:,} rows "
          f"twice; {rec['rows_served']:,} batch rows read): {rec['samples_per_s']:,.0f} "
          f"training rows/s overall, {rec['mb_per_s']:,.1f} MB/s of embeddings; train loss "
          f"{rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f}, val AUROC "
          f"{rec['val_auroc']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=30.0, help="store size on disk, GB (1e9 bytes)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="folder to write the store in (a fresh subfolder, removed at the end)")
    p.add_argument("--shard-mb", type=float, default=256.0,
                   help="MiB of the widest expert's shard (others share its row ranges)")
    p.add_argument("--read-batches", type=int, default=200)
    p.add_argument("--train-rows", type=int, default=65536,
                   help="rows of the training epoch, drawn at random (0 = the whole train split)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fuser", default="medmix")
    p.add_argument("--d", type=int, default=128, help="shared width of the fuser")
    p.add_argument("--disk-margin-gb", type=float, default=4.0,
                   help="free disk to leave beyond the store")
    p.add_argument("--warm", dest="cold", action="store_false",
                   help="keep the store's pages in the page cache (default: drop them)")
    p.add_argument("--keep", action="store_true", help="do not remove the store")
    add_common_args(p)
    args = p.parse_args(argv)
    info = setup(args, "bench_large_store: training on a store larger than memory, streamed")
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medmix-large-store-", dir=args.dir))
    folder = work / "store"
    # the shard hash cache of a throwaway store stays with it
    os.environ["MEDMIX_CACHE_DIR"] = str(work / "cache")

    def stop(signum, frame):  # SIGTERM (kill, timeout) removes the store like Ctrl-C does
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        run(args, folder, results)
    finally:
        if args.keep:
            print(f"kept the store at {folder}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed {work}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
