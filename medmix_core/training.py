"""Training and evaluation of one fuser for one seed.

:class:`TrainStep` is the one definition of a training step: AdamW with three parameter
groups (router at ``router_lr_scale`` x base), linear warm-up, gradient-norm clipping,
mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler; off on CPU),
teacher heads and distillation losses, training-time mask augmentation. :func:`train_seed`
runs it over epochs with early stopping on validation task loss and restores the
best-validation weights before testing; ``medmix profile`` times the same object, so what
is profiled is what trains. Class imbalance: with ``pos_weight=True`` the binary /
multi-label BCE weighs positives by n_neg / n_pos of the training split (per label).

Stability options (RunConfig; off by default): ``ema_decay`` (an exponential moving average
of the weights, which validation and the saved model use), ``label_smoothing`` (training
targets only), ``val_smoothing`` (early stopping on the mean validation loss of the last N
epochs). :func:`refit_seed` retrains a seed on train + validation for the epoch count that
early stopping chose.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medmix_core.batch import Batch, StoreTensors
from medmix_core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medmix_core.config import RunConfig
from medmix_core.distill import TeacherHeads, distill_weight, distillation_loss
from medmix_core.errors import MedmixError
from medmix_core.fusion import Fuser, FusionSpec
from medmix_core.metrics import best_threshold, compute_metrics, probabilities
from medmix_core.plugins import get_fuser, get_loss


def resolve_device(name: str | None = "auto") -> torch.device:
    """The one rule for ``--device`` in every command: "auto" (the default) -> the first
    CUDA GPU when torch sees one, else the CPU; "cpu"; "cuda" or "cuda:N".

    Raises:
        MedmixError: an unknown device name, CUDA without a GPU, or a GPU index that this
            machine does not have.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    head, _, index = name.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise MedmixError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N (N a GPU "
                          f"index).")
    if not torch.cuda.is_available():
        raise MedmixError(f"--device {name} was asked for, but torch sees no CUDA GPU on this "
                          f"machine. Use --device cpu or --device auto.")
    if index and int(index) >= torch.cuda.device_count():
        raise MedmixError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                          f"GPU(s), indices 0..{torch.cuda.device_count() - 1}.")
    return torch.device(name)


def make_spec(tensors: StoreTensors, families: dict[str, list[str]] | None = None) -> FusionSpec:
    """The :class:`~medmix_core.fusion.FusionSpec` of ``tensors``: their modalities, experts
    and dims in batch order, outputs, task type and teacher dims; ``families``: modality -> the
    family of each of its experts ("general", "domain", "rag")."""
    return FusionSpec(modalities=list(tensors.modalities), experts=dict(tensors.experts),
                      dims=tensors.dims(), n_outputs=tensors.n_outputs,
                      task_type=tensors.task_type, teacher_dims=tensors.teacher_dims(),
                      expert_families=families or {})


def fuser_option_names(factory: Callable) -> list[str] | None:
    """The options a fuser factory accepts (its named parameters after ``spec``), or None
    when it declares none by name and takes anything."""
    import inspect

    factory = getattr(factory, "build", factory)  # a FuserPlugin: its builder
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named and any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return named


def check_fuser_options(name: str, options: dict[str, Any]) -> None:
    """Unknown ``--fuser-options`` keys are errors that list the fuser's accepted ones."""
    accepted = fuser_option_names(get_fuser(name))
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        shown = [a for a in accepted if a not in ("d", "dropout")]
        raise MedmixError(f"--fuser-options {unknown}: not options of fuser {name!r}. It "
                          f"accepts {shown or 'no options'} (d and dropout have their own "
                          f"flags).")


def build_fuser(cfg: RunConfig, spec: FusionSpec) -> Fuser:
    """Instantiate the configured fuser plugin for ``spec``."""
    factory = get_fuser(cfg.fuser)
    check_fuser_options(cfg.fuser, cfg.fuser_options)
    options = {"d": cfg.d, "dropout": cfg.dropout, **cfg.fuser_options}
    try:
        model = factory(spec, **options)
    except TypeError as exc:
        raise MedmixError(f"Fuser {cfg.fuser!r} rejected its options {options}: {exc}. Check "
                          f"--fuser-options / fuser_options in the config.") from exc
    if not isinstance(model, Fuser):
        raise MedmixError(f"Fuser plugin {cfg.fuser!r} returned {type(model).__name__}, expected "
                          f"a medmix_core.Fuser subclass.")
    return model


def augment_masks(expert_mask: dict[str, torch.Tensor], modalities: list[str], p_modality: float,
                  p_expert: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Training-time modality and expert dropout on masks; never empties a sample or modality.

    Random numbers are drawn on the CPU so a seed gives the same masks on every device.
    """
    if p_modality <= 0 and p_expert <= 0:
        return expert_mask
    dev = next(iter(expert_mask.values())).device
    out = {}
    for m in modalities:
        em = expert_mask[m]
        if p_expert > 0:
            drop = (torch.rand(em.shape, generator=gen) < p_expert).to(dev)
            kept = em & ~drop
            out[m] = torch.where(kept.any(1, keepdim=True), kept, em)  # keep >= 1 expert
        else:
            out[m] = em
    if p_modality > 0:
        avail = torch.stack([out[m].any(1) for m in modalities], 1)  # [B, M]
        drop = (torch.rand(avail.shape, generator=gen) < p_modality).to(dev) & avail
        left = avail & ~drop
        drop &= left.any(1, keepdim=True)  # a drop that would empty the sample is skipped
        for j, m in enumerate(modalities):
            out[m] = out[m] & ~drop[:, j:j + 1]
    return out


def task_loss(logits: torch.Tensor, batch: Batch, task_type: str,
              pos_weight: torch.Tensor | None, smoothing: float = 0.0) -> torch.Tensor:
    """Masked task loss: BCE-with-logits (binary, multi-label) or cross-entropy.

    Unknown labels (NaN; -1 for a class index) add nothing: the loss is the mean over the
    known (row, label) pairs, and 0 (with a gradient graph) when none is known.
    ``smoothing`` eps > 0 trains on y (1 - eps) + eps / 2 (BCE) or with eps spread over the
    classes (cross-entropy).
    """
    labels = batch.labels
    if task_type == "multiclass":
        y = labels.reshape(-1).long()
        known = y >= 0
        if not bool(known.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float()[known], y[known], label_smoothing=smoothing)
    labels = labels.float()
    known = ~torch.isnan(labels)  # [B, C]
    if smoothing > 0:
        labels = labels * (1.0 - smoothing) + 0.5 * smoothing  # NaN stays NaN
    if bool(known.all()):
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=pos_weight)
    if not bool(known.any()):
        return logits.sum() * 0.0
    per = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(labels, nan=0.0),
                                             pos_weight=pos_weight, reduction="none")
    return (per * known).sum() / known.sum()


def check_trainable(tensors: StoreTensors, splits: dict[str, list[int]]) -> None:
    """Train and val splits must hold rows with known labels; checked before anything runs.

    Raises:
        MedmixError: naming the split, its size and how many of its labels are known.
    """
    for split in ("train", "val"):
        rows = torch.as_tensor(splits.get(split, []), dtype=torch.long)
        known = int(tensors.label_mask[rows].sum()) if len(rows) else 0
        if known == 0:
            raise MedmixError(f"The {split} split has {len(rows)} rows and {known} known "
                              f"labels; training needs known labels in both the train and the "
                              f"val split. Check the task's labels (NaN marks unknown) or the "
                              f"store's splits.")


@dataclass
class SeedResult:
    """What one seed's training produced."""

    seed: int
    model: Fuser
    best_epoch: int
    epochs_run: int
    threshold: float
    history: list[dict[str, float]] = field(default_factory=list)
    val_metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def predict_rows(model: Fuser, tensors: StoreTensors, rows: torch.Tensor, device: torch.device,
                 batch_size: int = 1024, mask: dict[str, torch.Tensor] | None = None,
                 amp: bool = True) -> dict[str, torch.Tensor]:
    """Inference over ``rows``: logits, probabilities and fusion weights, on the CPU."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {"logits": [], "modality_weights": [],
                                           "router_weights": []}
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        batch = tensors.batch(idx, mask, teacher=_reads_teacher(model)).to(device)
        with autocast_context(device, amp):
            out = model(batch)
        outs["logits"].append(out.logits.float().cpu())
        if out.modality_weights is not None:
            outs["modality_weights"].append(out.modality_weights.float().cpu())
        if out.router_weights is not None:
            outs["router_weights"].append(out.router_weights.float().cpu())
    res = {k: torch.cat(v) for k, v in outs.items() if v}
    if "logits" not in res:
        res["logits"] = torch.zeros(0, tensors.n_outputs)
    res["probs"] = probabilities(res["logits"], tensors.task_type)
    return res


def _reads_teacher(model: Fuser) -> bool:
    """Whether evaluation needs the teacher's rows (a fuser that reads them at inference)."""
    return bool(getattr(model, "uses_teacher_at_inference", False))


def autocast_context(device: torch.device, amp: bool):
    """The autocast context of training and prediction: bf16 (fp16 where the GPU lacks
    bf16) on CUDA with ``amp``; full precision on the CPU."""
    if device.type == "cuda" and amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _param_groups(model: Fuser, heads: nn.Module | None, cfg: RunConfig) -> list[dict]:
    router_ids = {id(p) for p in model.router_parameters()}
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "router": []}
    params = list(model.named_parameters())
    if heads is not None:
        params += [(f"teacher_heads.{n}", p) for n, p in heads.named_parameters()]
    for _name, p in params:
        if not p.requires_grad:
            continue
        if id(p) in router_ids:
            groups["router"].append(p)
        elif p.ndim <= 1:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    return [
        {"params": groups["decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": groups["router"], "lr": cfg.lr * cfg.router_lr_scale,
         "weight_decay": cfg.weight_decay, "name": "router"},
    ]


def _pos_weight(tensors: StoreTensors, rows: torch.Tensor, cfg: RunConfig) -> torch.Tensor | None:
    if tensors.task_type == "multiclass" or cfg.pos_weight is False:
        return None
    if cfg.pos_weight is not True:
        return torch.full((tensors.n_outputs,), float(cfg.pos_weight))
    y = tensors.labels[rows].float()  # [n, C], NaN = unknown
    known = ~torch.isnan(y)
    pos = torch.nan_to_num(y, nan=0.0).sum(0)
    neg = known.sum(0) - pos
    return torch.where(pos > 0, neg / pos.clamp_min(1.0), torch.ones_like(pos))


def resolve_distill(cfg: RunConfig) -> RunConfig:
    """``cfg`` with distillation decided as ``medmix run`` decides it.

    A fuser registered with ``reads_teacher`` (AdaCoMed) takes its teacher as an input, not
    as a target: with ``distill`` unset, distillation is off for it. Every other fuser
    distils when a teacher is named (:attr:`RunConfig.distill_on`).
    """
    if cfg.distill is None and get_fuser(cfg.fuser).reads_teacher:
        return cfg.model_copy(update={"distill": False})
    return cfg


class TrainStep:
    """One optimisation step of a fuser, as training takes it.

    Built once per model, it owns what a step needs: AdamW over the fuser (and the teacher
    heads when distillation is on) in three parameter groups (decay, no decay, router at
    ``router_lr_scale`` x base), the linear warm-up schedule, autocast and the grad scaler,
    the teacher heads and distillation losses, ``pos_weight`` of the training rows, and the
    training-time mask augmentation. :func:`train_seed` runs it over epochs; profiling times
    :meth:`update` on pre-built batches.

    Args:
        cfg: the run configuration (optimiser, loss, distillation, augmentation, amp).
        model: the fuser to train; moved to ``device``. Build it first (its initialisation
            draws from the global RNG before the teacher heads do).
        tensors: the store's tensors (with teacher embeddings when distilling).
        device: where the step runs.
        train_rows: the training rows; ``pos_weight`` and the warm-up length come from them.
        train_mask: expert masks replacing the stored ones (protocols), or None.
        seed: named in errors only.

    Attributes:
        model: the fuser, on ``device``.
        heads: the teacher projection heads (:class:`~medmix_core.distill.TeacherHeads`),
            or None without distillation.
        losses: distillation loss module -> weight.
        optimizer: AdamW over ``params``.
        scheduler: the linear warm-up (``LambdaLR``), stepped once per step.
        scaler: the grad scaler (enabled for fp16 autocast only).
        pos_weight: ``[C]`` positive-class weights of the BCE, or None.
        params: every optimised parameter, in optimizer order (what is clipped).
        ema: the :class:`WeightEMA` of the fuser's weights (``ema_decay``), or None.

    Raises:
        MedmixError: distillation is on but no teacher embeddings were loaded, or the fuser
            exposes no modality representations to distil.
    """

    def __init__(self, cfg: RunConfig, model: Fuser, tensors: StoreTensors,
                 device: torch.device, train_rows: torch.Tensor,
                 train_mask: dict[str, torch.Tensor] | None = None,
                 seed: int | None = None) -> None:
        self.cfg, self.tensors, self.device, self.seed = cfg, tensors, device, seed
        if device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal gradients slow CPU kernels by ~30 %
        self.model = model.to(device)
        self.heads: TeacherHeads | None = None
        self.losses: dict[nn.Module, float] = {}
        if cfg.distill_on:
            if tensors.teacher is None:
                raise MedmixError("Distillation is on but no teacher embeddings were loaded. "
                                  "Pass --teacher NAME (extracted into the store) or use "
                                  "--no-distill.")
            if not model.rep_dim:
                raise MedmixError(f"Fuser {cfg.fuser!r} exposes no modality representations, "
                                  f"so it cannot be distilled. Run it with --no-distill.")
            self.heads = TeacherHeads(tensors.teacher_dims(), model.rep_dim).to(device)
            for name, w in cfg.distill_losses.items():
                self.losses[get_loss(name)().to(device)] = float(w)
        # teacher embeddings travel with a batch only where something reads them
        self.reads_teacher = (self.heads is not None
                              or bool(getattr(model, "uses_teacher_at_inference", False)))

        # fused: one kernel per parameter (the CPU default runs ~8 operations per parameter
        # from Python, over ~130 small tensors: a sixth of a step at one thread)
        self.optimizer = torch.optim.AdamW(_param_groups(model, self.heads, cfg), lr=cfg.lr,
                                           betas=cfg.betas,
                                           fused=device.type in ("cpu", "cuda") or None)
        steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
        warm = max(1, int(cfg.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        use_scaler = device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        pos_weight = _pos_weight(tensors, train_rows, cfg)
        self.pos_weight = None if pos_weight is None else pos_weight.to(device)
        self.base_mask = tensors.mask if train_mask is None else train_mask
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        #: data-parallel training under torchrun: each process takes its share of each batch
        self.dp = _data_parallel(cfg)

    @property
    def full_weight_epoch(self) -> int:
        """The first epoch at which distillation has its full weight ``lambda_d_max``."""
        return self.cfg.distill_ramp_epochs

    def distill_weight(self, epoch: int) -> float:
        """lambda_D of ``epoch`` (0 without distillation)."""
        if self.heads is None:
            return 0.0
        return distill_weight(epoch, self.cfg.lambda_d_max, self.cfg.distill_ramp_epochs)

    def train(self) -> None:
        """Put the fuser and the teacher heads in training mode (evaluation leaves them in
        eval mode)."""
        self.model.train()
        if self.heads is not None:
            self.heads.train()

    def prepare(self, idx: torch.Tensor, gen: torch.Generator) -> Batch:
        """The training batch of rows ``idx``: training masks, augmented (drawing from
        ``gen``), on the device."""
        batch = self.tensors.batch(idx, self.base_mask, teacher=self.reads_teacher)
        em = augment_masks(batch.expert_mask, batch.modalities, self.cfg.modality_dropout,
                           self.cfg.expert_dropout, gen)
        return batch.with_masks(em).to(self.device)

    def update(self, batch: Batch, epoch: int) -> dict[str, float]:
        """Forward, loss, backward, clipping, optimizer and scheduler step on ``batch``.

        Args:
            batch: from :meth:`prepare`.
            epoch: sets the distillation weight lambda_D(epoch).
        Returns:
            the batch-mean losses computed: ``task`` always, ``aux`` when the fuser has
            one, ``distill`` when distillation weighs in this epoch.
        Raises:
            MedmixError: the loss is not finite.
        """
        lam = self.distill_weight(epoch)
        task_share = row_share = 1.0
        if self.dp is not None:
            batch, task_share, row_share = _local_share(batch, self.dp, self.tensors.task_type)
        with autocast_context(self.device, self.cfg.amp):
            out = self.model(batch)
            # each share weighted so the mean of the processes' gradients is the gradient
            # of the whole batch's loss (task: exactly; per-row terms: by rows)
            loss = task_share * task_loss(out.logits, batch, self.tensors.task_type,
                                          self.pos_weight, self.cfg.label_smoothing)
            rec = {"task": loss.detach()}
            if out.aux_loss is not None:
                loss = loss + row_share * out.aux_loss
                rec["aux"] = row_share * out.aux_loss.detach()
            if self.heads is not None and lam > 0:
                dl = row_share * distillation_loss(out.reps, out.rep_mask, batch.modalities,
                                                   batch.teacher, batch.teacher_mask,
                                                   self.heads, self.losses)
                loss = loss + lam * dl
                rec["distill"] = dl.detach()
        if self.dp is not None:
            loss_total = _mean_over_ranks(torch.stack([loss.detach().float()]))[0]
            rec = dict(zip(rec, _mean_over_ranks(torch.stack([v.float() for v in
                                                              rec.values()])).tolist()))
        else:
            loss_total = loss
            rec = {k: float(v) for k, v in rec.items()}
        if not torch.isfinite(loss_total):
            cfg = self.cfg
            where = f"epoch {epoch}" + ("" if self.seed is None else f" (seed {self.seed})")
            raise MedmixError(
                f"Training loss became {float(loss_total)} at {where}. Lower --lr (now "
                f"{cfg.lr:g}), check the store for extreme embedding values (`medmix "
                f"extract` re-makes a damaged store)"
                + (", or turn mixed precision off with `amp: false` in a --config file."
                   if self.device.type == "cuda" and cfg.amp else "."))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.dp is not None:
            _average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip,
                                 foreach=self.device.type in ("cpu", "cuda") or None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return rec

    def state_dict(self) -> dict[str, Any]:
        """What continues this step exactly: model, heads, optimizer, schedule, scaler, EMA."""
        return {"model": self.model.state_dict(),
                "heads": None if self.heads is None else self.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": None if self.ema is None else {"steps": self.ema.steps,
                                                      "state": self.ema.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        if self.heads is not None:
            self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.steps = int(state["ema"]["steps"])
            self.ema.module.load_state_dict(state["ema"]["state"])

    def eval_state(self) -> dict[str, torch.Tensor]:
        """The weights validation and the saved model use: the EMA's when on, else the
        model's own (a live view; copy it to keep it)."""
        return self.model.state_dict() if self.ema is None else self.ema.state_dict()

    def step(self, idx: torch.Tensor, epoch: int, gen: torch.Generator) -> dict[str, float]:
        """One training step on rows ``idx``: :meth:`prepare` then :meth:`update`."""
        return self.update(self.prepare(idx, gen), epoch)


def _data_parallel(cfg: RunConfig):
    """The torchrun context when ``cfg.data_parallel`` asks for data-parallel training and
    there are several processes; else None."""
    if not cfg.data_parallel:
        return None
    from medmix_core import distributed

    dist = distributed.context()
    return dist if dist.active else None


def _local_share(batch: Batch, dist, task_type: str) -> tuple[Batch, float, float]:
    """This process's rows of ``batch`` (every world-th from its rank) and the weights that
    make the processes' mean gradient the whole batch's: task (known labels here x world /
    known labels in the batch) and rows (rows here x world / rows)."""
    rows = torch.arange(dist.rank, batch.size, dist.world)
    if task_type == "multiclass":
        known = batch.labels.reshape(-1) >= 0  # [B]
    else:
        known = ~torch.isnan(batch.labels.float())  # [B, C]
    mine = known[rows]
    total = int(known.sum())
    task_share = (int(mine.sum()) * dist.world / total) if total else 0.0
    row_share = len(rows) * dist.world / batch.size
    return batch_rows(batch, rows), task_share, row_share


def batch_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows ``rows`` (positions in the batch) of ``batch``."""
    def pick(t):
        return None if t is None else t[rows.to(t.device)]
    return replace(batch, experts={m: [x[rows.to(x.device)] for x in xs]
                                   for m, xs in batch.experts.items()},
                   expert_mask={m: pick(x) for m, x in batch.expert_mask.items()},
                   modality_mask=pick(batch.modality_mask), labels=pick(batch.labels),
                   label_mask=pick(batch.label_mask),
                   teacher=None if batch.teacher is None else
                   {m: pick(x) for m, x in batch.teacher.items()},
                   teacher_mask=pick(batch.teacher_mask), index=pick(batch.index))


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as tdist

    values = values.clone()
    tdist.all_reduce(values)
    return values / tdist.get_world_size()


def _average_gradients(params: list[nn.Parameter]) -> None:
    """The mean gradient over the processes, in one all-reduce (what DDP computes; a
    parameter without a gradient here counts as zero, so every process sends the same)."""
    import torch.distributed as tdist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= tdist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


class WeightEMA:
    """Exponential moving average of a fuser's parameters (buffers are copied, not averaged).

    After step t the average moves toward the weights by 1 - min(decay, (1 + t) / (10 + t)),
    so early steps are not dominated by the initialisation.

    Attributes:
        module: a frozen copy of the fuser holding the averaged weights (what is evaluated).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = float(decay), 0
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        for avg, p in zip(self.module.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1.0 - d)
        for avg, b in zip(self.module.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


def _train_epoch(step: TrainStep, rows: torch.Tensor, epoch: int,
                 gen: torch.Generator) -> dict[str, float]:
    """One epoch of ``step`` over ``rows`` in a ``gen``-shuffled order: sample-mean losses."""
    step.train()
    perm = rows[torch.randperm(len(rows), generator=gen)]
    tot = {"task": 0.0, "distill": 0.0, "aux": 0.0}
    for start in range(0, len(perm), step.cfg.batch_size):
        idx = perm[start:start + step.cfg.batch_size]
        for k, v in step.step(idx, epoch, gen).items():
            tot[k] += v * len(idx)
    return {"epoch": epoch, "train_loss": tot["task"] / len(rows),
            "distill_loss": tot["distill"] / len(rows), "aux_loss": tot["aux"] / len(rows)}


def start_seed(cfg: RunConfig, spec: FusionSpec, seed: int
                ) -> tuple[torch.device, torch.Generator, Fuser]:
    """Device, threads, seeded RNGs and a freshly built fuser: how every seed starts."""
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return device, gen, build_fuser(cfg, spec).to(device)


#: RunConfig fields a checkpoint's key leaves out: outputs and threads, which do not change
#: what a seed learns, and how the data was chosen, which the fusion spec says instead
NOT_IN_KEY = ("out", "progress", "threads", "external_test", "external_dataset", "bootstrap",
              "stream",
              "dataset", "source", "dataset_options", "store", "experts", "drop_experts",
              "expert_options", "keep_modalities")


def training_key(cfg: RunConfig, spec: FusionSpec, seed: int, phase: str,
                 rows: torch.Tensor) -> str:
    """What a checkpoint belongs to: the training configuration (less
    :data:`NOT_IN_KEY`), the fusion spec (modalities, experts, dims), seed, phase ("train"
    or "refit-N") and training rows."""
    import hashlib
    import json

    conf = json.loads(cfg.model_dump_json(exclude=set(NOT_IN_KEY)))
    blob = json.dumps([conf, vars(spec), int(seed), phase, rows.tolist()], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Resumable:
    """The per-epoch checkpoint of one seed's training loop (nothing when ``path`` is None).

    ``loop`` holds the loop's own state (history, early stopping, whether it stopped);
    :meth:`save` writes it with the step's state and every RNG state, :meth:`restore` puts
    them back, so the next epoch runs as if the process had never stopped.
    """

    def __init__(self, path: str | Path | None, key: str, step: TrainStep,
                 gen: torch.Generator, loop: dict[str, Any]) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None and step.dp is not None and step.dp.rank > 0:
            # data-parallel: each process's RNGs drew for its own rows, so each keeps its own
            self.path = self.path.with_name(f"{self.path.name}.rank{step.dp.rank}")
        self.key, self.step, self.gen, self.loop = key, step, gen, loop
        self.t0 = time.perf_counter()
        self.seconds_before = 0.0

    def restore(self) -> int:
        """Load the checkpoint when there is one; the first epoch still to train."""
        if self.path is None or not self.path.is_file():
            return 0
        state = load_checkpoint(self.path)
        if state.get("key") != self.key:
            raise MedmixError(f"{self.path} is the checkpoint of another configuration, seed or "
                              f"split than this run's. Delete it (or pass --overwrite) to train "
                              f"this seed from its start.")
        self.step.load_state_dict(state["step"])
        set_rng_state(state["rng"], self.gen)
        self.loop.update(state["loop"])
        self.seconds_before = float(state["seconds"])
        return int(state["epoch"]) + 1

    def save(self, epoch: int) -> None:
        if self.path is None:
            return
        save_checkpoint(self.path, {"key": self.key, "epoch": epoch,
                                    "step": self.step.state_dict(), "rng": rng_state(self.gen),
                                    "loop": self.loop, "seconds": self.seconds()})

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0


def train_seed(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec,
               splits: dict[str, list[int]], seed: int,
               train_mask: dict[str, torch.Tensor] | None = None,
               val_mask: dict[str, torch.Tensor] | None = None,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               checkpoint: str | Path | None = None) -> SeedResult:
    """Train one model with one seed; return it with its best-validation weights.

    The best epoch minimises the validation loss (its mean over the last ``val_smoothing``
    epochs); training stops ``patience`` epochs without a new best. With ``ema_decay`` the
    averaged weights are validated and returned.

    Args:
        cfg: the run configuration.
        tensors: the store's tensors.
        spec: the fusion spec (from :func:`make_spec`).
        splits: row indices per split ("train", "val").
        seed: seeds weights, shuffling, dropout and mask augmentation.
        train_mask / val_mask: expert masks replacing the stored ones (protocols).
        on_epoch: called with each epoch's record (for progress bars).
        checkpoint: a file written atomically at the end of every epoch (model, optimizer,
            schedule, scaler, EMA, RNG states, early stopping, history); when it exists,
            training continues from it and ends bitwise as it would have without the stop
            (on the CPU).
    Raises:
        MedmixError: ``checkpoint`` belongs to another configuration, seed or split.
    """
    device, gen, model = start_seed(cfg, spec, seed)
    train_rows = torch.as_tensor(splits["train"], dtype=torch.long)
    val_rows = torch.as_tensor(splits["val"], dtype=torch.long)
    check_trainable(tensors, splits)
    step = TrainStep(cfg, model, tensors, device, train_rows, train_mask, seed)
    evaluated = model if step.ema is None else step.ema.module

    loop: dict[str, Any] = {"best": (math.inf, -1, None), "history": [], "bad": 0,
                            "stopped": False}
    key = training_key(cfg, spec, seed, "train", train_rows)
    saver = _Resumable(checkpoint, key, step, gen, loop)
    first = saver.restore()
    history = loop["history"]
    for epoch in range(first, cfg.epochs):
        if loop["stopped"]:
            break
        lam = step.distill_weight(epoch)
        rec = _train_epoch(step, train_rows, epoch, gen)
        val_loss = evaluate_loss(evaluated, tensors, val_rows, device, cfg, step.pos_weight,
                                 val_mask)
        rec.update(val_loss=val_loss, lambda_d=lam)
        history.append(rec)
        window = [h["val_loss"] for h in history[-cfg.val_smoothing:]]
        criterion = sum(window) / len(window)
        if cfg.val_smoothing > 1:
            rec["val_criterion"] = criterion
        if on_epoch is not None:
            on_epoch(rec)
        if criterion < loop["best"][0] - 1e-6:
            loop["best"] = (criterion, epoch, copy.deepcopy(step.eval_state()))
            loop["bad"] = 0
        else:
            loop["bad"] += 1
            loop["stopped"] = loop["bad"] >= cfg.patience
        saver.save(epoch)
    best = loop["best"]
    model.load_state_dict(best[2])
    # the threshold and validation metrics on the configured device, then the model to CPU
    val_pred = predict_rows(model.eval(), tensors, val_rows, device, mask=val_mask)
    model = model.cpu().eval()
    val_labels = tensors.labels[val_rows]
    thr = (best_threshold(val_pred["probs"], val_labels, tensors.task_type)
           if cfg.threshold == "val" else float(cfg.threshold))
    val_metrics = compute_metrics(val_pred["probs"], val_labels, tensors.task_type, thr)
    return SeedResult(seed, model, best[1], len(history), thr, history, val_metrics,
                      saver.seconds())


def refit_seed(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec,
               splits: dict[str, list[int]], seed: int, epochs: int, threshold: float = 0.5,
               val_metrics: dict[str, Any] | None = None,
               train_mask: dict[str, torch.Tensor] | None = None,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               checkpoint: str | Path | None = None) -> SeedResult:
    """Retrain one seed on exactly the train + validation rows for ``epochs`` epochs.

    The epoch count (and ``threshold``) come from a :func:`train_seed` run of the same seed
    on the train split: nothing is chosen on the rows trained on, so there is no early
    stopping; ``pos_weight`` and the warm-up are those of train + validation, and with
    ``ema_decay`` the averaged weights are returned.

    Args:
        cfg / tensors / spec / seed: as for :func:`train_seed`.
        splits: row indices per split; "train" and "val" are trained on.
        epochs: how many epochs (``best_epoch + 1`` of the validation run).
        threshold: the decision threshold chosen on validation before the refit.
        val_metrics: the validation run's metrics, carried into the result (the refit
            model has no held-out validation of its own).
        train_mask: expert masks replacing the stored ones on every trained row.
        on_epoch: called with each epoch's record.
        checkpoint: as for :func:`train_seed`.

    Raises:
        MedmixError: ``epochs`` < 1, or a split without known labels.
    """
    if epochs < 1:
        raise MedmixError(f"refit needs at least 1 epoch, got {epochs}; pass the validation "
                          f"run's best_epoch + 1.")
    check_trainable(tensors, splits)
    device, gen, model = start_seed(cfg, spec, seed)
    rows = torch.as_tensor(list(splits["train"]) + list(splits["val"]), dtype=torch.long)
    step = TrainStep(cfg, model, tensors, device, rows, train_mask, seed)
    loop: dict[str, Any] = {"history": []}
    key = training_key(cfg, spec, seed, f"refit-{epochs}", rows)
    saver = _Resumable(checkpoint, key, step, gen, loop)
    first = saver.restore()
    history = loop["history"]
    for epoch in range(first, epochs):
        lam = step.distill_weight(epoch)
        rec = _train_epoch(step, rows, epoch, gen)
        rec["lambda_d"] = lam
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        saver.save(epoch)
    model.load_state_dict(copy.deepcopy(step.eval_state()))
    model = model.cpu().eval()
    return SeedResult(seed, model, epochs - 1, epochs, float(threshold), history,
                      dict(val_metrics or {}), saver.seconds())


@torch.no_grad()
def evaluate_loss(model: Fuser, tensors: StoreTensors, rows: torch.Tensor, device: torch.device,
                  cfg: RunConfig, pos_weight: torch.Tensor | None,
                  mask: dict[str, torch.Tensor] | None = None) -> float:
    """Mean task loss over ``rows`` in eval mode."""
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(rows), 1024):
        idx = rows[start:start + 1024]
        batch = tensors.batch(idx, mask, teacher=_reads_teacher(model)).to(device)
        with autocast_context(device, cfg.amp):
            out = model(batch)
        total += float(task_loss(out.logits, batch, tensors.task_type, pos_weight)) * len(idx)
        n += len(idx)
    return total / max(n, 1)
