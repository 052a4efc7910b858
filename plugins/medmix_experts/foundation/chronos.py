"""Chronos (amazon/chronos-t5-*) as a time-series expert, without the chronos package.

Chronos is a T5 encoder-decoder trained on tokenised series. Its tokeniser
(``MeanScaleUniformBins``) divides a series by its mean absolute value over observed
points, maps each scaled value to one of ``n_tokens - n_special_tokens - 1`` uniform bins
over ``[low_limit, high_limit]`` (token id = bucket + ``n_special_tokens``), gives NaN
(unobserved) steps the pad id with attention mask 0, keeps the last ``context_length``
steps and appends an EOS token. All constants come from the checkpoint's
``config.json["chronos_config"]``. The expert loads the encoder half with transformers
``T5EncoderModel`` and mean-pools its final hidden states over the attended positions
(observed steps and EOS), the embedding Chronos's own ``ChronosPipeline.embed`` exposes.

Chronos is univariate; a clinical ``TimeSeriesData`` holds many irregular variables. Each
observed variable becomes one series -- by default resampled onto a regular grid of
``resample_hours`` (1 h) bins over the window, each bin the mean of its observations and
NaN when empty (Chronos's own notion of a missing step); with ``resample_hours=None`` the
observations are used in time order -- and a sample's embedding is the mean of its
variables' embeddings. Variables with no observation take no part; a payload with no
observed variable at all is an error (it is a missing modality).

Options: ``resample_hours`` (1.0), ``variables`` (None = all), ``context_length`` (None =
the checkpoint's), ``backend`` ("native", or "chronos" to run the installed
chronos-forecasting package's ``ChronosPipeline.embed`` instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, Payload, TimeSeriesData

from .base import ExpertOptionError, FoundationExpert
from .weights import CheckpointError, WeightsSpec


@dataclass(frozen=True)
class ChronosTokenizerConfig:
    """The ``chronos_config`` fields the tokeniser needs."""

    n_tokens: int
    n_special_tokens: int
    pad_token_id: int
    eos_token_id: int
    use_eos_token: bool
    context_length: int
    low_limit: float
    high_limit: float

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> ChronosTokenizerConfig:
        cc = config.get("chronos_config")
        if not isinstance(cc, dict):
            raise CheckpointError(
                f"{where} has no 'chronos_config'; expected a Chronos T5 checkpoint such as "
                f"amazon/chronos-t5-small (Chronos-Bolt and Chronos-2 are other architectures)."
            )
        if cc.get("tokenizer_class", "MeanScaleUniformBins") != "MeanScaleUniformBins" or \
                cc.get("model_type", "seq2seq") != "seq2seq":
            raise CheckpointError(
                f"{where}: chronos_config has tokenizer_class={cc.get('tokenizer_class')!r}, "
                f"model_type={cc.get('model_type')!r}; this expert implements the seq2seq "
                f"MeanScaleUniformBins models (amazon/chronos-t5-*)."
            )
        kw = cc.get("tokenizer_kwargs", {})
        try:
            return cls(int(cc["n_tokens"]), int(cc["n_special_tokens"]), int(cc["pad_token_id"]),
                       int(cc["eos_token_id"]), bool(cc.get("use_eos_token", True)),
                       int(cc["context_length"]), float(kw.get("low_limit", -15.0)),
                       float(kw.get("high_limit", 15.0)))
        except KeyError as exc:
            raise CheckpointError(f"{where}: chronos_config lacks {exc.args[0]!r}.") from None


class MeanScaleUniformBins:
    """Chronos's tokeniser: mean scaling and uniform binning (a faithful port)."""

    def __init__(self, cfg: ChronosTokenizerConfig) -> None:
        import torch

        self.cfg = cfg
        self.centers = torch.linspace(cfg.low_limit, cfg.high_limit,
                                      cfg.n_tokens - cfg.n_special_tokens - 1)
        self.boundaries = torch.cat((torch.tensor([-1e20]),
                                     (self.centers[1:] + self.centers[:-1]) / 2,
                                     torch.tensor([1e20])))

    def context_input_transform(self, context):
        """Left-padded ``[B, L]`` series (NaN = missing) -> token ids, mask, scale.

        Returns:
            token_ids ``[B, L' (+1)]`` long, attention_mask ``[B, L' (+1)]`` bool and
            scale ``[B]``, with L' = min(L, context_length) and +1 for EOS.
        """
        import torch

        cfg = self.cfg
        if context.shape[-1] > cfg.context_length:
            context = context[..., -cfg.context_length:]
        context = context.to(torch.float32)
        mask = ~torch.isnan(context)  # [B, L]
        scale = torch.nansum(torch.abs(context) * mask, dim=-1) / torch.nansum(mask, dim=-1)
        scale[~(scale > 0)] = 1.0
        ids = torch.bucketize(context / scale.unsqueeze(-1), self.boundaries, right=True)
        ids = (ids + cfg.n_special_tokens).clamp_(0, cfg.n_tokens - 1)
        ids[~mask] = cfg.pad_token_id
        if cfg.use_eos_token:
            b = ids.shape[0]
            ids = torch.cat((ids, torch.full((b, 1), cfg.eos_token_id)), dim=1)
            mask = torch.cat((mask, torch.ones((b, 1), dtype=torch.bool)), dim=1)
        return ids, mask, scale


def series_of(ts: TimeSeriesData, variables: list[str], resample_hours: float | None,
              where: str) -> list[np.ndarray]:
    """One univariate float series per observed variable of ``variables``.

    Args:
        ts: the payload.
        variables: names to use, in order (each must be in ``ts.variables``).
        resample_hours: bin width for a regular grid, or None for observation order.
        where: payload name for messages.
    Returns:
        list of 1-D float64 arrays (NaN = empty bin); variables without observations are
        left out.
    """
    index = {v: i for i, v in enumerate(ts.variables)}
    out = []
    for name in variables:
        i = index[name]
        t = np.asarray(ts.times[i], dtype=np.float64)
        v = np.asarray(ts.values[i], dtype=np.float64)
        if t.shape != v.shape or t.ndim != 1:
            raise DataError(
                f"{where}: variable {name!r} has {t.shape} times but {v.shape} values; expected "
                f"two 1-D arrays of the same length."
            )
        keep = ~np.isnan(v)
        t, v = t[keep], v[keep]
        if len(v) == 0:
            continue
        if not (np.isfinite(v).all() and np.isfinite(t).all()):
            raise DataError(f"{where}: variable {name!r} holds inf values or non-finite times.")
        if (t < 0).any():
            raise DataError(
                f"{where}: variable {name!r} has negative times (min {t.min():.3g} h); times "
                f"are hours since the window start."
            )
        order = np.argsort(t, kind="stable")
        t, v = t[order], v[order]
        if resample_hours is None:
            out.append(v)
            continue
        # the window's bins; t == horizon falls in the last one, later times add bins
        n_bins = max(math.ceil(ts.horizon / resample_hours),
                     math.ceil(t[-1] / resample_hours), 1)
        b = np.minimum((t / resample_hours).astype(np.int64), n_bins - 1)
        sums = np.bincount(b, weights=v, minlength=n_bins)
        counts = np.bincount(b, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            series = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        out.append(series)
    return out


class ChronosExpert(FoundationExpert):
    """Chronos T5 encoder embeddings of each variable, averaged over observed variables."""

    name: ClassVar[str] = "chronos"
    kinds: ClassVar[tuple[str, ...]] = ("timeseries",)
    family: ClassVar[str] = "general"
    batch_size: ClassVar[int] = 64
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="chronos", repo_id="amazon/chronos-t5-small", local_names=("chronos",))
    default_options: ClassVar[dict[str, Any]] = {
        "resample_hours": 1.0, "variables": None, "context_length": None, "backend": "native"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.tok_cfg = ChronosTokenizerConfig.from_config(
            self.config(), str(self.weights.config_file)
        )
        if self.opts["context_length"] is not None:
            cl = self.opts["context_length"]
            if not isinstance(cl, int) or isinstance(cl, bool) or cl < 1:
                raise ExpertOptionError(
                    f"Option context_length={cl!r} of 'chronos' must be a positive integer."
                )
            self.tok_cfg = ChronosTokenizerConfig(**{**self.tok_cfg.__dict__, "context_length": cl})
        self._pipeline: Any = None

    def _validate_options(self) -> None:
        rh = self.opts["resample_hours"]
        if rh is not None and (
            isinstance(rh, bool) or not isinstance(rh, (int, float)) or not rh > 0
        ):
            raise ExpertOptionError(
                f"Option resample_hours={rh!r} of 'chronos' must be a positive number of hours "
                f"or None (observation order)."
            )
        if self.opts["backend"] not in ("native", "chronos"):
            raise ExpertOptionError(
                f"Option backend={self.opts['backend']!r} of 'chronos' must be 'native' or "
                f"'chronos'."
            )

    def dim(self, modality: ModalitySpec) -> int:
        return int(self.config()["d_model"])

    def _load(self):
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(str(self.weights.path), local_files_only=True,
                                              dtype=self.torch_dtype())

    def _variables(self, modality: ModalitySpec, ts: TimeSeriesData, where: str) -> list[str]:
        wanted = self.opts["variables"]
        if wanted is None:
            return list(ts.variables)
        unknown = [v for v in wanted if v not in ts.variables]
        if unknown:
            raise DataError(
                f"chronos: option variables names {unknown}, which {where} lacks; it has "
                f"{list(ts.variables)[:20]}."
            )
        return list(wanted)

    def _embed_series(self, series: list[np.ndarray]):
        """Univariate series -> [S, d] mean-pooled encoder states (native port)."""
        import torch

        tok = MeanScaleUniformBins(self.tok_cfg)
        model = self.model
        model.eval()
        bs = int(self.opts["batch_size"])
        out = []
        for start in range(0, len(series), bs):
            chunk = series[start:start + bs]
            length = max(len(s) for s in chunk)
            ctx = torch.full((len(chunk), length), float("nan"), dtype=torch.float64)
            for j, s in enumerate(chunk):  # left padding with NaN, as Chronos does
                ctx[j, length - len(s):] = torch.from_numpy(np.asarray(s, dtype=np.float64))
            ids, mask, _ = tok.context_input_transform(ctx)  # [b, T], [b, T]
            ids, mask = ids.to(self._device), mask.to(self._device)
            with torch.no_grad():
                h = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
                m = mask.unsqueeze(-1).float()  # [b, T, 1]
                out.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())  # [b, d]
        return np.concatenate(out, axis=0)

    def _embed_series_chronos(self, series: list[np.ndarray]):
        """Same pooling over ``ChronosPipeline.embed`` (chronos-forecasting installed)."""
        import torch

        if self._pipeline is None:
            try:
                from chronos import BaseChronosPipeline
            except ImportError as exc:
                raise ExpertOptionError(
                    "backend='chronos' needs the chronos-forecasting package, which is not "
                    "installed; use the default backend='native' (same model, no extra "
                    "dependency) or pip install chronos-forecasting."
                ) from exc
            self._pipeline = BaseChronosPipeline.from_pretrained(
                str(self.weights.path), device_map=self._device, dtype=self.torch_dtype())
        out = []
        cl = self.tok_cfg.context_length
        for s in series:
            ctx = torch.from_numpy(np.asarray(s, dtype=np.float32))
            emb, _ = self._pipeline.embed(ctx)  # [1, T(+1), d]
            mask = ~torch.isnan(ctx[-cl:])
            if emb.shape[1] == mask.shape[0] + 1:
                mask = torch.cat((mask, torch.ones(1, dtype=torch.bool)))
            m = mask.unsqueeze(-1).float()
            out.append(((emb[0].float() * m).sum(0) / m.sum(0)).numpy())
        return np.stack(out)

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed multivariate irregular series (mean over their variables' embeddings).

        Args:
            modality: a ``timeseries`` modality.
            payloads: N present ``TimeSeriesData``.
        Returns:
            ``[N, d_model]`` float32.
        """
        self._check_payloads(modality, payloads, {"timeseries": TimeSeriesData})
        d = self.dim(modality)
        all_series: list[np.ndarray] = []
        owners: list[int] = []
        for i, p in enumerate(payloads):
            where = f"{modality.name}[{i}]"
            ss = series_of(
                p, self._variables(modality, p, where), self.opts["resample_hours"], where
            )
            if not ss:
                raise DataError(
                    f"chronos: {where} has no observed value in any used variable; such a "
                    f"sample is a missing modality (None), not an empty series."
                )
            all_series += ss
            owners += [i] * len(ss)
        if not payloads:
            return np.zeros((0, d), dtype=np.float32)
        emb = (self._embed_series_chronos(all_series) if self.opts["backend"] == "chronos"
               else self._embed_series(all_series))  # [S, d]
        sums = np.zeros((len(payloads), d), dtype=np.float64)
        np.add.at(sums, np.asarray(owners), emb.astype(np.float64))
        counts = np.bincount(np.asarray(owners), minlength=len(payloads))
        return self._finite((sums / counts[:, None]).astype(np.float32), self.name)  # [N, d]
