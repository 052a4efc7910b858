"""Missing-modality protocols: masks that simulate a modality going absent.

A protocol acts on expert masks only (the stored embeddings never change): dropping
modality m in sample i sets every expert of m to False in row i, so the modality mask
``mask[m].any(1)`` becomes False there. Inputs are never mutated; new tensors are returned.

Protocols (``p`` / ``r`` is :attr:`Protocol.rate`):

* ``natural``: identity, the data's own missingness.
* ``train-one`` / ``test-one``: the named modality is dropped with probability ``p`` in
  each sample where it is available.
* ``train-random`` / ``test-random``: with probability ``r`` a sample loses ONE modality,
  chosen uniformly among its available ones. ``r = 1.0`` means every sample with at least
  two available modalities loses exactly one; a sample with a single modality keeps it
  under ``keep_last`` (loses it otherwise); a sample with none is unchanged.
* ``train-bernoulli`` / ``test-bernoulli``: each available modality is dropped
  independently with probability ``r``.
* ``mar``: the named modality is dropped with ``p_i = sigmoid(b + strength * z_i)``, z the
  covariate standardised over the eligible rows. Positive strength: dropped more often in
  samples with a HIGHER covariate (e.g. older patients).
* ``mnar``: as ``mar`` with ``z_i = 1 - 2 y_i`` for a binary outcome y (1 = positive, e.g.
  death). Positive strength: dropped more often in NEGATIVE samples (y = 0, e.g.
  survivors, who get fewer tests); negative strength: more often in positive samples.

For ``mar``/``mnar`` the intercept ``b`` is ``logit(rate)`` when ``calibrate`` is False;
with ``calibrate`` (default) it is solved so that the expected drop rate over the eligible
rows is exactly ``rate`` for every strength, so mechanisms are compared at equal amounts
of missingness (for strength 0 both give ``b = logit(rate)``).

``keep_last`` (default True): a drop never removes a sample's last available modality.
For ``*-one``/``mar``/``mnar`` a sample whose only modality is the target is skipped (not
eligible); ``*-random`` skips single-modality samples; ``*-bernoulli``, when every
available modality of a sample is drawn, keeps the one with the largest draw (so, with n
available modalities, each is dropped with probability ``r - r**n / n``, symmetric in the
modalities).

Determinism: one CPU ``torch.Generator`` seeded with ``seed`` draws a float64 matrix
``U [N, M + 1]`` for ALL rows, row by row, before anything else; decisions read fixed
columns (``U[:, j]`` for modality j; ``U[:, M]`` for the ``*-random`` drop decision and
``U[:, 0]`` for its choice). Hence masks depend only on (masks, protocol, seed), not on the
device, thread count or ``rows``; and for a fixed seed the drops at a smaller rate are a
subset of those at a larger rate (common random numbers across a rate sweep).
"""

from __future__ import annotations

import difflib
import math
from typing import Literal

import pydantic
import torch

from medmix_core.errors import DataError, MedmixError

ProtocolName = Literal["natural", "train-one", "test-one", "train-random", "test-random",
                       "train-bernoulli", "test-bernoulli", "mar", "mnar"]
PROTOCOL_NAMES: tuple[str, ...] = ProtocolName.__args__  # type: ignore[attr-defined]
_TARGETED = ("train-one", "test-one", "mar", "mnar")  # protocols that drop one named modality
#: covariate name that ``apply_protocol`` computes itself: available modalities per sample
N_AVAILABLE = "n_available"


class ProtocolError(MedmixError):
    """A protocol that is malformed or does not fit the data it is applied to."""


class Protocol(pydantic.BaseModel, extra="forbid"):
    """One missing-modality protocol (see the module docstring for the semantics).

    Attributes:
        name: which protocol.
        rate: p (``*-one``, ``mar``, ``mnar``) or r (``*-random``, ``*-bernoulli``), in [0, 1].
        modality: the modality dropped by ``*-one``, ``mar``, ``mnar`` (required there,
            forbidden elsewhere).
        strength: ``mar``/``mnar`` dependence strength (logit units per unit of z).
        covariate: ``mar`` only: name of the observed covariate (``"n_available"`` is
            computed from the masks; any other name needs its values at apply time).
        keep_last: never remove a sample's last available modality.
        calibrate: ``mar``/``mnar``: solve the intercept so the mean drop rate is ``rate``.
    """

    name: ProtocolName
    rate: float = 0.0
    modality: str | None = None
    strength: float = 0.0
    covariate: str | None = None
    keep_last: bool = True
    calibrate: bool = True

    @pydantic.model_validator(mode="after")
    def _check(self) -> Protocol:
        if not (math.isfinite(self.rate) and 0.0 <= self.rate <= 1.0):
            raise ProtocolError(f"Protocol {self.name!r}: rate must be in [0, 1], got "
                                f"{self.rate}. Pass a probability, e.g. 0.3.")
        if not math.isfinite(self.strength):
            raise ProtocolError(f"Protocol {self.name!r}: strength must be finite, got "
                                f"{self.strength}.")
        if self.name in _TARGETED and self.modality is None:
            raise ProtocolError(f"Protocol {self.name!r} drops one named modality but none "
                                f"was given. Set modality=... (or use parse_protocols to "
                                f"expand it over every modality).")
        if self.name not in _TARGETED and self.modality is not None:
            raise ProtocolError(f"Protocol {self.name!r} does not take a modality (got "
                                f"{self.modality!r}); only {list(_TARGETED)} do.")
        if self.name == "mar" and self.covariate is None:
            raise ProtocolError("Protocol 'mar' needs an observed covariate: set "
                                f"covariate='age' (and pass its values) or "
                                f"covariate={N_AVAILABLE!r}.")
        if self.name != "mar" and self.covariate is not None:
            raise ProtocolError(f"Protocol {self.name!r} does not take a covariate (got "
                                f"{self.covariate!r}); only 'mar' does.")
        if self.name not in ("mar", "mnar") and self.strength != 0.0:
            raise ProtocolError(f"Protocol {self.name!r} does not take a strength (got "
                                f"{self.strength}); only 'mar' and 'mnar' do.")
        return self

    @property
    def phase(self) -> Literal["none", "train", "test", "both"]:
        """Which splits the protocol is meant for: mar/mnar model the population (both)."""
        if self.name == "natural":
            return "none"
        if self.name.startswith("train-"):
            return "train"
        if self.name.startswith("test-"):
            return "test"
        return "both"


def describe(protocol: Protocol) -> str:
    """A short label for tables, e.g. ``test-one(cxr, p=0.3)`` or ``test-random(r=0.5)``.

    Args:
        protocol: the protocol.

    Returns:
        The label; ``natural`` for the identity protocol.
    """
    p = protocol
    if p.name == "natural":
        return "natural"
    parts: list[str] = []
    if p.modality is not None:
        parts.append(p.modality)
    symbol = "r" if p.name.endswith(("-random", "-bernoulli")) else "p"
    parts.append(f"{symbol}={p.rate:g}")
    if p.name == "mar":
        parts.append(f"cov={p.covariate}")
    if p.name in ("mar", "mnar"):
        parts.append(f"s={p.strength:g}")
        if not p.calibrate:
            parts.append("uncalibrated")
    if not p.keep_last:
        parts.append("may empty")
    return f"{p.name}({', '.join(parts)})"


def parse_protocols(protocol: str, rates: list[float], modalities: list[str],
                    modality: str | None = None, strength: float = 0.0,
                    covariate: str | None = None, keep_last: bool = True) -> list[Protocol]:
    """Expand a protocol name and a rate list into concrete protocols.

    ``*-one``, ``mar`` and ``mnar`` with ``modality=None`` mean "each modality in turn".

    Args:
        protocol: a protocol name (see ``PROTOCOL_NAMES``).
        rates: rates to sweep; ignored for ``natural``.
        modalities: the data's modalities, in order.
        modality: one modality to drop, or None for each in turn (targeted protocols only).
        strength: ``mar``/``mnar`` strength.
        covariate: ``mar`` covariate name.
        keep_last: see :class:`Protocol`.

    Returns:
        Protocols ordered modality-major, then by rate as given.
    """
    if protocol not in PROTOCOL_NAMES:
        close = difflib.get_close_matches(protocol, PROTOCOL_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProtocolError(f"Unknown protocol {protocol!r}; known: "
                            f"{', '.join(PROTOCOL_NAMES)}.{hint}")
    if protocol == "natural":
        return [Protocol(name="natural")]
    if not rates:
        raise ProtocolError(f"Protocol {protocol!r} needs at least one rate, e.g. "
                            f"0.3,0.5,0.7; got none.")
    if protocol in _TARGETED:
        if modality is not None:
            _check_modality(modality, modalities)
        targets: list[str | None] = list(modalities) if modality is None else [modality]
    else:
        if modality is not None:
            raise ProtocolError(f"Protocol {protocol!r} drops among all modalities and "
                                f"takes no modality (got {modality!r}); only "
                                f"{list(_TARGETED)} do.")
        targets = [None]
    extra: dict = {"keep_last": keep_last}
    if protocol in ("mar", "mnar"):
        extra["strength"] = strength
    if protocol == "mar":
        extra["covariate"] = covariate
    return [Protocol(name=protocol, rate=float(r), modality=t, **extra)
            for t in targets for r in rates]


def _check_modality(name: str, modalities: list[str]) -> int:
    if name not in modalities:
        close = difflib.get_close_matches(name, modalities, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProtocolError(f"Unknown modality {name!r}; the data has modalities "
                            f"{list(modalities)}.{hint}")
    return modalities.index(name)


def _row_selector(rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """``rows`` (indices [R] or bool [N]) as a CPU bool [N]; all True when None."""
    if rows is None:
        return torch.ones(n, dtype=torch.bool)
    rows = rows.detach().cpu()
    if rows.dtype == torch.bool:
        if rows.shape != (n,):
            raise DataError(f"rows as a bool mask must have shape [{n}], got "
                            f"{list(rows.shape)}.")
        return rows.clone()
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dim() != 1:
        raise DataError(f"rows must be integer indices [R] or a bool mask [{n}], got "
                        f"dtype {rows.dtype} and shape {list(rows.shape)}.")
    rows = rows.long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise DataError(f"rows must index 0..{n - 1}; got values in "
                        f"[{int(rows.min())}, {int(rows.max())}].")
    sel = torch.zeros(n, dtype=torch.bool)
    sel[rows] = True
    return sel


def _check_masks(expert_mask: dict[str, torch.Tensor], modalities: list[str]) -> int:
    """Validate the mask dict against ``modalities``; return N."""
    if not modalities:
        raise ProtocolError("A protocol needs at least one modality; got an empty list.")
    if len(set(modalities)) != len(modalities):
        raise ProtocolError(f"Modalities must be distinct; got {list(modalities)}.")
    if set(expert_mask) != set(modalities):
        raise ProtocolError(f"The expert masks cover modalities {sorted(expert_mask)} but "
                            f"the protocol was given {list(modalities)}; pass the same set "
                            f"(e.g. StoreTensors.mask and StoreTensors.modalities).")
    n = None
    for m in modalities:
        k = expert_mask[m]
        if not isinstance(k, torch.Tensor) or k.dtype != torch.bool or k.dim() != 2:
            what = (f"dtype {k.dtype}, shape {list(k.shape)}" if isinstance(k, torch.Tensor)
                    else type(k).__name__)
            raise DataError(f"Expert mask of modality {m!r} must be a bool tensor [N, K_m]; "
                            f"got {what}.")
        if n is None:
            n = int(k.shape[0])
        elif int(k.shape[0]) != n:
            raise DataError(f"Expert masks disagree on N: {modalities[0]!r} has {n} rows, "
                            f"{m!r} has {int(k.shape[0])}.")
    assert n is not None
    return n


def _vector(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """A [N] or [N, 1] tensor as a CPU float64 [N]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{what} must be a tensor [N]; got {type(x).__name__}.")
    x = x.detach().cpu()
    if x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.shape != (n,):
        raise DataError(f"{what} must have shape [{n}] (one value per sample, "
                        f"[N, 1] also accepted); got {list(x.shape)}.")
    return x.to(torch.float64)


def _intercept(rate: float, strength: float, z: torch.Tensor, calibrate: bool) -> float:
    """b with ``mean(sigmoid(b + strength * z)) == rate`` (bisection), or logit(rate)."""
    if not calibrate or strength == 0.0 or z.numel() == 0:
        return math.log(rate / (1.0 - rate))
    sz = strength * z
    lo = math.log(rate / (1.0 - rate)) - abs(strength) * float(z.abs().max()) - 1.0
    hi = math.log(rate / (1.0 - rate)) + abs(strength) * float(z.abs().max()) + 1.0
    for _ in range(200):  # mean is increasing in b; 200 halvings reach float64 precision
        mid = 0.5 * (lo + hi)
        if float(torch.sigmoid(mid + sz).mean()) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def apply_protocol(expert_mask: dict[str, torch.Tensor], modalities: list[str],
                   protocol: Protocol, seed: int, rows: torch.Tensor | None = None,
                   covariate: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Apply a protocol to expert masks; inputs are left untouched.

    Args:
        expert_mask: modality -> ``[N, K_m]`` bool, True = expert present.
        modalities: the modalities, in a fixed order (column j of the draws is modality j).
        protocol: what to apply.
        seed: seeds the CPU generator; same seed, same masks on every machine.
        rows: indices ``[R]`` or bool ``[N]``: only these rows can change (e.g. the test
            split); None = all rows.
        covariate: ``mar``: ``[N]`` observed covariate values (finite on the eligible
            rows); not needed for ``covariate="n_available"``.
        labels: ``mnar``: ``[N]`` (or ``[N, 1]``) binary outcome, 0/1 on the eligible rows.

    Returns:
        modality -> new ``[N, K_m]`` bool masks, on the input masks' devices.
    """
    n = _check_masks(expert_mask, modalities)
    p = protocol
    target = _check_modality(p.modality, modalities) if p.modality is not None else None
    out = {m: expert_mask[m].detach().cpu().clone() for m in modalities}
    if p.name != "natural":
        mods = len(modalities)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        u = torch.rand((n, mods + 1), generator=gen, dtype=torch.float64)  # [N, M + 1]
        avail = torch.stack([out[m].any(dim=1) for m in modalities], dim=1)  # [N, M]
        n_avail = avail.sum(dim=1)  # [N]
        sel = _row_selector(rows, n)
        if p.name.endswith("-one") or p.name in ("mar", "mnar"):
            drop = _targeted_drop(p, target, u, avail, n_avail, sel, covariate, labels)
        elif p.name.endswith("-random"):
            drop = _random_drop(p, u, avail, n_avail, sel)
        else:
            drop = _bernoulli_drop(p, u, avail, sel)
        for j, m in enumerate(modalities):
            out[m][drop[:, j]] = False
    return {m: out[m].to(expert_mask[m].device) for m in modalities}


def _targeted_drop(p: Protocol, j: int, u: torch.Tensor, avail: torch.Tensor,
                   n_avail: torch.Tensor, sel: torch.Tensor, covariate: torch.Tensor | None,
                   labels: torch.Tensor | None) -> torch.Tensor:
    """``*-one``/``mar``/``mnar``: drop modality j with a per-row probability."""
    n, mods = avail.shape
    eligible = sel & avail[:, j]
    if p.keep_last:
        eligible &= n_avail >= 2
    prob = torch.full((n,), p.rate, dtype=torch.float64)  # [N]
    if p.name in ("mar", "mnar"):
        z = _dependence(p, n, eligible, n_avail, covariate, labels)  # validates even at 0/1
        if 0.0 < p.rate < 1.0:
            b = _intercept(p.rate, p.strength, z[eligible], p.calibrate)
            prob = torch.sigmoid(b + p.strength * z)
    drop = torch.zeros((n, mods), dtype=torch.bool)
    drop[:, j] = eligible & (u[:, j] < prob)
    return drop


def _dependence(p: Protocol, n: int, eligible: torch.Tensor, n_avail: torch.Tensor,
                covariate: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
    """z [N] for mar (standardised covariate over eligible rows) or mnar (1 - 2y)."""
    z = torch.zeros(n, dtype=torch.float64)
    if p.name == "mnar":
        if labels is None:
            raise ProtocolError("Protocol 'mnar' depends on the outcome: pass labels=[N] "
                                "binary outcomes (0/1) for the rows it applies to.")
        y = _vector(labels, n, "mnar labels")[eligible]
        bad = ~((y == 0) | (y == 1))
        if bool(bad.any()):
            raise DataError(f"mnar labels must be 0 or 1 on the rows the protocol applies "
                            f"to; found {int(bad.sum())} other values (e.g. "
                            f"{float(y[bad][0])}). Restrict rows to labelled samples or "
                            f"binarise a multi-class/multi-label outcome first.")
        z[eligible] = 1.0 - 2.0 * y
        return z
    if covariate is None:
        if p.covariate != N_AVAILABLE:
            raise ProtocolError(f"Protocol 'mar' uses covariate {p.covariate!r}: pass its "
                                f"values as covariate=[N], or use covariate="
                                f"{N_AVAILABLE!r} (computed from the masks).")
        covariate = n_avail
    c = _vector(covariate, n, f"mar covariate {p.covariate!r}")[eligible]
    if not bool(torch.isfinite(c).all()):
        raise DataError(f"mar covariate {p.covariate!r} has {int((~torch.isfinite(c)).sum())}"
                        f" non-finite values on the rows the protocol applies to; impute "
                        f"it or restrict rows to samples where it is observed.")
    if c.numel() == 0:
        return z
    sd = float(c.std(unbiased=False))
    if sd == 0.0:
        if p.strength != 0.0:
            raise DataError(f"mar covariate {p.covariate!r} is constant ({float(c[0])}) on "
                            f"the rows the protocol applies to, so the drop cannot depend on "
                            f"it; choose another covariate or strength=0.")
        return z
    z[eligible] = (c - c.mean()) / sd
    return z


def _random_drop(p: Protocol, u: torch.Tensor, avail: torch.Tensor, n_avail: torch.Tensor,
                 sel: torch.Tensor) -> torch.Tensor:
    """``*-random``: with probability r drop one available modality, chosen uniformly."""
    mods = avail.shape[1]
    eligible = sel & (n_avail >= (2 if p.keep_last else 1)) & (u[:, mods] < p.rate)
    # k-th available modality, k = floor(u * n_avail); clamp guards u * n == n in float
    k = (u[:, 0] * n_avail).floor().long().clamp(max=mods - 1)
    k = torch.minimum(k, (n_avail - 1).clamp(min=0))
    rank = avail.long().cumsum(dim=1) - 1  # [N, M] rank among the available ones
    return eligible[:, None] & avail & (rank == k[:, None])


def _bernoulli_drop(p: Protocol, u: torch.Tensor, avail: torch.Tensor,
                    sel: torch.Tensor) -> torch.Tensor:
    """``*-bernoulli``: each available modality dropped with probability r."""
    mods = avail.shape[1]
    uu = u[:, :mods]
    drop = sel[:, None] & avail & (uu < p.rate)  # [N, M]
    if p.keep_last:
        emptied = sel & avail.any(dim=1) & (drop == avail).all(dim=1)
        # keep the available modality with the largest draw: uniform among them
        keep = uu.masked_fill(~avail, -1.0).argmax(dim=1)
        drop[emptied, keep[emptied]] = False
    return drop


def impute_expert_embeddings(emb: dict[str, list[torch.Tensor]],
                             expert_mask: dict[str, torch.Tensor],
                             method: Literal["zero", "mean"],
                             train_rows: torch.Tensor,
                             ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Imputation baselines: fill masked expert embeddings and mark everything present.

    Args:
        emb: modality -> K_m tensors ``[N, d_k]``.
        expert_mask: modality -> ``[N, K_m]`` bool (after any protocol).
        method: ``"zero"`` fills zeros; ``"mean"`` fills the mean of that expert over the
            training rows where it is present.
        train_rows: indices ``[R]`` or bool ``[N]`` of the training split (the only rows
            the mean may see).

    Returns:
        (new embeddings, all-True masks): a fuser then treats imputed values as observed.
    """
    if method not in ("zero", "mean"):
        raise ProtocolError(f"Unknown imputation method {method!r}; known: 'zero', 'mean'.")
    if set(emb) != set(expert_mask):
        raise DataError(f"Embeddings cover modalities {sorted(emb)} but masks cover "
                        f"{sorted(expert_mask)}; pass the same set.")
    mods = list(expert_mask)
    n = _check_masks(expert_mask, mods) if mods else 0
    sel = _row_selector(train_rows, n)
    new_emb: dict[str, list[torch.Tensor]] = {}
    new_mask: dict[str, torch.Tensor] = {}
    for m in mods:
        k_mask = expert_mask[m]
        if len(emb[m]) != k_mask.shape[1]:
            raise DataError(f"Modality {m!r}: {len(emb[m])} expert embeddings but the mask "
                            f"has {k_mask.shape[1]} columns.")
        filled = []
        for k, x in enumerate(emb[m]):
            if x.dim() != 2 or x.shape[0] != n:
                raise DataError(f"Modality {m!r} expert {k}: embeddings must be [{n}, d_k], "
                                f"got {list(x.shape)}.")
            present = k_mask[:, k].to(x.device)  # [N]
            if method == "zero":
                fill = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
            else:
                use = present & sel.to(x.device)
                if not bool(use.any()):
                    raise DataError(f"Modality {m!r} expert {k} is present in no training "
                                    f"row, so its training mean is undefined; use "
                                    f"method='zero' or a protocol that keeps it in training.")
                fill = x[use].to(torch.float64).mean(dim=0)  # [d_k]
                if not bool(torch.isfinite(fill).all()):
                    raise DataError(f"Modality {m!r} expert {k}: non-finite values in present "
                                    f"training embeddings; the store is corrupt, re-extract.")
                fill = fill.to(x.dtype)
            filled.append(torch.where(present[:, None], x, fill[None, :]))  # [N, d_k]
        new_emb[m] = filled
        new_mask[m] = torch.ones_like(k_mask)
    return new_emb, new_mask
