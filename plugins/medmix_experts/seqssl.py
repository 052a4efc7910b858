"""``seqssl``: a small GRU sequence encoder trained self-supervised on the training split.

Unlike the pretrained experts, ``seqssl`` learns its weights in :meth:`fit`, from the
training payloads it is given and nothing else (no labels, no validation or test stays);
they are then frozen and saved in the store with the normalisation statistics, so an
external cohort is encoded by the very same network.

What the model sees, per stay (``B = ceil(horizon / bin_hours)`` steps, 48 by default, and
the ``V`` variables of the modality in ``ModalitySpec.variables`` order), an input of
``[B, 3V]``:

- **value**: the mean of the observations in the bin, z-scored with the variable's
  training mean and standard deviation (over every training observation in the window)
  and clipped to ``[-clip, clip]``, then carried forward into later empty bins; 0 (the
  training mean) before the first observation.
- **mask**: 1 where the variable was measured in the bin, else 0 (a carried-forward value
  has mask 0), so an absent value never looks like a measured one.
- **time since the last observation** of the variable (or since the start of the window),
  in units of the horizon: 0 in a measured bin, growing by ``bin_hours / horizon`` a step.

Observations outside ``[0, horizon]`` are ignored; NaN or infinite values and times count
as not measured. A stay where no variable of the modality was measured (possible for a
hand-made payload; the dataset gives ``None`` instead) still gets a finite vector: the
network sees all-zero values and masks and the growing time since the window start.

Encoder: a ``layers``-layer GRU of width ``hidden`` over the ``B`` steps; the embedding is
``[mean of the hidden states over the steps, last hidden state]``, ``dim = 2 * hidden``
(128 by default). The GRU has ``3 * hidden * (3V + hidden + 2)`` parameters for one layer
(17,856 for the 9 vitals with ``hidden=64``); :meth:`n_parameters` counts the GRUs of
every fitted modality. The two linear heads used by the objective are saved with the state
but are not part of the embedding.

Objective, in ``fit``: **masked-value reconstruction**. Each batch hides a random
``mask_rate`` of the *observed* cells (value, mask and time-since-last are recomputed as if
they had not been measured) and a linear head predicts their z-scored values from the
hidden state at the same step; the squared error counts on hidden observed cells only.
Plus, weighted by ``forecast``, **next-step forecasting**: a second head predicts every
observed value of step ``t + 1`` from the state at step ``t``. Adam (``lr``), batches of
64 stays, gradient norm clipped at 1, ``epochs`` passes.

Determinism: initialisation, batch order and the hidden cells come from ``seed`` (a
``torch.Generator``; the global RNG is left untouched), so the same training payloads give
byte-identical state and embeddings on the same machine. Fitting and CPU encoding run on
one torch thread whatever the caller's setting (restored afterwards): the network is too
small to gain from more, on a busy machine extra threads made fitting over 100x slower,
and one thread fixes the reduction order. ``epochs`` is the training budget;
``max_seconds`` is only a safety cap checked after each epoch, far above the default cost.
When it does stop training (the state records ``epochs_run``) the result depends on the
machine's speed and is no longer reproducible.

Cost, one CPU thread, defaults (``hidden=64``, 20 epochs), PhysioNet 2012 training split:
fitting takes 4-17 s per modality (17 s for vitals, 2,758 stays, 0.85 s an epoch; 4 s for
cardiac, 840 stays), encoding runs at 6,500-15,000 stays/s, and the saved state of one
modality is about 77 kB. A logistic probe of in-hospital mortality (fitted on the training
split, AUROC on the 600 validation stays) on the six time-series groups together scored
0.803 on these embeddings, 0.787 on ``stats`` and 0.809 on both concatenated.

Options: ``hidden`` (64), ``layers`` (1), ``epochs`` (20; 0 keeps the random
initialisation), ``mask_rate`` (0.2), ``forecast`` (0.5, weight of the forecasting loss),
``lr`` (0.003), ``seed`` (0), ``max_seconds`` (600; None for no cap), ``horizon`` (48),
``bin_hours`` (1), ``clip`` (5).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medmix_core import ExpertEncoder, ModalitySpec, hookimpl
from medmix_core.errors import DataError
from medmix_core.plugin_utils import check_options
from medmix_experts.stats import (
    _names_array,
    fitted_state,
    flatten_timeseries,
    restore_norm_state,
)

#: option -> (accepted types, default); None gives the default (for max_seconds: no cap)
OPTIONS: dict[str, tuple[Any, Any]] = {
    "hidden": (int, 64), "layers": (int, 1), "epochs": (int, 20),
    "mask_rate": ((int, float), 0.2), "forecast": ((int, float), 0.5),
    "lr": ((int, float), 3e-3), "seed": (int, 0), "max_seconds": ((int, float), 600.0),
    "horizon": ((int, float), 48.0), "bin_hours": ((int, float), 1.0),
    "clip": ((int, float), 5.0),
}
#: the options that shape the network and its input: a saved state must match them
ARCH_KEYS = ("hidden", "layers", "horizon", "bin_hours", "clip")
TRAIN_BATCH = 64
ENCODE_BATCH = 256
WEIGHT_PREFIX = "net."


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread, then restore the caller's setting.

    A 64-wide GRU gains nothing from intra-op threads, and on a busy machine they cost
    over 100x (threads wait for each other); one thread also fixes the reduction order, so
    the fitted weights do not depend on the host's thread setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SeqNet(nn.Module):
    """GRU over ``[n, B, 3V]`` inputs, plus the two self-supervised heads."""

    def __init__(self, n_vars: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(3 * n_vars, hidden, num_layers=layers, batch_first=True)
        self.reconstruct = nn.Linear(hidden, n_vars)  # z-value of a hidden cell, same step
        self.forecast = nn.Linear(hidden, n_vars)  # z-values of the next step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]  # [n, B, hidden]

    @staticmethod
    def embed(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean(dim=1), h[:, -1]], dim=1)  # [n, 2 * hidden]


def model_inputs(vals: torch.Tensor, mask: torch.Tensor, step_frac: float) -> torch.Tensor:
    """``[n, B, 3V]`` network input from bin values and observed masks (both ``[n, B, V]``).

    Unobserved entries of ``vals`` are ignored (the last observed value is carried forward).
    ``step_frac`` is ``bin_hours / horizon``, the unit of the time-since-last channel.
    """
    nb = vals.shape[1]
    steps = torch.arange(nb, device=vals.device).view(1, nb, 1)  # [1, B, 1]
    last = torch.where(mask, steps, torch.full_like(steps, -1)).cummax(dim=1).values  # [n,B,V]
    filled = torch.where(last >= 0, vals.gather(1, last.clamp(min=0)), torch.zeros_like(vals))
    since = (steps - last).to(vals.dtype) * step_frac  # 0 where measured
    return torch.cat([filled, mask.to(vals.dtype), since], dim=2)


def ssl_losses(net: SeqNet, vals: torch.Tensor, mask: torch.Tensor, hide: torch.Tensor,
               step_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, forecasting) mean squared errors for one batch.

    Args:
        vals, mask: ``[n, B, V]`` z-values and observed masks.
        hide: ``[n, B, V]`` observed cells hidden from the input (reconstruction targets).
    """
    keep = mask & ~hide
    h = net(model_inputs(vals, keep, step_frac))  # [n, B, hidden]
    n_hidden = hide.sum().clamp(min=1)
    recon = ((net.reconstruct(h) - vals) ** 2 * hide).sum() / n_hidden
    nxt = mask[:, 1:]  # [n, B - 1, V] forecasting targets
    forecast = ((net.forecast(h[:, :-1]) - vals[:, 1:]) ** 2 * nxt).sum() / nxt.sum().clamp(min=1)
    return recon, forecast


class SeqSSLExpert(ExpertEncoder):
    """GRU encoder of binned series, trained by masked reconstruction on the training split.

    Options: see the module docstring.
    """

    name = "seqssl"
    kinds = ("timeseries",)
    version = "1"
    family = "domain"
    batch_size = 1024

    def __init__(self, **options: Any) -> None:
        check_options(self.name, options, {k: t for k, (t, _) in OPTIONS.items()})
        super().__init__(**options)
        opts = {k: (options[k] if options.get(k) is not None else d)
                for k, (_, d) in OPTIONS.items()}
        if options.get("max_seconds", 0) is None:
            opts["max_seconds"] = None  # explicitly no time cap
        for key in ("hidden", "layers", "epochs", "seed"):
            if isinstance(opts[key], bool):
                raise DataError(f"Expert 'seqssl': option {key!r} must be an integer, got "
                                f"{opts[key]!r}.")
        checks = {
            "hidden": (opts["hidden"] >= 1, ">= 1"),
            "layers": (1 <= opts["layers"] <= 4, "in 1..4"),
            "epochs": (opts["epochs"] >= 0, ">= 0"),
            "mask_rate": (0 < opts["mask_rate"] < 1, "in (0, 1)"),
            "forecast": (opts["forecast"] >= 0, ">= 0"), "lr": (opts["lr"] > 0, "> 0"),
            "seed": (opts["seed"] >= 0, ">= 0"),
            "max_seconds": (opts["max_seconds"] is None or opts["max_seconds"] > 0, "> 0"),
            "horizon": (opts["horizon"] > 0, "> 0"), "bin_hours": (opts["bin_hours"] > 0, "> 0"),
            "clip": (opts["clip"] > 0, "> 0"),
        }
        for key, (ok, want) in checks.items():
            if not ok:
                raise DataError(f"Expert 'seqssl': option {key!r} must be {want}, got "
                                f"{opts[key]!r}.")
        for key in ("mask_rate", "forecast", "lr", "horizon", "bin_hours", "clip"):
            opts[key] = float(opts[key])
        self.opts = opts
        self.n_steps = max(1, math.ceil(opts["horizon"] / opts["bin_hours"] - 1e-9))
        self._device = "cpu"
        self._state: dict[str, dict[str, np.ndarray]] = {}  # modality -> saved arrays
        self._nets: dict[str, SeqNet] = {}
        self._fit_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ description
    def dim(self, modality: ModalitySpec) -> int:
        self._check_kind(modality)
        return 2 * self.opts["hidden"]

    def n_parameters(self) -> int:
        """Parameters of the GRU encoders fitted so far (one per modality; heads excluded)."""
        return int(sum(p.numel() for net in self._nets.values() for p in net.gru.parameters()))

    def to(self, device: str) -> SeqSSLExpert:
        """Encode on ``device``; fitting always runs on the CPU (for determinism)."""
        self._device = str(device)
        return self

    def provenance(self) -> dict[str, Any]:
        trained = {}
        for mod, st in self._state.items():
            loss = st["ssl_loss"]
            trained[mod] = {
                "weights": "trained self-supervised by fit() on the training-split payloads",
                "n_train": int(st["n_train"][0]), "seed": int(st["seed"][0]),
                "epochs_run": int(st["epochs_run"][0]),
                "final_ssl_loss": float(loss[-1]) if len(loss) else None,
                "final_recon_loss": float(st["recon_loss"][-1]) if len(loss) else None,
                "n_parameters": int(sum(p.numel() for p in self._nets[mod].gru.parameters())),
            }
            if mod in self._fit_seconds:
                trained[mod]["fit_seconds"] = round(self._fit_seconds[mod], 2)
        return {"expert": self.name, "version": self.version, "family": self.family,
                "options": dict(self.options), "resolved_options": dict(self.opts),
                "objective": "masked-value reconstruction + next-step forecasting",
                "trained": trained}

    def _check_kind(self, modality: ModalitySpec) -> None:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert 'seqssl' encodes time series only; {modality.name!r} is "
                            f"{modality.kind!r}. Use 'stats' for tabular modalities.")

    # ------------------------------------------------------------------ input grid
    def grid(self, modality: ModalitySpec, payloads: Sequence[Any], mean: np.ndarray,
             std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bin means of the clipped z-values ``[N, B, V]`` float32 and observed ``[N, B, V]``."""
        n, nv, nb = len(payloads), len(modality.variables), self.n_steps
        obs = flatten_timeseries(modality, payloads)
        t = obs["time"]
        inside = (t >= 0) & (t <= self.opts["horizon"])
        row, var, t, v = obs["row"][inside], obs["var"][inside], t[inside], obs["value"][inside]
        b = np.minimum((t / self.opts["bin_hours"]).astype(np.int64), nb - 1)
        z = np.clip((v - mean[var]) / std[var], -self.opts["clip"], self.opts["clip"])
        cell = (row * nb + b) * nv + var  # index into [N, B, V]
        count = np.bincount(cell, minlength=n * nb * nv)
        total = np.bincount(cell, weights=z, minlength=n * nb * nv)
        observed = count > 0
        vals = np.divide(total, count, out=np.zeros(n * nb * nv), where=observed)
        return (vals.reshape(n, nb, nv).astype(np.float32), observed.reshape(n, nb, nv))

    def _tensors(self, modality: ModalitySpec,
                 payloads: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._fitted(modality)
        vals, observed = self.grid(modality, payloads, st["mean"], st["std"])
        return torch.from_numpy(vals), torch.from_numpy(observed)

    @property
    def step_frac(self) -> float:
        return self.opts["bin_hours"] / self.opts["horizon"]

    # ------------------------------------------------------------------ fit / state
    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        """Normalisation statistics, then self-supervised training, on training payloads."""
        self._check_kind(modality)
        if not payloads:
            raise DataError(f"Expert 'seqssl' needs at least one training payload of "
                            f"{modality.name!r} to fit; got none.")
        started = time.perf_counter()
        nv = len(modality.variables)
        obs = flatten_timeseries(modality, payloads)
        inside = (obs["time"] >= 0) & (obs["time"] <= self.opts["horizon"])
        var, v = obs["var"][inside], obs["value"][inside]
        count = np.bincount(var, minlength=nv).astype(np.float64)
        mean = np.divide(np.bincount(var, weights=v, minlength=nv), count, out=np.zeros(nv),
                         where=count > 0)
        sq = np.bincount(var, weights=(v - mean[var]) ** 2, minlength=nv)
        std = np.sqrt(np.divide(sq, count, out=np.zeros(nv), where=count > 0))
        std[~(std > 1e-8)] = 1.0
        vals_np, obs_np = self.grid(modality, payloads, mean, std)
        vals, observed = torch.from_numpy(vals_np), torch.from_numpy(obs_np)  # [N, B, V]

        with one_thread():
            net, ssl_hist, recon_hist = self._train(vals, observed, started)
        o = self.opts
        n = len(payloads)
        state = {"mean": mean, "std": std, "variables": _names_array(modality.variables),
                 "arch": np.array([o[k] for k in ARCH_KEYS], dtype=np.float64),
                 "n_train": np.array([n], dtype=np.int64),
                 "seed": np.array([o["seed"]], dtype=np.int64),
                 "epochs_run": np.array([len(ssl_hist)], dtype=np.int64),
                 "ssl_loss": np.array(ssl_hist, dtype=np.float64),
                 "recon_loss": np.array(recon_hist, dtype=np.float64)}
        for key, p in net.state_dict().items():
            state[WEIGHT_PREFIX + key] = p.detach().cpu().numpy().copy()
        self._state[modality.name] = state
        self._nets[modality.name] = net
        self._fit_seconds[modality.name] = time.perf_counter() - started

    def _train(self, vals: torch.Tensor, observed: torch.Tensor,
               started: float) -> tuple[SeqNet, list[float], list[float]]:
        """Self-supervised training on ``[N, B, V]`` training grids; (net, loss histories)."""
        o = self.opts
        gen = torch.Generator().manual_seed(o["seed"])
        with torch.random.fork_rng(devices=[]):  # seeded init without touching global RNG
            torch.default_generator.manual_seed(o["seed"])  # CPU only: CUDA RNGs untouched
            net = SeqNet(vals.shape[2], o["hidden"], o["layers"])
        opt = torch.optim.Adam(net.parameters(), lr=o["lr"])
        ssl_hist, recon_hist = [], []
        n = len(vals)
        net.train()
        for _ in range(o["epochs"]):
            order = torch.randperm(n, generator=gen)
            tot = rec_tot = 0.0
            for s in range(0, n, TRAIN_BATCH):
                idx = order[s:s + TRAIN_BATCH]
                bv, bm = vals[idx], observed[idx]  # [b, B, V]
                hide = bm & (torch.rand(bm.shape, generator=gen) < o["mask_rate"])
                recon, forecast = ssl_losses(net, bv, bm, hide, self.step_frac)
                loss = recon + o["forecast"] * forecast
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                tot += loss.item() * len(idx)
                rec_tot += recon.item() * len(idx)
            ssl_hist.append(tot / n)
            recon_hist.append(rec_tot / n)
            if o["max_seconds"] is not None and time.perf_counter() - started > o["max_seconds"]:
                break
        net.eval()
        return net, ssl_hist, recon_hist

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        """Restore a state from :meth:`get_state`, checking variables, options and shapes.

        Raises:
            DataError: naming what was expected and what was found.
        """
        self._check_kind(modality)
        nv = len(modality.variables)
        norm = restore_norm_state("seqssl", modality, state, nv)
        where = f"seqssl state for {modality.name!r}"
        need = {"arch", "n_train", "seed", "epochs_run", "ssl_loss", "recon_loss"}
        missing = sorted(need - set(state))
        if missing:
            raise DataError(f"{where} lacks {missing}; it was not written by this expert.")
        arch = np.asarray(state["arch"], dtype=np.float64).ravel()
        want = np.array([self.opts[k] for k in ARCH_KEYS], dtype=np.float64)
        if arch.shape != want.shape or not np.array_equal(arch, want):
            found = dict(zip(ARCH_KEYS, arch.tolist())) if arch.shape == want.shape else arch
            raise DataError(f"{where} was saved with {found}, but this expert has "
                            f"{dict(zip(ARCH_KEYS, want.tolist()))}; construct the expert "
                            f"with the options the state was fitted with.")
        net = SeqNet(nv, self.opts["hidden"], self.opts["layers"])
        expected = {WEIGHT_PREFIX + k: tuple(p.shape) for k, p in net.state_dict().items()}
        given = {k: tuple(np.shape(v)) for k, v in state.items() if k.startswith(WEIGHT_PREFIX)}
        if given != expected:
            wrong = {k: {"expected": expected.get(k), "found": given.get(k)}
                     for k in sorted(set(expected) | set(given)) if expected.get(k) != given.get(k)}
            raise DataError(f"{where}: network weights do not fit {nv} variables and "
                            f"hidden={self.opts['hidden']}, layers={self.opts['layers']}: "
                            f"{wrong}.")
        weights = {k[len(WEIGHT_PREFIX):]: torch.from_numpy(
            np.ascontiguousarray(state[k], dtype=np.float32)) for k in expected}
        if not all(torch.isfinite(w).all() for w in weights.values()):
            raise DataError(f"{where} holds non-finite network weights; re-fit the expert.")
        net.load_state_dict(weights)
        net.eval()
        restored = dict(norm)
        restored["arch"] = want
        for key in sorted(need - {"arch"}):
            restored[key] = np.asarray(state[key]).copy()
        for key in expected:
            restored[key] = weights[key[len(WEIGHT_PREFIX):]].numpy().copy()
        self._state[modality.name] = restored
        self._nets[modality.name] = net
        self._fit_seconds.pop(modality.name, None)

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return fitted_state("seqssl", self._state, modality)

    # ------------------------------------------------------------------ use
    def ssl_loss(self, modality: ModalitySpec, payloads: Sequence[Any],
                 seed: int = 0) -> dict[str, float]:
        """The objective under the current weights, with a fixed seeded choice of hidden
        cells: ``{"recon", "forecast", "total"}`` (e.g. on validation stays, to check that
        the encoder generalises)."""
        self._check_kind(modality)
        self._fitted(modality)
        vals, observed = self._tensors(modality, payloads)
        gen = torch.Generator().manual_seed(int(seed))
        hide = observed & (torch.rand(observed.shape, generator=gen) < self.opts["mask_rate"])
        net = self._nets[modality.name]
        dev = next(net.parameters()).device
        with torch.inference_mode(), one_thread():
            recon, forecast = ssl_losses(net, vals.to(dev), observed.to(dev), hide.to(dev),
                                         self.step_frac)
        total = float(recon) + self.opts["forecast"] * float(forecast)
        return {"recon": float(recon), "forecast": float(forecast), "total": total}

    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, 2 * hidden] float32: mean of the GRU states over the steps, then the last."""
        self._check_kind(modality)
        vals, observed = self._tensors(modality, payloads)
        net = self._nets[modality.name].to(self._device)
        out = np.zeros((len(payloads), self.dim(modality)), dtype=np.float32)  # [N, 2H]
        with torch.inference_mode(), one_thread():
            for s in range(0, len(payloads), ENCODE_BATCH):
                rows = min(ENCODE_BATCH, len(payloads) - s)
                # pad every chunk to ENCODE_BATCH rows: kernels then see one shape, so a
                # stay's embedding does not depend on how many stays share its call
                v = torch.zeros((ENCODE_BATCH, *vals.shape[1:]))  # [E, B, V]
                m = torch.zeros((ENCODE_BATCH, *vals.shape[1:]), dtype=torch.bool)
                v[:rows], m[:rows] = vals[s:s + rows], observed[s:s + rows]
                x = model_inputs(v, m, self.step_frac)  # [E, B, 3V]
                emb = SeqNet.embed(net(x.to(self._device)))[:rows]  # [rows, 2H]
                out[s:s + rows] = emb.float().cpu().numpy()
        if not np.isfinite(out).all():
            raise DataError(f"Expert 'seqssl' produced non-finite embeddings for "
                            f"{modality.name!r}; the saved weights are damaged, re-fit.")
        return out


@hookimpl
def register_experts(register):
    register("seqssl", SeqSSLExpert)
