"""The seeds of a run trained together: one vectorised model, equal to training each alone.

:func:`train_seeds_together` trains S seeds of one configuration at once. Each seed is
built exactly as :func:`~medmix_core.training.train_seed` builds it (the same
:class:`~medmix_core.training.TrainStep`, so the same initial weights, teacher heads,
``pos_weight`` and errors); the S fusers' parameters are then stacked along a leading seed
dimension and one forward runs them all through ``torch.func.vmap`` over
``torch.func.functional_call``. What differs between seeds stays per seed:

* data order and mask augmentation: each seed's own ``torch.Generator``, drawn in the order
  ``train_seed`` draws it (the epoch's ``randperm``, then each batch's augmentation);
* dropout: ``train_seed`` draws it from the global RNG. Each seed keeps its own generator,
  started from the global state right after its model and heads were built, and every
  ``torch.nn.functional.dropout`` call of the forward (``nn.Dropout`` modules and the
  attention dropout of ``nn.MultiheadAttention`` alike) takes a mask drawn outside vmap
  exactly as the CPU kernel draws it (``bernoulli_(1 - p)``, divided by ``1 - p``). The
  mask shapes come from a recording forward that draws nothing (cached per batch size);
* losses (task, aux, distillation) per seed outside vmap, as ``TrainStep.update`` computes
  them; their sum is backpropagated (the seeds' parameters are disjoint slices);
* gradient clipping per seed (one norm over that seed's parameters), AdamW per seed (it is
  elementwise; a parameter without a gradient in a seed's step is skipped for that seed,
  as ``torch.optim.AdamW`` skips it), the warm-up schedule, the weight EMA;
* validation loss, best epoch, early stopping: per seed. A seed that stops leaves the stack,
  so it costs nothing afterwards.

On the CPU the result equals ``train_seed`` seed by seed up to float rounding (batched and
single matrix products sum in different orders): same best epoch and history, test metrics
equal to ~1e-6. On CUDA each seed is trained with its own streams but the dropout masks are
not the fused CUDA kernel's, so seeds are equivalent, not equal, to sequential training.

:func:`together_blocker` says, before training, whether a configuration can be vectorised
(a short trial forward under vmap plus static checks); a fuser with data-dependent control
flow (``.item()``, ``bool()`` of a tensor, shapes that depend on values), random numbers
other than dropout, buffers written during the forward, or fp16 mixed precision with a grad
scaler is trained seed after seed by the caller.

With ``checkpoint`` a file path, the whole stacked state is written there atomically after
every epoch; a run that finds the file resumes from it and ends bitwise where an
uninterrupted run ends (on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from medmix_core.batch import Batch, StoreTensors
from medmix_core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medmix_core.config import RunConfig
from medmix_core.distill import distill_weight, distillation_loss
from medmix_core.errors import MedmixError
from medmix_core.fusion import FusionSpec
from medmix_core.metrics import best_threshold, compute_metrics
from medmix_core.plugins import get_fuser
from medmix_core.stream import rows_of, take_rows
from medmix_core.training import (
    NOT_IN_KEY,
    SeedResult,
    TrainStep,
    augment_masks,
    autocast_context,
    build_fuser,
    check_trainable,
    predict_rows,
    resolve_device,
    start_seed,
    task_loss,
)

#: rows of one validation chunk, as evaluate_loss / predict_rows take them
EVAL_BATCH = 1024
CHECKPOINT_KIND = "medmix-seeds-together"

# ----------------------------------------------------------------------------- dropout feed


class _Blocked(MedmixError):
    """A configuration that cannot be vectorised; the message is the reason."""


class _DropoutFeed:
    """Where the patched ``F.dropout`` reads its masks (or records its calls)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None: not patched | "record" | "apply"
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...], float, torch.dtype]] = []
        self.masks: list[torch.Tensor] = []
        self.pos = 0


_FEED = _DropoutFeed()
_ORIGINAL_DROPOUT = F.dropout


def _fed_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
                 inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` with the noise taken from :data:`_FEED` instead of the global RNG."""
    if _FEED.mode is None:
        return _ORIGINAL_DROPOUT(input, p, training, inplace)
    if not training or p == 0 or input.numel() == 0:
        return input  # the CPU kernel draws nothing then either
    if _FEED.mode == "record":
        _FEED.calls.append((tuple(input.shape), tuple(input.stride()), float(p), input.dtype))
        return input
    if _FEED.pos >= len(_FEED.masks):
        raise MedmixError("The vectorised forward called dropout more often than its recording "
                          "pass did (its dropout depends on the data). Train this fuser with "
                          "--sequential.")
    mask = _FEED.masks[_FEED.pos]
    _FEED.pos += 1
    if tuple(mask.shape) != tuple(input.shape):
        raise MedmixError(f"The vectorised forward's dropout call {_FEED.pos} has shape "
                          f"{tuple(input.shape)}, its recording pass had {tuple(mask.shape)}. "
                          f"Train this fuser with --sequential.")
    return input * mask


@contextlib.contextmanager
def _feeding(mode: str, masks: list[torch.Tensor] | None = None):
    """Route every ``torch.nn.functional.dropout`` call through :data:`_FEED`."""
    F.dropout = _fed_dropout  # nn.Dropout and multi_head_attention_forward look it up here
    _FEED.mode, _FEED.calls, _FEED.masks, _FEED.pos = mode, [], list(masks or []), 0
    try:
        yield _FEED
    finally:
        F.dropout = _ORIGINAL_DROPOUT
        _FEED.mode = None


def _draw_masks(calls, gen: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """The noise tensors F.dropout would draw for ``calls`` from ``gen``, in call order."""
    out = []
    for shape, stride, p, dtype in calls:
        noise = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        if p == 1:
            noise.zero_()
        else:
            noise.bernoulli_(1 - p, generator=gen)
            noise.div_(1 - p)
        out.append(noise)
    return out


# ----------------------------------------------------------------------------- batches as trees


def _batch_tree(b: Batch) -> dict[str, Any]:
    """The tensors of a batch as a pytree vmap can map over (None fields left out)."""
    tree: dict[str, Any] = {"experts": b.experts, "expert_mask": b.expert_mask,
                            "modality_mask": b.modality_mask}
    for k in ("labels", "label_mask", "teacher", "teacher_mask", "index"):
        v = getattr(b, k)
        if v is not None:
            tree[k] = v
    return tree


def _tree_batch(tree: dict[str, Any], modalities: list[str]) -> Batch:
    return Batch(experts=tree["experts"], expert_mask=tree["expert_mask"],
                 modality_mask=tree["modality_mask"], labels=tree.get("labels"),
                 label_mask=tree.get("label_mask"), teacher=tree.get("teacher"),
                 teacher_mask=tree.get("teacher_mask"), index=tree.get("index"),
                 modalities=list(modalities))


def _seed_view(tree: dict[str, Any], i: int, modalities: list[str]) -> Batch:
    """Seed ``i``'s batch out of a stacked tree (views, no copy)."""
    return _tree_batch(torch.utils._pytree.tree_map(lambda t: t[i], tree), modalities)


def _out_dict(out) -> dict[str, torch.Tensor]:
    d = {"logits": out.logits}
    for k in ("reps", "rep_mask", "aux_loss"):
        v = getattr(out, k)
        if v is not None:
            d[k] = v
    return d


# ----------------------------------------------------------------------------- the vector model


class _Vectorised:
    """S fusers of one architecture as stacked tensors, run by one vmapped forward."""

    def __init__(self, template: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], modalities: list[str]) -> None:
        self.template, self.params, self.buffers = template, params, buffers
        self.modalities = modalities
        self._calls: dict[int, list] = {}  # batch size -> recorded dropout calls

    def _fn(self, params, buffers, tree, masks):
        _FEED.masks, _FEED.pos = list(masks), 0
        out = functional_call(self.template, (params, buffers),
                              (_tree_batch(tree, self.modalities),))
        return _out_dict(out)

    def dropout_calls(self, tree: dict[str, Any], size: int) -> list:
        """The dropout calls of a training forward on ``size`` rows (recorded once)."""
        if size not in self._calls:
            self.template.train()
            before = torch.get_rng_state()
            p0 = {k: v[0] for k, v in self.params.items()}
            b0 = {k: v[0] for k, v in self.buffers.items()}
            saved = {k: v.clone() for k, v in b0.items()}
            with torch.no_grad(), _feeding("record") as feed:
                functional_call(self.template, (p0, b0), (_seed_view(tree, 0, self.modalities),))
                calls = list(feed.calls)
            if not torch.equal(before, torch.get_rng_state()):
                raise _Blocked("its training forward draws from the global RNG other than "
                               "through torch.nn.functional.dropout (e.g. attention dropout "
                               "inside scaled_dot_product_attention), which vmap cannot give "
                               "each seed")
            for k, v in saved.items():
                b0[k].copy_(v)  # a recording pass must leave no trace
            self._calls[size] = calls
        return self._calls[size]

    def forward(self, tree: dict[str, Any], batched: bool, train: bool,
                masks: list[torch.Tensor] | None = None,
                params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Outputs ``[S, ...]``; ``tree`` stacked (``batched``) or shared by every seed."""
        self.template.train(train)
        params = self.params if params is None else params
        fn = vmap(self._fn, in_dims=(0, 0, 0 if batched else None, 0), randomness="error")
        with _feeding("apply"), warnings.catch_warnings():
            # eval-mode nn.MultiheadAttention has no batching rule: vmap loops over the seeds
            warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule")
            return fn(params, self.buffers, tree, masks or [])


# ----------------------------------------------------------------------------- AdamW per seed


class _SeedAdamW:
    """AdamW over stacked parameters, per seed: ``torch.optim.AdamW``'s fused update (what
    :class:`~medmix_core.training.TrainStep` asks for) applied to every seed's slice, with a
    step count per seed and parameter so that a parameter without a gradient in a seed's
    step is skipped for that seed exactly as torch skips it."""

    def __init__(self, groups: dict[str, dict], betas: tuple[float, float],
                 eps: float = 1e-8) -> None:
        self.groups = groups  # param name -> {"lr": base lr, "weight_decay": wd}
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, params: dict[str, torch.Tensor], used: dict[str, torch.Tensor],
             factor: float) -> None:
        """One step; ``used[name]``: ``[S]`` bool, the seeds whose step gave it a gradient;
        ``factor``: the warm-up's multiplier of the base learning rates."""
        b1, b2 = self.beta1, self.beta2
        # parameters whose every seed steps, at the same count: one fused update per
        # (lr, weight decay, step) bucket, as torch's fused AdamW updates a group
        buckets: dict[tuple[float, float, int], list[str]] = {}
        for name, p in params.items():
            if name not in self.groups or p.grad is None:
                continue
            g = self.groups[name]
            lr = g["lr"] * factor  # what LambdaLR sets: base_lr * lambda(step)
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {"exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p),
                                         "step": torch.zeros(p.shape[0], dtype=torch.long)}
            u = used.get(name)
            steps = st["step"]
            if (u is None or bool(u.all())) and bool((steps == steps[0]).all()):
                steps += 1
                buckets.setdefault((lr, g["weight_decay"], int(steps[0])), []).append(name)
                continue
            seeds = [int(i) for i in torch.nonzero(u).flatten()] if u is not None \
                else range(p.shape[0])
            with torch.no_grad():  # seeds out of step with each other: one slice at a time
                for i in seeds:
                    steps[i] += 1
                    self._update([p[i]], [p.grad[i]], [st["exp_avg"][i]],
                                 [st["exp_avg_sq"][i]], int(steps[i]), lr,
                                 g["weight_decay"], b1, b2)
        with torch.no_grad():
            for (lr, wd, step), names in buckets.items():
                self._update([params[n] for n in names], [params[n].grad for n in names],
                             [self.state[n]["exp_avg"] for n in names],
                             [self.state[n]["exp_avg_sq"] for n in names], step, lr, wd, b1, b2)

    def _update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, wd, b1, b2) -> None:
        # torch.optim.AdamW(fused=True)'s kernel: element by element, so a stacked tensor
        # gets exactly the update each seed's own tensor would
        steps = [torch.tensor(float(step), device=params[0].device) for _ in params]
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                            lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=self.eps,
                            maximize=False)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep the state of the seeds at positions ``idx`` only."""
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq", "step"):
                st[k] = st[k][idx.to(st[k].device)].clone()


# ----------------------------------------------------------------------------- blocker


_BLOCKERS: dict[str, str | None] = {}


def _blocker_key(cfg: RunConfig, spec: FusionSpec) -> str:
    parts = {"fuser": cfg.fuser, "options": cfg.fuser_options, "d": cfg.d,
             "dropout": cfg.dropout, "distill": cfg.distill_on, "device": cfg.device,
             "amp": cfg.amp, "modalities": spec.modalities, "dims": spec.dims,
             "teacher": spec.teacher_dims, "outputs": spec.n_outputs, "task": spec.task_type}
    return json.dumps(parts, sort_keys=True, default=str)


def together_blocker(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec) -> str | None:
    """Why the seeds of ``cfg`` cannot be trained as one vectorised model, or None if they can.

    Static checks (a fuser whose options the runner chooses by candidates, fp16 mixed
    precision with a grad scaler) and a trial: two freshly built fusers stacked, a recording
    forward and a vmapped training forward and backward on a few rows, and the vmapped
    evaluation forward compared with each fuser's own. Decisions are cached per fuser,
    options and spec. The global RNG is left as it was.
    """
    key = _blocker_key(cfg, spec)
    if key not in _BLOCKERS:
        _BLOCKERS[key] = _static_blocker(cfg) or _trial_blocker(cfg, tensors, spec)
    return _BLOCKERS[key]


def _static_blocker(cfg: RunConfig) -> str | None:
    plugin = get_fuser(cfg.fuser)
    if plugin.candidates is not None and not cfg.fuser_options:
        return (f"fuser {cfg.fuser!r} chooses its options among candidates on validation; the "
                f"runner trains those candidates itself")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported():
        return ("mixed precision on this GPU is fp16 with a grad scaler, whose skipped steps "
                "are per model; seeds are trained one after another")
    return None


def _trial_blocker(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec) -> str | None:
    state = rng_state()
    try:
        return _trial(cfg, tensors, spec)
    except _Blocked as exc:
        return f"fuser {cfg.fuser!r}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure of the trial is the reason
        text = str(exc).strip().splitlines()
        first = text[0] if text else ""
        return (f"fuser {cfg.fuser!r} cannot run under torch.func.vmap "
                f"({type(exc).__name__}: {first[:300]})")
    finally:
        set_rng_state(state)


def _trial(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec) -> str | None:
    cpu = torch.device("cpu")
    models = []
    for s in (0, 1):
        torch.manual_seed(s)
        models.append(build_fuser(cfg, spec).to(cpu))
    rows = torch.arange(min(6, tensors.n))
    batch = tensors.batch(rows)
    reads_teacher = cfg.distill_on or bool(getattr(models[0], "uses_teacher_at_inference",
                                                   False))
    if not reads_teacher:
        batch = replace(batch, teacher=None, teacher_mask=None)
    before = {k: v.clone() for k, v in models[0].named_buffers()}
    vec = _stack_models(models, copy.deepcopy(models[0]), list(tensors.modalities))
    tree = _batch_tree(batch)
    stacked = torch.utils._pytree.tree_map(lambda t: torch.stack([t, t]), tree)
    calls = vec.dropout_calls(stacked, len(rows))
    gen = torch.Generator().manual_seed(0)
    masks = [torch.stack(m) for m in zip(*[_draw_masks(calls, gen, cpu) for _ in (0, 1)])]
    with autocast_context(cpu, cfg.amp):
        out = vec.forward(stacked, True, True, masks)
    loss = out["logits"].float().sum()
    if "reps" in out:
        loss = loss + out["reps"].float().sum()
    if "aux_loss" in out:
        loss = loss + out["aux_loss"].float().sum()
    loss.backward()
    for m in models:
        m.train()
        with torch.no_grad():
            m(batch)  # a plain training forward: buffers must not move
    after = dict(models[0].named_buffers())
    if any(not torch.equal(before[k], after[k]) for k in before):
        return (f"fuser {cfg.fuser!r} updates buffers in its training forward (running "
                f"statistics); seeds are trained one after another")
    with torch.no_grad():
        got = vec.forward(tree, False, False)["logits"]
        for i, m in enumerate(models):
            m.eval()
            want = m(batch).logits
            if not torch.allclose(got[i].float(), want.float(), rtol=1e-4, atol=1e-5):
                return (f"fuser {cfg.fuser!r}'s vectorised forward differs from its own "
                        f"(max difference {float((got[i] - want).abs().max()):.3g})")
    return None


def _stack_models(models: list[nn.Module], template: nn.Module,
                  modalities: list[str]) -> _Vectorised:
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              for n, _ in models[0].named_parameters()}
    for n, p in models[0].named_parameters():
        params[n].requires_grad_(p.requires_grad)
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
               for n, _ in models[0].named_buffers()}
    return _Vectorised(template, params, buffers, modalities)


# ----------------------------------------------------------------------------- training


@dataclass
class _Seed:
    """One seed's own state beside the stack."""

    seed: int
    gen: torch.Generator  # data order and mask augmentation
    drop: torch.Generator  # dropout (the global RNG's stream in train_seed)
    model: nn.Module  # the seed's fuser instance, loaded with its best weights at the end
    base_mask: dict[str, torch.Tensor]
    val_mask: dict[str, torch.Tensor] | None
    history: list[dict[str, float]]
    best: tuple[float, int, dict[str, torch.Tensor] | None]
    bad: int = 0
    finished: bool = False


def _fingerprint(cfg: RunConfig, spec: FusionSpec, seeds: list[int]) -> str:
    """What a checkpoint belongs to, as :func:`medmix_core.training.training_key` decides
    it for one seed: the training configuration, the fusion spec and the seeds."""
    conf = cfg.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    text = json.dumps({"cfg": conf, "spec": vars(spec), "seeds": list(seeds)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _grad_clip(tensors: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` per seed over stacked grads: ``[S]`` norms, one coefficient each."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return
    n = grads[0].shape[0]
    norms = [torch.linalg.vector_norm(g.reshape(n, -1), 2.0, dim=1) for g in grads]  # [S] each
    total = torch.linalg.vector_norm(torch.stack(norms, 1), 2.0, dim=1)  # [S]
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))


class _HeadsView:
    """Seed ``i``'s teacher heads out of the stacked ones (what distillation_loss calls)."""

    def __init__(self, params: dict[str, torch.Tensor], i: int) -> None:
        self.params, self.i = params, i

    def __call__(self, modality: str, t: torch.Tensor) -> torch.Tensor:
        w = self.params[f"heads.{modality}.weight"][self.i]
        b = self.params[f"heads.{modality}.bias"][self.i]
        return F.linear(t, w, b)


def train_seeds_together(cfg: RunConfig, tensors: StoreTensors, spec: FusionSpec,
                         splits: dict[str, list[int]], seeds: list[int],
                         train_masks: dict[int, dict[str, torch.Tensor] | None] | None = None,
                         val_masks: dict[int, dict[str, torch.Tensor] | None] | None = None,
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                         checkpoint: str | Path | None = None,
                         log: Callable[[str], None] = print) -> list[SeedResult]:
    """Train ``seeds`` as one vectorised model; what :func:`train_seed` returns per seed.

    Args:
        cfg: the run configuration (as for ``train_seed``).
        tensors: the store's tensors.
        spec: the fusion spec.
        splits: row indices per split ("train", "val").
        seeds: the seeds, in the order results are returned.
        train_masks / val_masks: seed -> expert masks replacing the stored ones (protocols),
            or None.
        on_epoch: called as ``on_epoch(seed, record)`` after each epoch of each seed.
        checkpoint: a file to save the training state to after every epoch, and to resume
            from when it exists; None for no checkpoint.
        log: where a resume is announced.

    Returns:
        one :class:`~medmix_core.training.SeedResult` per seed (CPU, eval mode, best
        validation weights, EMA weights with ``ema_decay``); ``seconds`` is the shared wall
        time divided evenly among the seeds.

    Raises:
        MedmixError: what ``train_seed`` raises (untrainable splits, a non-finite loss), a
            configuration :func:`together_blocker` refuses, or a checkpoint of other seeds
            or another configuration.
    """
    t0 = time.perf_counter()
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise MedmixError(f"train_seeds_together needs distinct seeds, got {seeds}.")
    reason = together_blocker(cfg, tensors, spec)
    if reason is not None:
        raise MedmixError(f"The seeds of this run cannot be trained together: {reason}. Train "
                          f"them one after another (--sequential).")
    train_masks, val_masks = dict(train_masks or {}), dict(val_masks or {})
    check_trainable(tensors, splits)
    train_rows = torch.as_tensor(splits["train"], dtype=torch.long)
    val_rows = torch.as_tensor(splits["val"], dtype=torch.long)

    # every seed exactly as train_seed starts it: RNG consumption included
    states, models, steps = [], [], []
    for s in seeds:
        device, gen, model = start_seed(cfg, spec, s)
        step = TrainStep(cfg, model, tensors, device, train_rows, train_masks.get(s), s)
        drop = torch.Generator(device=device)
        drop.set_state(torch.get_rng_state() if device.type == "cpu"
                       else torch.cuda.get_rng_state(device))
        states.append(_Seed(s, gen, drop, model, step.base_mask, val_masks.get(s), [],
                            (math.inf, -1, None)))
        models.append(model)
        steps.append(step)
    step0 = steps[0]
    mods = list(tensors.modalities)
    vec = _stack_models(models, copy.deepcopy(models[0]), mods)
    heads: dict[str, torch.Tensor] = {}
    if step0.heads is not None:
        heads = {n: torch.stack([dict(st.heads.named_parameters())[n].detach() for st in steps])
                 .requires_grad_(True) for n, _ in step0.heads.named_parameters()}
    # parameter groups as TrainStep's AdamW has them, by name
    names = {id(p): n for n, p in step0.model.named_parameters()}
    if step0.heads is not None:
        names.update({id(p): f"teacher:{n}" for n, p in step0.heads.named_parameters()})
    groups = {names[id(p)]: {"lr": g["initial_lr"], "weight_decay": g["weight_decay"]}
              for g in step0.optimizer.param_groups for p in g["params"]}
    opt = _SeedAdamW(groups, cfg.betas, eps=step0.optimizer.defaults["eps"])
    warm = max(1, int(cfg.warmup_epochs * math.ceil(len(train_rows) / cfg.batch_size)))
    ema: dict[str, torch.Tensor] | None = None
    ema_buffers: dict[str, torch.Tensor] | None = None
    ema_steps = 0
    if cfg.ema_decay:
        ema = {n: t.detach().clone() for n, t in vec.params.items()}
        ema_buffers = {n: t.clone() for n, t in vec.buffers.items()}
    pos_weight, reads_teacher, losses = step0.pos_weight, step0.reads_teacher, step0.losses
    del steps, step0
    state_keys = set(models[0].state_dict().keys())
    active = list(range(len(seeds)))  # positions in `states` of the seeds in the stack
    start_epoch, global_step = 0, 0
    fp = _fingerprint(cfg, spec, seeds)

    if checkpoint is not None and Path(checkpoint).is_file():
        ck = load_checkpoint(checkpoint)
        if ck.get("kind") != CHECKPOINT_KIND or ck.get("fingerprint") != fp:
            raise MedmixError(f"{checkpoint} is a checkpoint of another run (other seeds or "
                              f"configuration). Delete it to train these seeds from the "
                              f"start.")
        active, start_epoch, global_step = ck["active"], ck["epoch"], ck["global_step"]
        vec.params = {n: t.to(device).requires_grad_(vec.params[n].requires_grad)
                      for n, t in ck["params"].items()}
        vec.buffers = {n: t.to(device) for n, t in ck["buffers"].items()}
        heads = {n: t.to(device).requires_grad_(True) for n, t in ck["heads"].items()}
        opt.state = {n: {k: v.to(device) if k != "step" else v for k, v in st.items()}
                     for n, st in ck["adam"].items()}
        if ema is not None:
            ema = {n: t.to(device) for n, t in ck["ema"].items()}
            ema_buffers = {n: t.to(device) for n, t in ck["ema_buffers"].items()}
            ema_steps = ck["ema_steps"]
        for st, saved in zip(states, ck["seeds"]):
            st.gen.set_state(saved["gen"])
            st.drop.set_state(saved["drop"])
            st.history, st.bad, st.finished = saved["history"], saved["bad"], saved["finished"]
            st.best = (saved["best"][0], saved["best"][1], saved["best"][2])
        set_rng_state(ck["rng"])
        log(f"resuming seeds {[seeds[i] for i in active]} together at epoch {start_epoch} "
            f"from {checkpoint}")

    n_train = len(train_rows)
    bs = cfg.batch_size
    for epoch in range(start_epoch, cfg.epochs):
        if not active:
            break
        lam = (distill_weight(epoch, cfg.lambda_d_max, cfg.distill_ramp_epochs) if heads
               else 0.0)
        perms = [train_rows[torch.randperm(n_train, generator=states[i].gen)] for i in active]
        tot = [{"task": 0.0, "distill": 0.0, "aux": 0.0} for _ in active]
        for start in range(0, n_train, bs):
            idx = [perm[start:start + bs] for perm in perms]
            tree, per = _train_batch(tensors, idx, [states[i] for i in active], cfg,
                                     reads_teacher, device)
            calls = vec.dropout_calls(tree, len(idx[0]))
            masks = [torch.stack(m) for m in
                     zip(*[_draw_masks(calls, states[i].drop, device) for i in active])]
            with autocast_context(device, cfg.amp):
                out = vec.forward(tree, True, True, masks)
                total, used, recs = _losses(out, per, cfg, tensors.task_type, pos_weight,
                                            heads, losses, lam, mods,
                                            [seeds[i] for i in active], epoch, device)
            for p in list(vec.params.values()) + list(heads.values()):
                p.grad = None
            total.backward()
            _grad_clip(list(vec.params.values()) + list(heads.values()), cfg.grad_clip)
            factor = min(1.0, (global_step + 1) / warm)
            opt.step(vec.params, {}, factor)
            opt.step({f"teacher:{n}": t for n, t in heads.items()}, used, factor)
            global_step += 1
            if ema is not None:
                d = min(cfg.ema_decay, (1 + ema_steps) / (10 + ema_steps))
                ema_steps += 1
                with torch.no_grad():
                    for n, avg in ema.items():
                        avg.lerp_(vec.params[n].detach(), 1.0 - d)
                    for n, b in ema_buffers.items():
                        b.copy_(vec.buffers[n])
            for t, r in zip(tot, recs):
                for k, v in r.items():
                    t[k] += v * len(idx[0])
        # validation, per seed, with the weights validation uses
        eval_params = vec.params if ema is None else ema
        eval_buffers = vec.buffers if ema is None else ema_buffers
        val = _val_losses(vec, eval_params, eval_buffers, tensors, val_rows,
                          [states[i] for i in active], cfg, pos_weight, device)
        done = []
        for j, i in enumerate(active):
            st = states[i]
            t = tot[j]
            rec = {"epoch": epoch, "train_loss": t["task"] / n_train,
                   "distill_loss": t["distill"] / n_train, "aux_loss": t["aux"] / n_train,
                   "val_loss": val[j], "lambda_d": lam}
            st.history.append(rec)
            window = [h["val_loss"] for h in st.history[-cfg.val_smoothing:]]
            criterion = sum(window) / len(window)
            if cfg.val_smoothing > 1:
                rec["val_criterion"] = criterion
            if criterion < st.best[0] - 1e-6:
                st.best = (criterion, epoch, {n: v[j].detach().clone()
                                              for n, v in {**eval_params, **eval_buffers}.items()
                                              if n in state_keys})
                st.bad = 0
            else:
                st.bad += 1
                if st.bad >= cfg.patience:
                    st.finished = True
            if epoch == cfg.epochs - 1:
                st.finished = True
            if st.finished:
                done.append(j)
        if done:  # finished seeds leave the stack
            keep = torch.tensor([j for j in range(len(active)) if j not in done],
                                dtype=torch.long)
            active = [active[j] for j in keep.tolist()]
            kd = keep.to(device)
            vec.params = {n: t.detach()[kd].clone().requires_grad_(t.requires_grad)
                          for n, t in vec.params.items()}
            vec.buffers = {n: t[kd].clone() for n, t in vec.buffers.items()}
            heads = {n: t.detach()[kd].clone().requires_grad_(True) for n, t in heads.items()}
            opt.keep(keep)
            if ema is not None:
                ema = {n: t[kd].clone() for n, t in ema.items()}
                ema_buffers = {n: t[kd].clone() for n, t in ema_buffers.items()}
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "kind": CHECKPOINT_KIND, "fingerprint": fp, "epoch": epoch + 1,
                "global_step": global_step, "active": active,
                "params": {n: t.detach() for n, t in vec.params.items()},
                "buffers": vec.buffers, "heads": {n: t.detach() for n, t in heads.items()},
                "adam": opt.state, "ema": ema, "ema_buffers": ema_buffers,
                "ema_steps": ema_steps, "rng": rng_state(),
                "seeds": [{"gen": st.gen.get_state(), "drop": st.drop.get_state(),
                           "history": st.history, "bad": st.bad, "finished": st.finished,
                           "best": st.best} for st in states]})
        if on_epoch is not None:
            for i in range(len(states)):
                if states[i].history and states[i].history[-1]["epoch"] == epoch:
                    on_epoch(seeds[i], states[i].history[-1])

    if device.type == "cpu":  # the global RNG where sequential training leaves it
        torch.set_rng_state(states[-1].drop.get_state())
    share = (time.perf_counter() - t0) / len(seeds)
    results = []
    for st in states:
        model = st.model
        model.load_state_dict(st.best[2])
        val_pred = predict_rows(model.eval(), tensors, val_rows, device, mask=st.val_mask)
        model = model.cpu().eval()
        val_labels = tensors.labels[val_rows]
        thr = (best_threshold(val_pred["probs"], val_labels, tensors.task_type)
               if cfg.threshold == "val" else float(cfg.threshold))
        val_metrics = compute_metrics(val_pred["probs"], val_labels, tensors.task_type, thr)
        results.append(SeedResult(st.seed, model, st.best[1], len(st.history), thr, st.history,
                                  val_metrics, share))
    return results


def _train_batch(tensors: StoreTensors, idx: list[torch.Tensor], seeds: list[_Seed],
                 cfg: RunConfig, reads_teacher: bool, device: torch.device):
    """The stacked training batch of the active seeds: what ``TrainStep.prepare`` gives each,
    with the expert embeddings gathered in one index per tensor. Returns (tree, per-seed
    batches of masks, labels and teacher views)."""
    rows = torch.stack(idx)  # [S, B]
    per = []
    for s, ix in zip(seeds, idx):
        em = {m: rows_of(s.base_mask[m], ix) for m in tensors.modalities}
        mm = torch.stack([em[m].any(dim=1) for m in tensors.modalities], dim=1)  # [B, M]
        tmask = None
        if reads_teacher and tensors.teacher_mask is not None:
            tmask = rows_of(tensors.teacher_mask, ix) & mm
        em = augment_masks(em, list(tensors.modalities), cfg.modality_dropout,
                           cfg.expert_dropout, s.gen)
        mm = torch.stack([em[m].any(dim=1) for m in tensors.modalities], dim=1)
        if tmask is not None:
            tmask = tmask & mm
        per.append((em, mm, tmask))
    tree: dict[str, Any] = {
        "experts": {m: [_rows(x, rows).to(device) for x in tensors.emb[m]]
                    for m in tensors.modalities},
        "expert_mask": {m: torch.stack([p[0][m] for p in per]).to(device)
                        for m in tensors.modalities},
        "modality_mask": torch.stack([p[1] for p in per]).to(device),
        "labels": _rows(tensors.labels, rows).to(device),
        "label_mask": _rows(tensors.label_mask, rows).to(device),
        "index": rows.to(device)}
    if reads_teacher and tensors.teacher is not None:
        tree["teacher"] = {m: _rows(x, rows).to(device) for m, x in tensors.teacher.items()}
        tree["teacher_mask"] = torch.stack([p[2] for p in per]).to(device)
    views = [_seed_view(tree, i, list(tensors.modalities)) for i in range(len(seeds))]
    return tree, views


def _rows(table, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for ``rows [S, B]``: ``[S, B, ...]``, gathered in one index_select."""
    flat = take_rows([table], rows.reshape(-1))[0]
    return flat.reshape(*rows.shape, *flat.shape[1:])


def _losses(out: dict[str, torch.Tensor], per: list[Batch], cfg: RunConfig, task_type: str,
            pos_weight, heads, losses, lam: float, mods: list[str], seeds: list[int],
            epoch: int, device: torch.device):
    """Per-seed losses as TrainStep.update computes them; their sum, the seeds whose step
    used each teacher head, and per-seed loss records."""
    total = None
    recs = []
    n = len(per)
    used = {f"teacher:heads.{m}.{k}": torch.zeros(n, dtype=torch.bool)
            for m in mods for k in ("weight", "bias") if f"heads.{m}.weight" in heads}
    for i, b in enumerate(per):
        loss = task_loss(out["logits"][i], b, task_type, pos_weight, cfg.label_smoothing)
        rec = {"task": float(loss.detach())}
        if "aux_loss" in out:
            loss = loss + out["aux_loss"][i]
            rec["aux"] = float(out["aux_loss"][i].detach())
        if heads and lam > 0:
            reps, rmask = out["reps"][i], out["rep_mask"][i]
            dl = distillation_loss(reps, rmask, b.modalities, b.teacher, b.teacher_mask,
                                   _HeadsView(heads, i), losses)
            loss = loss + lam * dl
            rec["distill"] = float(dl.detach())
            for j, m in enumerate(b.modalities):  # the heads distillation_loss used
                if m not in b.teacher or f"heads.{m}.weight" not in heads:
                    continue
                k = int((rmask[:, j] & b.teacher_mask[:, j]).sum())
                if k > 0 and any(w and k >= lo.min_samples for lo, w in losses.items()):
                    used[f"teacher:heads.{m}.weight"][i] = True
                    used[f"teacher:heads.{m}.bias"][i] = True
        if not torch.isfinite(loss):
            raise MedmixError(
                f"Training loss became {float(loss.detach())} at epoch {epoch} (seed "
                f"{seeds[i]}). Lower --lr (now {cfg.lr:g}), check the store for extreme "
                f"embedding values (`medmix extract` re-makes a damaged store)"
                + (", or turn mixed precision off with `amp: false` in a --config file."
                   if device.type == "cuda" and cfg.amp else "."))
        total = loss if total is None else total + loss
        recs.append(rec)
    return total, used, recs


@torch.no_grad()
def _val_losses(vec: _Vectorised, params, buffers, tensors: StoreTensors, rows: torch.Tensor,
                seeds: list[_Seed], cfg: RunConfig, pos_weight,
                device: torch.device) -> list[float]:
    """Per-seed mean validation task loss, in the chunks evaluate_loss takes."""
    shared = all(s.val_mask is seeds[0].val_mask for s in seeds)
    totals = [0.0] * len(seeds)
    n = 0
    saved = vec.params, vec.buffers
    vec.params, vec.buffers = params, buffers
    try:
        for start in range(0, len(rows), EVAL_BATCH):
            idx = rows[start:start + EVAL_BATCH]
            batches = [tensors.batch(idx, s.val_mask).to(device)
                       for s in (seeds[:1] if shared else seeds)]
            trees = [_batch_tree(b) for b in batches]
            tree = trees[0] if shared else torch.utils._pytree.tree_map(
                lambda *t: torch.stack(t), *trees)
            with autocast_context(device, cfg.amp):
                logits = vec.forward(tree, not shared, False)["logits"]
            for i in range(len(seeds)):
                b = batches[0 if shared else i]
                totals[i] += float(task_loss(logits[i], b, tensors.task_type,
                                             pos_weight)) * len(idx)
            n += len(idx)
    finally:
        vec.params, vec.buffers = saved
    return [t / max(n, 1) for t in totals]
