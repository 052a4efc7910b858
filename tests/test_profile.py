"""Profiling: MAC counts against hand counts, deployed vs trainable parameters, memory
tracking, the machine description, and the efficiency table (Perf, Cost, EffScore, Pareto
front)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from medmix_core.batch import Batch, StoreTensors
from medmix_core.config import make_config
from medmix_core.efficiency import efficiency_table, pareto_front, write_efficiency
from medmix_core.errors import MedmixError
from medmix_core.experts import ExpertEncoder
from medmix_core.flops import EXTRA_HANDLES, count_macs
from medmix_core.fusion import FusionSpec
from medmix_core.machine import busy_cpu_note, machine_info
from medmix_core.memory import TensorMemoryTracker
from medmix_core.plugins import get_fuser
from medmix_core.profile import load_profiles, profile_fuser, write_profile
from medmix_core.units import format_bytes, format_count, format_macs


@pytest.fixture
def one_thread():
    """Timings in tests only need to be positive; one thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(spec: FusionSpec, b: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    experts = {m: [torch.randn(b, dk, generator=g) for dk in spec.dims[m]]
               for m in spec.modalities}
    emask = {m: torch.rand(b, len(spec.dims[m]), generator=g) > 0.3 for m in spec.modalities}
    mm = torch.stack([emask[m].any(1) for m in spec.modalities], 1)
    return Batch(experts=experts, expert_mask=emask, modality_mask=mm,
                 modalities=list(spec.modalities))


def test_medmix_macs_match_hand_count():
    spec = FusionSpec(modalities=["a", "b"], experts={"a": ["x", "y"], "b": ["z"]},
                      dims={"a": [16, 32], "b": [24]}, n_outputs=1)
    d, c, b = 8, 1, 5
    model = get_fuser("medmix")(spec, d=d, dropout=0.0)
    res = count_macs(model, _batch(spec, b))

    linear = 0
    for dk in (16, 32, 24):
        r = 32  # min(128, max(32, dk // 16)) = 32 for these widths
        linear += dk * r + r * dk  # residual adapter: Linear(dk, r), Linear(r, dk)
        linear += dk * d  # projection Linear(dk, d)
        linear += d  # shared router Linear(d, 1) on this expert's z_k
    linear += 2 * d * c  # one head Linear(d, C) per modality
    # inter: the scorer u_m . z^(m); the weighted sums (sum_k g_k z_k, sum_m w_m l^(m)) are
    # fusion.mix, element-wise multiply and sum, which fvcore leaves uncounted
    einsum = 2 * d
    layer_norm = 3 * 5 * d  # fvcore's estimate: 5 per element of an affine LayerNorm

    assert res["by_operator"]["linear"] == linear * b
    assert res["by_operator"]["einsum"] == einsum * b
    assert res["by_operator"]["layer_norm"] == layer_norm * b
    assert res["per_batch"] == (linear + einsum + layer_norm) * b
    assert res["per_sample"] == pytest.approx(linear + einsum + layer_norm)
    assert res["batch_size"] == b and res["unit"] == "MAC"
    # element-wise ops are reported as not counted, not silently dropped
    assert "aten::gelu" in res["unsupported_ops"]
    assert "aten::mul" in res["unsupported_ops"] and "aten::sum" in res["unsupported_ops"]
    assert model.training  # count_macs restores the mode it found


def test_attention_ops_fvcore_lacks_are_counted():
    from fvcore.nn import FlopCountAnalysis

    b, n, e, heads = 3, 5, 16, 4

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(e, heads, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(b, n, e)
    want = 4 * b * n * e * e + 2 * b * n * n * e  # projections + QK^T + AV
    for grad in (True, False):  # scaled_dot_product_attention / the fused inference path
        with torch.set_grad_enabled(grad):
            fca = FlopCountAnalysis(M().eval(), (x,))
            fca.set_op_handle(**EXTRA_HANDLES)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            assert fca.total() == want
            assert not set(EXTRA_HANDLES) & set(fca.unsupported_ops())


class _Weighted(ExpertEncoder):
    name = "weighted"
    kinds = ("tabular",)

    def dim(self, modality):
        return 4

    def encode(self, modality, payloads):
        raise AssertionError("not called")

    def n_parameters(self) -> int:
        return 1000


class _WeightFree(_Weighted):
    name = "free"

    def n_parameters(self) -> int:
        return 0


def test_profile_medmix_on_synthetic_store(synth_store, one_thread, tmp_path):
    tensors = StoreTensors.from_store(synth_store, teacher="teacher")
    cfg = make_config(fuser="medmix", teacher="teacher", d=16)  # distillation on
    res = profile_fuser("medmix", tensors, cfg, device="cpu", batch_size=32, repeats=2,
                        warmup=1, include_experts=[_Weighted(), _WeightFree()])

    fuser = get_fuser("medmix")(
        FusionSpec(modalities=tensors.modalities, experts=tensors.experts,
                   dims=tensors.dims(), n_outputs=tensors.n_outputs), d=16)
    n_fuser = sum(p.numel() for p in fuser.parameters())
    n_heads = sum(dt * 16 + 16 for dt in tensors.teacher_dims().values())  # Linear(d_T, d)
    p = res["params"]
    assert res["distillation"] is True
    assert p["fuser"] == n_fuser
    assert p["teacher_heads"] == n_heads > 0
    assert p["trainable"] == n_fuser + n_heads
    assert p["experts"] == {"weighted": 1000, "free": 0}
    assert p["deployed"] == n_fuser + 1000  # teacher heads excluded, experts included

    assert res["macs"]["per_sample"] > 0 and res["macs"]["batch_size"] == 32
    for phase in ("inference", "train_step"):
        lat = res["latency"][phase]
        assert 0 < lat["median_ms"] <= lat["p90_ms"]
        assert lat["samples_per_s"] > 0 and lat["repeats"] == 2
    mem = res["memory"]
    assert mem["inference"]["peak_bytes"] >= n_fuser * 4  # at least the fp32 weights
    # training holds weights, grads and two AdamW moments of fuser and heads
    assert mem["train_step"]["peak_bytes"] >= (n_fuser + n_heads) * 4 * 4
    assert mem["peak_rss_bytes"] > 0 and "RSS" in mem["peak_rss_label"]

    paths = write_profile([res], tmp_path)
    assert json.loads(paths[0].read_text())[0]["fuser"] == "medmix"
    assert "| medmix |" in paths[1].read_text()
    assert load_profiles(tmp_path)["medmix"]["params"] == p


def test_profile_rejects_bad_sizes(synth_store):
    tensors = StoreTensors.from_store(synth_store)
    with pytest.raises(MedmixError, match="repeats"):
        profile_fuser("medmix", tensors, make_config(), device="cpu", repeats=0)


def test_tensor_memory_tracker_peak():
    tr = TensorMemoryTracker()
    with tr:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000
        del a
        c = torch.empty(500)  # 2000: peak stays 12000
        v = b.view(20, 100)  # a view: no new storage
    assert tr.peak == 12000
    assert tr.current == 10000
    del b, c, v
    assert tr.current == 0


def _write_run(folder, fuser, auroc, auprc, f1, acc):
    folder.mkdir(parents=True)
    test = {k: {"mean": v, "std": 0.01} for k, v in
            zip(("auroc", "auprc", "macro_f1", "accuracy"), (auroc, auprc, f1, acc))}
    (folder / "metrics.json").write_text(json.dumps({"fuser": fuser, "test": test}))
    return folder


def _profile(params, macs, mem):
    return {"params": {"deployed": params}, "macs": {"per_sample": macs},
            "memory": {"inference": {"peak_bytes": mem, "method": "m"}},
            "machine": {"device": "cpu"}, "batch_size": 256}


def test_efficiency_table_perf_cost_effscore(tmp_path):
    dirs = [_write_run(tmp_path / "r1", "medmix", 0.8, 0.6, 0.7, 0.9),
            _write_run(tmp_path / "r2", "concat", 0.7, 0.5, 0.6, 0.8),
            _write_run(tmp_path / "r3", "attention", 0.82, 0.62, 0.72, 0.92)]
    profiles = {"medmix": _profile(1000, 2000.0, 4000),
                "concat": _profile(8000, 2000.0, 500),  # ratios 8, 1, 1/8 -> Cost 1
                "attention": _profile(2000, 16000.0, 8000)}  # ratios 2, 8, 2 -> Cost 32^(1/3)
    rows = efficiency_table(dirs, profiles)
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["medmix", "concat", "attention"]
    ref = by["medmix"]
    assert ref["perf"] == pytest.approx(0.75)
    assert ref["cost"] == pytest.approx(1.0) and ref["eff_score"] == pytest.approx(1.0)
    assert by["concat"]["perf"] == pytest.approx(0.65)
    assert by["concat"]["cost"] == pytest.approx(1.0)
    assert by["concat"]["eff_score"] == pytest.approx(0.65 / 0.75)
    assert by["attention"]["perf"] == pytest.approx(0.77)
    assert by["attention"]["cost"] == pytest.approx(32 ** (1 / 3))
    assert by["attention"]["eff_score"] == pytest.approx((0.77 / 0.75) / 32 ** (1 / 3))
    # concat ties medmix on cost with lower perf: dominated; attention costs more, scores more
    assert [by[m]["pareto"] for m in ("medmix", "concat", "attention")] == [True, False, True]

    paths = write_efficiency(rows, tmp_path / "eff")
    names = {p.name for p in paths}
    assert {"efficiency.md", "efficiency.csv", "efficiency.png"} <= names
    assert (tmp_path / "eff" / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (tmp_path / "eff" / "efficiency.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,params") and len(csv_lines) == 4

    # a mapping names runs explicitly; the reference must be among them
    with pytest.raises(MedmixError, match="reference"):
        efficiency_table({"concat": dirs[1]}, profiles)
    with pytest.raises(MedmixError, match="No profile"):
        efficiency_table(dirs, {"medmix": profiles["medmix"]})
    with pytest.raises(MedmixError, match="metrics.json"):
        efficiency_table({"medmix": tmp_path / "nowhere"}, profiles)
    mixed = dict(profiles, concat={**profiles["concat"], "batch_size": 64})
    with pytest.raises(MedmixError, match="not comparable"):
        efficiency_table(dirs, mixed)


def test_undefined_metric_is_an_error(tmp_path):
    d = _write_run(tmp_path / "r", "medmix", 0.8, float("nan"), 0.7, 0.9)
    (d / "metrics.json").write_text((d / "metrics.json").read_text().replace("NaN", "null"))
    with pytest.raises(MedmixError, match="auprc"):
        efficiency_table([d], {"medmix": _profile(1, 1.0, 1)})


def test_pareto_front():
    # (cost, perf): A cheap and weak, B dominated by C, C, D best but dearest, E ties C
    cost = [0.5, 1.0, 0.9, 3.0, 0.9]
    perf = [0.60, 0.70, 0.75, 0.80, 0.75]
    assert pareto_front(cost, perf) == [True, False, True, True, True]
    assert pareto_front([1.0], [0.5]) == [True]
    assert not math.isnan(sum(cost))
    with pytest.raises(MedmixError):
        pareto_front([1.0, 2.0], [0.5])


def test_profile_module_still_exports_what_the_cli_and_benchmarks_import():
    import medmix_core.efficiency as efficiency
    import medmix_core.machine as machine
    import medmix_core.profile as profile

    for name in ("efficiency_table", "prepare_tensors", "profile_fuser", "profile_markdown",
                 "write_efficiency", "write_profile", "machine_info"):
        assert callable(getattr(profile, name)), name
    assert profile.efficiency_table is efficiency.efficiency_table
    assert profile.machine_info is machine.machine_info


def test_busy_cpu_note_only_when_threads_outnumber_a_loaded_machine():
    info = {**machine_info("cpu"), "usable_cores": 2}
    assert busy_cpu_note({**info, "torch_threads": 1, "loadavg": [9.0]}) is None
    assert busy_cpu_note({**info, "torch_threads": 4, "loadavg": [1.5]}) is None
    note = busy_cpu_note({**info, "torch_threads": 4, "loadavg": [9.0]})
    assert note is not None and "Load average 9.0 on 2 cores" in note
    assert busy_cpu_note({**info, "device": "cuda:0", "torch_threads": 4,
                          "loadavg": [9.0]}) is None


def test_units_keep_unmeasured_figures_apart_from_zero():
    assert format_count(None) == "-" and format_count(0) == "0"
    assert format_count(1234567) == "1,234,567"
    assert format_bytes(None) == "-" and format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_macs(None) == "-" and format_macs(0) == "0"
    assert (format_macs(2.5e9), format_macs(1.5e6), format_macs(1500)) == (
        "2.500 G", "1.500 M", "1.50 K")
