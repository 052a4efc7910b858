"""Finding a foundation model's weights on this machine, without importing the model.

Resolution order (the first place that holds a complete checkpoint wins):

1. the explicit ``model_path`` option (when given, it is the only place looked at: a
   wrong explicit path is an error, never a silent fall-back to another copy);
2. ``$MEDMIX_MODEL_DIR/<local name>`` (e.g. ``$MEDMIX_MODEL_DIR/dinov2``), then
   ``$MEDMIX_MODEL_DIR/<org>/<repo>`` (what ``huggingface-cli download <repo> --local-dir
   $MEDMIX_MODEL_DIR/<org>/<repo>`` produces);
3. the local Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``; or the ``cache_dir`` option), read directly from its
   ``models--<org>--<repo>/snapshots/<rev>`` layout, so nothing is contacted;
4. only when ``allow_download=True``: ``huggingface_hub.snapshot_download``.

A "complete checkpoint" is a folder holding one of the spec's config files and one of its
weight files. Everything here is file-system checks, so an absent model fails in
milliseconds, before torch or transformers is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmix_core.errors import WeightsNotFoundError


class CheckpointError(WeightsNotFoundError):
    """Weights that are on this machine but unusable (damaged, or another architecture)."""


HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class WeightsSpec:
    """What a model's checkpoint folder must hold, and where it comes from.

    Args:
        name: expert name, used in messages.
        repo_id: Hugging Face repository id of the released weights.
        local_names: folder names under ``$MEDMIX_MODEL_DIR`` to try first.
        config_files: one of these must exist in the folder.
        weight_files: one of these must exist in the folder.
        tokenizer_files: when not empty, one of these must exist too (text models).
    """

    name: str
    repo_id: str
    local_names: tuple[str, ...]
    config_files: tuple[str, ...] = ("config.json",)
    weight_files: tuple[str, ...] = HF_WEIGHT_FILES
    tokenizer_files: tuple[str, ...] = ()


@dataclass
class ResolvedWeights:
    """A checkpoint folder that was found, and how."""

    path: Path
    source: str  # "model_path" | "MEDMIX_MODEL_DIR" | "hf-cache" | "download"
    repo_id: str
    config_file: Path
    weight_file: Path
    looked: list[str] = field(default_factory=list)

    def weight_files(self) -> list[Path]:
        """Every weight file of the checkpoint (all shards when sharded), sorted."""
        files = {self.weight_file}
        for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
            files.update(p for p in self.path.glob(pattern) if p.is_file())
        return sorted(files)


def hf_hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder, following huggingface_hub's environment rules."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _complete(folder: Path, spec: WeightsSpec) -> tuple[Path, Path] | None:
    """(config file, weight file) when ``folder`` holds a usable checkpoint, else None."""
    if not folder.is_dir():
        return None
    config = next((folder / f for f in spec.config_files if (folder / f).is_file()), None)
    weights = next((folder / f for f in spec.weight_files if (folder / f).is_file()), None)
    if config is None or weights is None:
        return None
    if spec.tokenizer_files and not any((folder / f).is_file() for f in spec.tokenizer_files):
        return None
    return config, weights


def _why_incomplete(folder: Path, spec: WeightsSpec) -> str:
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    missing = []
    if not any((folder / f).is_file() for f in spec.config_files):
        missing.append(" or ".join(spec.config_files))
    if not any((folder / f).is_file() for f in spec.weight_files):
        missing.append(" or ".join(spec.weight_files))
    if spec.tokenizer_files and not any((folder / f).is_file() for f in spec.tokenizer_files):
        missing.append("a tokenizer (" + " or ".join(spec.tokenizer_files) + ")")
    return "exists but lacks " + " and ".join(missing)


def _expected(spec: WeightsSpec) -> str:
    parts = [" or ".join(spec.config_files), " or ".join(spec.weight_files)]
    if spec.tokenizer_files:
        parts.append("a tokenizer (" + " or ".join(spec.tokenizer_files) + ")")
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _hf_snapshots(cache: Path, repo_id: str) -> list[Path]:
    """Snapshot folders of ``repo_id`` in a hub cache: the ``main`` ref first, newest next."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return []
    out: list[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        head = snaps / ref.read_text().strip()
        if head.is_dir():
            out.append(head)
    others = sorted((p for p in snaps.iterdir() if p.is_dir() and p not in out),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return out + others


def _download_hint(spec: WeightsSpec, repo_id: str) -> str:
    local = spec.local_names[0] if spec.local_names else repo_id.split("/")[-1]
    return (
        "To provide the weights: on a machine with internet run\n"
        f"    huggingface-cli download {repo_id} --local-dir <dir>/{local}\n"
        "(`hf download` in huggingface_hub >= 1.0; gated models need `huggingface-cli login` "
        "first), "
        f"copy <dir> here and set MEDMIX_MODEL_DIR=<dir> (the model must sit in "
        f"<dir>/{local}), or pass the option model_path=<folder holding the files>, or fill "
        f"the Hugging Face cache with `huggingface-cli download {repo_id}`, or pass "
        f"allow_download=True to let medmix download it once."
    )


def resolve_weights(
    spec: WeightsSpec,
    model_path: str | os.PathLike | None = None,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
) -> ResolvedWeights:
    """Find the checkpoint folder of a model, fast and without network.

    Args:
        spec: what the checkpoint must contain.
        model_path: explicit folder; when given it is the only place looked at.
        allow_download: fetch from the Hugging Face hub when nothing local is found.
        cache_dir: Hugging Face cache folder to use instead of the default one.
        repo_id: repository id overriding ``spec.repo_id`` (another size of the model).
    Returns:
        The resolved checkpoint.
    Raises:
        WeightsNotFoundError: naming the model, every place looked at and how to fix it.
    """
    repo = repo_id or spec.repo_id
    looked: list[str] = []
    model_label = f"{spec.name} ({repo})"

    if model_path is not None:
        folder = Path(model_path).expanduser()
        found = _complete(folder, spec)
        if found:
            return ResolvedWeights(folder, "model_path", repo, *found, looked=[str(folder)])
        raise WeightsNotFoundError(
            f"Weights of {model_label} not found at model_path={str(folder)!r}: the folder "
            f"{_why_incomplete(folder, spec)}. Expected {_expected(spec)} in it. Point "
            f"model_path at the folder that "
            f"holds the downloaded files, or drop model_path to search MEDMIX_MODEL_DIR and "
            f"the Hugging Face cache.\n" + _download_hint(spec, repo)
        )

    env_dir = os.environ.get("MEDMIX_MODEL_DIR")
    if env_dir:
        root = Path(env_dir).expanduser()
        names = list(spec.local_names if repo == spec.repo_id else ()) + [repo]
        for name in names:
            folder = root / name
            found = _complete(folder, spec)
            if found:
                return ResolvedWeights(folder, "MEDMIX_MODEL_DIR", repo, *found, looked=looked)
            looked.append(f"MEDMIX_MODEL_DIR: {folder} ({_why_incomplete(folder, spec)})")
    else:
        looked.append("MEDMIX_MODEL_DIR: not set")

    cache = hf_hub_cache_dir(cache_dir)
    snaps = _hf_snapshots(cache, repo)
    for snap in snaps:
        found = _complete(snap, spec)
        if found:
            return ResolvedWeights(snap, "hf-cache", repo, *found, looked=looked)
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    if snaps:
        looked.append(f"Hugging Face cache: {repo_dir} (snapshots lack a complete checkpoint)")
    else:
        looked.append(f"Hugging Face cache: {repo_dir} (not present)")

    if allow_download:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
            raise WeightsNotFoundError(
                f"Weights of {model_label} are not on this machine and allow_download=True "
                f"needs the package huggingface_hub, which is not installed "
                f"(pip install huggingface_hub)."
            ) from exc
        try:
            folder = Path(snapshot_download(
                repo, cache_dir=str(cache),
                ignore_patterns=["*.msgpack", "*.h5", "*.onnx", "*.ot", "*.tflite",
                                 "example_data/*"],
            ))
        except Exception as exc:
            raise WeightsNotFoundError(
                f"Weights of {model_label} are not on this machine and downloading them "
                f"failed: {type(exc).__name__}: {exc}. Looked in:\n  - "
                + "\n  - ".join(looked) + "\n" + _download_hint(spec, repo)
            ) from exc
        found = _complete(folder, spec)
        if found:
            return ResolvedWeights(folder, "download", repo, *found, looked=looked)
        looked.append(f"download: {folder} ({_why_incomplete(folder, spec)})")

    raise WeightsNotFoundError(
        f"Weights of {model_label} not found on this machine (nothing is downloaded unless "
        f"allow_download=True). Looked in:\n  - " + "\n  - ".join(looked) + "\n"
        + _download_hint(spec, repo)
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, with a clear error when it is not one."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"Could not read {path} as JSON ({type(exc).__name__}: {exc}); the checkpoint "
            f"folder looks damaged. Download the model files again."
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, expected an object; the checkpoint "
            f"folder looks damaged. Download the model files again."
        )
    return data
