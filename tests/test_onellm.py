"""OneLLM: the expert on a tiny checkpoint with the released names and layout, against a
functional forward written from the state dict; and the ``onellm`` fuser's head."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medmix_core.errors import DataError, MedmixError, WeightsNotFoundError
from medmix_core.types import ImageData, ModalitySpec, TextData, VolumeData

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))

import tiny_onellm as T  # noqa: E402
from medmix_experts.foundation.base import ExpertOptionError  # noqa: E402
from medmix_experts.foundation.imaging import load_image, volume_slices  # noqa: E402
from medmix_experts.foundation.onellm import OneLLMExpert, infer_sizes, strip_prefix  # noqa: E402
from medmix_experts.foundation.weights import CheckpointError  # noqa: E402
from tiny_models import cxr_paths  # noqa: E402

IMG = ModalitySpec("cxr", "image")
VOL = ModalitySpec("ct", "volume")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onellm")
    return folder, T.write_checkpoint(folder)


def expert(folder, **kw):
    return OneLLMExpert(model_path=str(folder), clip_heads=T.CLIP_HEADS,
                        resampler_heads=T.RES_HEADS, **kw)


def test_sizes_come_from_the_tensors(ckpt):
    folder, sd = ckpt
    s = infer_sizes(sd, clip_heads=2, resampler_heads=4)
    assert (s["width"], s["patch"], s["image_size"], s["clip_layers"]) == (32, 8, 16, 2)
    assert (s["experts"], s["resampler_layers"], s["n_query"], s["dim"]) == (3, 2, 5, 48)
    assert infer_sizes(sd)["clip_heads"] == 1  # open_clip's width // 64 rule (at least 1)
    assert strip_prefix({"llma.a": 1, "module.llma.b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}
    ex = expert(folder)
    assert ex.dim(IMG) == 48 and ex.accepts(IMG) and ex.accepts(VOL)
    assert not ex.accepts(ModalitySpec("note", "text"))


def test_images_match_the_reference_forward(ckpt):
    folder, sd = ckpt
    ex = expert(folder)
    paths = cxr_paths()[:2]
    out = ex.encode(IMG, [ImageData([str(p)]) for p in paths])
    prep = ex.preprocess()
    assert prep.crop_hw == (16, 16) and prep.mean[0] == pytest.approx(0.48145466)
    pix = torch.from_numpy(np.stack([prep(load_image(str(p))) for p in paths]))
    with torch.no_grad():
        ref = T.project(sd, T.clip_tokens(sd, pix), "image").mean(1).numpy()  # [2, 48]
    assert out.shape == (2, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    # two views: the mean of the view embeddings
    both = ex.encode(IMG, [ImageData([str(paths[0]), str(paths[1])])])
    np.testing.assert_allclose(both[0], ref.mean(0), atol=1e-5)
    assert np.array_equal(out, ex.encode(IMG, [ImageData([str(p)]) for p in paths]))
    assert ex.n_parameters() > 0 and ex.provenance()["model_id"] == "csuhan/OneLLM-7B"


def test_volumes_are_read_as_video(ckpt):
    folder, sd = ckpt
    ex = expert(folder, n_slices=3)
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1000, 400, size=(7, 20, 20)).astype(np.float32)
    out = ex.encode(VOL, [VolumeData(vol)])
    prep = ex.preprocess()
    frames = torch.from_numpy(np.stack([prep(s) for s in volume_slices(vol, 3,
                                                                     (-1000.0, 400.0))]))
    with torch.no_grad():
        feats = T.clip_tokens(sd, frames).mean(0, keepdim=True)  # mean over time
        ref = T.project(sd, feats, "video").mean(1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert not np.allclose(out, ex.encode(IMG, [ImageData([np.stack([
        (np.clip(vol[3], -1000, 400) + 1000) / 1400] * 3, -1)])]), atol=1e-3)


def test_checkpoints_without_prefix_and_damaged_ones(ckpt, tmp_path):
    folder, sd = ckpt
    plain = tmp_path / "plain"
    T.write_checkpoint(plain, prefix="")
    img = [ImageData([str(cxr_paths()[0])])]
    np.testing.assert_array_equal(expert(plain).encode(IMG, img), expert(folder).encode(IMG, img))
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save({k: v for k, v in sd.items() if not k.startswith("clip_proj2.video")},
               broken / "consolidated.00-of-01.pth")
    with pytest.raises(CheckpointError, match="lacks"):
        expert(broken).encode(IMG, img)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "consolidated.00-of-01.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="download it again"):
        expert(junk).dim(IMG)


def test_fails_fast_and_clearly(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as err:
        OneLLMExpert()
    msg = str(err.value)
    assert "csuhan/OneLLM-7B" in msg and "consolidated.00-of-01.pth" in msg
    assert "MEDMIX_MODEL_DIR" in msg and "model_path" in msg
    folder = ckpt[0]
    with pytest.raises(ExpertOptionError, match="Unknown option"):
        OneLLMExpert(model_path=str(folder), heads=2)
    with pytest.raises(ExpertOptionError, match="resampler_heads"):
        OneLLMExpert(model_path=str(folder), resampler_heads=0)
    with pytest.raises(ExpertOptionError, match="divisible"):
        OneLLMExpert(model_path=str(folder), resampler_heads=5).dim(IMG)
    ex = expert(folder)
    with pytest.raises(DataError, match="expected ImageData"):
        ex.encode(IMG, [TextData("a")])
    with pytest.raises(DataError, match="no or None views"):
        ex.encode(IMG, [ImageData([])])
    assert ex.encode(IMG, []).shape == (0, 48)


# ----------------------------------------------------------------------------- the fuser
@pytest.fixture(scope="module")
def fuser_plugin():
    from conftest import registered
    from medmix_fusers import onellm

    from medmix_core.plugins import registry

    if "onellm" in registry().names("fusers"):
        yield
        return
    with registered(onellm, name="onellm-test"):
        yield


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    from medmix_datasets.synthetic import write_synthetic_store

    from medmix_core.batch import StoreTensors

    store = write_synthetic_store(tmp_path_factory.mktemp("onellm_store"), n=240,
                                  n_modalities=3, experts_per_modality=[2, 3, 1], dims=(8, 12, 10),
                                  missing=0.3, expert_missing=0.2, seed=0)
    return StoreTensors.from_store(store), store.splits


def test_fuser_reads_only_the_onellm_expert_and_honours_masks(fuser_plugin, tensors):
    from medmix_core.plugins import get_fuser
    from medmix_core.training import make_spec

    st, _ = tensors
    spec = make_spec(st)
    with pytest.raises(MedmixError, match="no modality of this run has the expert 'onellm'"):
        get_fuser("onellm")(spec)
    torch.manual_seed(0)
    model = get_fuser("onellm")(spec, d=16, expert="e1").eval()  # mod0 and mod1 have an e1
    assert set(model.slots) == {"mod0", "mod1"}
    batch = st.batch(torch.arange(64))
    with torch.no_grad():
        out = model(batch)
        assert out.logits.shape == (64, 1) and torch.isfinite(out.logits).all()
        # other experts, and masked OneLLM slots, can hold anything
        experts = {m: [x.clone() for x in xs] for m, xs in batch.experts.items()}
        for m, xs in experts.items():
            for k, x in enumerate(xs):
                if spec.experts[m][k] != "e1":
                    x.fill_(math.nan)
                else:
                    x[~batch.expert_mask[m][:, k]] = 1e6
        again = model(replace(batch, experts=experts))
    torch.testing.assert_close(out.logits, again.logits)
    e1 = torch.stack([batch.expert_mask[m][:, 1] for m in ("mod0", "mod1")], 1)
    assert torch.equal(out.rep_mask[:, :2], e1 & batch.modality_mask[:, :2])
    assert not out.rep_mask[:, 2].any() and (out.reps[~out.rep_mask] == 0).all()
    assert (out.router_weights[:, :2, 1] == out.rep_mask[:, :2].float()).all()
    assert (out.router_weights[:, :, 0] == 0).all()
    empty = ~out.rep_mask.any(1)
    assert empty.any()  # rows without any OneLLM embedding get the learned prior
    torch.testing.assert_close(out.logits[empty], model.prior.expand(int(empty.sum()), -1))
    np.testing.assert_allclose(out.modality_weights.sum(1)[~empty].numpy(), 1.0, atol=1e-6)


def test_fuser_trains_through_the_runner(fuser_plugin, tensors):
    from medmix_core.config import RunConfig
    from medmix_core.training import build_fuser, make_spec, train_seed

    st, splits = tensors
    cfg = RunConfig(fuser="onellm", fuser_options={"expert": "e0"}, d=16, epochs=6,
                    batch_size=64, lr=3e-3, patience=100, warmup_epochs=0, device="cpu",
                    progress=False, seeds=[0])
    res = train_seed(cfg, st, make_spec(st), splits, seed=0)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    with pytest.raises(MedmixError, match="not options of fuser 'onellm'"):
        build_fuser(RunConfig(fuser="onellm", fuser_options={"nope": 1}), make_spec(st))
