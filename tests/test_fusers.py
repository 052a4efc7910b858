"""Every registered fuser: shapes, masks, garbage in masked slots, empty samples, training.

The parametrisation reads the fuser registry, so a newly registered fuser is tested the
moment it exists. Method-specific checks (M3Care, AdaCoMed, the MedMIX ablations) follow.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from medmix_datasets.synthetic import write_synthetic_store
from medmix_fusers.baselines import masked_mean

from medmix_core.batch import Batch, StoreTensors
from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.fusion import FusionSpec
from medmix_core.metrics import compute_metrics
from medmix_core.plugins import get_fuser, registry
from medmix_core.training import build_fuser, make_spec, predict_rows, train_seed

FUSERS = registry().names("fusers")
TASKS = ("binary", "multilabel", "multiclass")
D = 16
B = 48


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[StoreTensors, dict[str, list[int]]]]:
    """Small synthetic stores with teacher embeddings, one per task type."""
    out = {}
    for i, task in enumerate(TASKS):
        path = tmp_path_factory.mktemp(f"store_{task}")
        store = write_synthetic_store(path, n=240, n_modalities=3, experts_per_modality=[2, 3, 1],
                                      dims=(8, 12, 10), missing=0.3, expert_missing=0.2,
                                      teacher_dim=12, task_type=task, n_classes=3, seed=i)
        out[task] = (StoreTensors.from_store(store, teacher="teacher"), store.splits)
    return out


#: options a fuser needs on the synthetic stores (which have no expert of its own name)
FUSER_OPTIONS = {"onellm": {"expert": "e0"}}


def build(name: str, tensors: StoreTensors, **options):
    torch.manual_seed(0)
    options = {**FUSER_OPTIONS.get(name, {}), **options}
    return get_fuser(name)(make_spec(tensors), d=D, dropout=0.1, **options).eval()


def edge_batch(tensors: StoreTensors) -> Batch:
    """B rows with extra masking: rows 0-3 empty, rows 4-7 only their first modality
    (only its first expert), and every 5th present expert masked (keeping its real value
    in the slot). Teacher rows follow the modality mask."""
    batch = tensors.batch(torch.arange(B))
    em = {m: x.clone() for m, x in batch.expert_mask.items()}
    for j, m in enumerate(batch.modalities):
        em[m][0:4] = False
        if j > 0:
            em[m][4:8] = False
        else:
            em[m][4:8] = False
            em[m][4:8, 0] = True
        drop = torch.zeros_like(em[m])
        drop.view(-1)[::5] = True
        keep = em[m] & ~drop
        em[m] = torch.where(keep.any(1, keepdim=True), keep, em[m])
    out = batch.with_masks(em)
    return replace(out, teacher_mask=out.teacher_mask & out.modality_mask)


def with_garbage(batch: Batch, value: float) -> Batch:
    """The same batch with ``value`` written into every masked expert and teacher slot."""
    experts = {}
    for m, xs in batch.experts.items():
        experts[m] = []
        for k, x in enumerate(xs):
            x = x.clone()
            x[~batch.expert_mask[m][:, k]] = value
            experts[m].append(x)
    teacher = {}
    for j, m in enumerate(batch.modalities):
        t = batch.teacher[m].clone()
        t[~batch.teacher_mask[:, j]] = value
        teacher[m] = t
    return replace(batch, experts=experts, teacher=teacher)


def outputs_equal(a, b) -> None:
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for field in ("reps", "rep_mask", "modality_weights", "router_weights", "aux_loss"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=field)


# ----------------------------------------------------------------------------- every fuser

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", FUSERS)
def test_shapes_masks_and_garbage(name, task, stores):
    tensors, _ = stores[task]
    model = build(name, tensors)
    batch = edge_batch(tensors)
    M, C = len(tensors.modalities), tensors.n_outputs
    kmax = max(len(v) for v in tensors.experts.values())
    with torch.no_grad():
        out = model(batch)
        assert out.logits.shape == (B, C)
        assert torch.isfinite(out.logits).all()
        # garbage (NaN, huge values) in masked slots changes nothing, same batch
        for value in (math.nan, 1e6, -3e4):
            outputs_equal(out, model(with_garbage(batch, value)))
        # a second pass is identical (deterministic for a fixed batch)
        outputs_equal(out, model(batch))

    # empty rows: a defined, finite output that does not depend on the row
    empty = ~batch.modality_mask.any(dim=1)
    n_empty = int(empty.sum())
    assert n_empty >= 4
    torch.testing.assert_close(out.logits[empty], out.logits[empty][:1].expand(n_empty, -1))

    # imputation baselines (class attribute ``imputes``) fill missing entries on purpose
    # and treat them as present: their weights and reps are not zero there
    masks_exact = not getattr(model, "imputes", False)
    if out.reps is not None:
        assert model.rep_dim > 0
        assert out.reps.shape == (B, M, model.rep_dim)
        assert out.rep_mask.shape == (B, M) and out.rep_mask.dtype == torch.bool
        assert not out.rep_mask[empty].any()
        assert torch.isfinite(out.reps).all()
        if masks_exact:
            assert (out.reps[~out.rep_mask] == 0).all()
    if out.modality_weights is not None:
        assert out.modality_weights.shape == (B, M)
        assert (out.modality_weights >= 0).all()
        if masks_exact:
            assert (out.modality_weights[~batch.modality_mask] == 0).all()
    if out.router_weights is not None:
        assert out.router_weights.shape == (B, M, kmax)
        for j, m in enumerate(tensors.modalities):
            k = len(tensors.experts[m])
            w = out.router_weights[:, j]
            assert (w[:, k:] == 0).all(), m
            if masks_exact:
                assert (w[:, :k][~batch.expert_mask[m]] == 0).all(), m
    if out.aux_loss is not None:
        assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("name", FUSERS)
def test_training_reduces_the_loss(name, stores):
    tensors, splits = stores["binary"]
    cfg = RunConfig(fuser=name, d=D, epochs=6, batch_size=64, lr=3e-3, patience=100,
                    warmup_epochs=0, device="cpu", progress=False, seeds=[0],
                    fuser_options=FUSER_OPTIONS.get(name, {}))
    res = train_seed(cfg, tensors, make_spec(tensors), splits, seed=0)
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    assert math.isfinite(last)
    assert last < first, (name, [round(h["train_loss"], 4) for h in res.history])


@pytest.mark.parametrize("task", ("multilabel", "multiclass"))
@pytest.mark.parametrize("name", ["meanavg", "m3care", "adacomed"])
def test_training_other_tasks(name, task, stores):
    tensors, splits = stores[task]
    cfg = RunConfig(fuser=name, d=D, epochs=5, batch_size=64, lr=3e-3, patience=100,
                    warmup_epochs=0, device="cpu", progress=False)
    res = train_seed(cfg, tensors, make_spec(tensors), splits, seed=0)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


@pytest.mark.parametrize("name", FUSERS)
def test_factory_is_documented(name):
    doc = get_fuser(name).doc
    assert len(doc.strip()) > 20, f"fuser {name!r} has no docstring"


@pytest.mark.parametrize("name", FUSERS)
def test_fuser_has_a_docs_page(name):
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "\n".join(p.read_text("utf-8") for p in docs.rglob("*.md"))
    assert f"`{name}`" in text


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("name", registry().names("fusers"))
def test_unknown_option_is_a_clear_error(stores, name):
    tensors, _ = stores["binary"]
    cfg = RunConfig(fuser=name, fuser_options={"nope": 1})
    with pytest.raises(MedmixError, match=f"not options of fuser '{name}'. It accepts"):
        build_fuser(cfg, make_spec(tensors))


@pytest.mark.parametrize("name", ["adacomed", "teacher-only"])
def test_teacher_fusers_need_a_teacher(name, stores):
    tensors, _ = stores["binary"]
    spec = make_spec(tensors)
    spec = FusionSpec(spec.modalities, spec.experts, spec.dims, spec.n_outputs, spec.task_type)
    with pytest.raises(MedmixError, match="--teacher"):
        get_fuser(name)(spec, d=D)
    model = build(name, tensors)
    assert model.uses_teacher_at_inference
    batch = replace(tensors.batch(torch.arange(8)), teacher=None, teacher_mask=None)
    with pytest.raises(MedmixError, match="--teacher"):
        model(batch)


def test_bad_options(stores):
    tensors, _ = stores["binary"]
    spec = make_spec(tensors)
    with pytest.raises(MedmixError, match="weighting"):
        get_fuser("adacomed")(spec, weighting="sometimes")
    with pytest.raises(MedmixError, match="heads"):
        get_fuser("attention")(spec, d=10, heads=4)
    with pytest.raises(MedmixError, match="impute"):
        get_fuser("m3care")(spec, impute="mean")
    with pytest.raises(MedmixError, match="no expert"):
        get_fuser("medmix-best-expert")(spec, expert={"mod0": "nope"})
    with pytest.raises(MedmixError, match="not in this run"):
        get_fuser("medmix-no-inter")(spec, modality="ecg")
    with pytest.raises(MedmixError, match="modality"):
        get_fuser("teacher-only")(spec, modality="ecg")


def test_batch_from_another_store_is_rejected(stores):
    a, _ = stores["binary"]
    model = build("meanavg", a)
    batch = a.batch(torch.arange(4))
    bad = replace(batch, experts={**batch.experts, "mod1": batch.experts["mod1"][:1]})
    with pytest.raises(MedmixError, match="expert tensors"):
        model(bad)


# ----------------------------------------------------------------------------- M3Care

@pytest.mark.parametrize("impute", ["code", "neighbours"])
def test_m3care_dense_graph_pairs_without_shared_modality(impute, stores):
    """A low threshold keeps almost every edge; pairs sharing no modality stay finite."""
    tensors, _ = stores["binary"]
    model = build("m3care", tensors, threshold_init=-8.0, impute=impute, stab_weight=1e-3)
    batch = edge_batch(tensors)
    em = {m: x.clone() for m, x in batch.expert_mask.items()}
    em["mod0"][8:16] = False  # rows 8-15: no mod0; rows 4-7: only mod0
    batch = batch.with_masks(em)
    batch = replace(batch, teacher_mask=batch.teacher_mask & batch.modality_mask)
    model.train()
    torch.manual_seed(0)
    out = model(batch)
    (out.logits.sum() + out.aux_loss).backward()
    assert torch.isfinite(out.logits).all() and out.aux_loss > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.threshold.grad is not None and model.threshold.grad != 0
    model.eval()
    with torch.no_grad():
        outputs_equal(model(batch), model(with_garbage(batch, math.nan)))


def test_m3care_graph_mixes_the_batch_and_is_deterministic(stores):
    """Documented behaviour: with edges present, a row's output depends on its batch."""
    tensors, _ = stores["binary"]
    model = build("m3care", tensors, threshold_init=-8.0)
    full = tensors.batch(torch.arange(64))
    with torch.no_grad():
        a = model(full).logits[:16]
        b = model(tensors.batch(torch.arange(16))).logits
        again = model(tensors.batch(torch.arange(16))).logits
    assert torch.equal(b, again)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- AdaCoMed

def test_adacomed_weightings_match_the_released_formulas():
    from medmix_fusers.adacomed import gaussian_weight, inverse_weight, threshold_weight
    s = torch.tensor(1.0)
    wl, ws = inverse_weight(s)
    sig = 1 / (1 + math.exp(-1))
    inv = 1 / (1 + 1e-6)
    small = inv / (inv + 1)
    assert math.isclose(float(wl), sig / (sig + small), rel_tol=1e-6)
    assert math.isclose(float(wl + ws), 1.0, rel_tol=1e-6)
    wl, ws = gaussian_weight(torch.tensor(0.5), sigma=1.0)
    assert math.isclose(float(ws), math.exp(-0.125), rel_tol=1e-6)
    assert math.isclose(float(wl), 1 - math.exp(-0.125), rel_tol=1e-6)
    wl, ws = threshold_weight(torch.tensor(0.9))
    assert math.isclose(float(wl), 0.5 + 0.5 * math.tanh(10 * (0.9 - 0.95)), rel_tol=1e-6)
    assert math.isclose(float(ws), 1 - float(wl), rel_tol=1e-6)


def test_adacomed_alignment_is_a_batch_fraction():
    from medmix_fusers.adacomed import alignment
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    frac_same, loss_same = alignment(x, x)
    frac_rand, loss_rand = alignment(x, torch.randn(32, 8, generator=g))
    assert frac_same.shape == (32,) and ((frac_same > 0) & (frac_same <= 1 + 1e-6)).all()
    assert frac_same.mean() > frac_rand.mean()
    assert loss_same.mean() < loss_rand.mean()


@pytest.mark.parametrize("weighting", ["learnable", "inverse", "gaussian", "threshold"])
def test_adacomed_weightings_run_and_ignore_masked_slots(weighting, stores):
    tensors, _ = stores["binary"]
    model = build("adacomed", tensors, weighting=weighting, contrastive_weight=0.5)
    batch = edge_batch(tensors)
    with torch.no_grad():
        out = model(batch)
        outputs_equal(out, model(with_garbage(batch, math.nan)))
    assert torch.isfinite(out.logits).all()
    assert out.aux_loss is not None and out.aux_loss > 0
    assert build("adacomed", tensors, weighting=weighting)(batch).aux_loss is None


def test_adacomed_pathways_follow_the_masks(stores):
    """No teacher: the small pathway alone. A modality removed from the expert masks (as a
    missingness protocol does) takes its teacher embedding with it, even where the
    teacher mask still says present."""
    tensors, _ = stores["binary"]
    model = build("adacomed", tensors)
    batch = tensors.batch(torch.arange(16))
    no_teacher = replace(batch, teacher_mask=torch.zeros_like(batch.teacher_mask))
    with torch.no_grad():
        out = model(no_teacher)
        small_only = model.classifier(masked_mean(out.reps, batch.modality_mask)[0])
        torch.testing.assert_close(out.logits, small_only)
        em = {**batch.expert_mask, "mod0": torch.zeros_like(batch.expert_mask["mod0"])}
        dropped = batch.with_masks(em)
        poisoned = replace(dropped, teacher={**batch.teacher,
                                             "mod0": torch.full_like(batch.teacher["mod0"], 1e6)})
        outputs_equal(model(dropped), model(poisoned))


# ----------------------------------------------------------------------------- teacher-only

def test_teacher_only_reads_only_its_modality(stores):
    tensors, _ = stores["binary"]
    model = build("teacher-only", tensors, modality="mod1")
    batch = tensors.batch(torch.arange(32))
    noisy = replace(batch, teacher={**batch.teacher, "mod0": batch.teacher["mod0"] + 5.0},
                    experts={m: [x + 3.0 for x in xs] for m, xs in batch.experts.items()})
    with torch.no_grad():
        outputs_equal(model(batch), model(noisy))
        out = model(batch)
    missing = ~(batch.teacher_mask[:, 1] & batch.modality_mask[:, 1])
    assert missing.any()
    torch.testing.assert_close(out.logits[missing], model.prior.expand(int(missing.sum()), -1))


# ----------------------------------------------------------------------------- MedMIX ablations

def test_best_expert_ignores_the_other_experts(stores):
    tensors, _ = stores["binary"]
    model = build("medmix-best-expert", tensors, expert={"mod1": "e2"})
    batch = tensors.batch(torch.arange(32))
    changed = {m: [x if (m, k) in {("mod0", 0), ("mod1", 2), ("mod2", 0)} else x * 0 + 7.0
                   for k, x in enumerate(xs)] for m, xs in batch.experts.items()}
    with torch.no_grad():
        a, b = model(batch), model(replace(batch, experts=changed))
    outputs_equal(a, b)
    assert (a.router_weights[:, 1, :2] == 0).all()
    assert (a.router_weights[:, 1, 2] == batch.expert_mask["mod1"][:, 2].float()).all()


def test_no_inter_uses_one_modality(stores):
    tensors, _ = stores["binary"]
    model = build("medmix-no-inter", tensors, modality="mod2")
    batch = tensors.batch(torch.arange(32))
    changed = {m: [x if m == "mod2" else x + 9.0 for x in xs] for m, xs in batch.experts.items()}
    with torch.no_grad():
        a, b = model(batch), model(replace(batch, experts=changed))
    outputs_equal(a, b)
    assert (a.modality_weights[:, :2] == 0).all()
    assert (a.modality_weights[:, 2] == batch.modality_mask[:, 2].float()).all()
    assert not a.rep_mask[:, :2].any()


# ----------------------------------------------------------------------------- MedMIX router

def test_medmix_router_prefers_the_informative_expert(tmp_path):
    store = write_synthetic_store(tmp_path / "s", n=600, n_modalities=2, experts_per_modality=2,
                                  dims=(16, 16), expert_informativeness=[[4.0, 0.0], [4.0, 0.0]],
                                  missing=0.1, expert_missing=0.0, teacher_dim=None, seed=3)
    tensors = StoreTensors.from_store(store)
    cfg = RunConfig(fuser="medmix", d=32, epochs=30, batch_size=64, lr=5e-3, patience=100,
                    warmup_epochs=1, device="cpu", progress=False)
    res = train_seed(cfg, tensors, make_spec(tensors), store.splits, seed=0)
    rows = torch.as_tensor(store.splits["test"])
    pred = predict_rows(res.model, tensors, rows, torch.device("cpu"))
    w = pred["router_weights"]  # [N, M, 2]
    for j, m in enumerate(tensors.modalities):
        both = tensors.mask[m][rows].all(dim=1)
        assert w[both, j, 0].mean() > w[both, j, 1].mean() + 0.1, (m, w[both, j].mean(0))
    auroc = compute_metrics(pred["probs"], tensors.labels[rows], "binary")["auroc"]
    assert auroc > 0.7
