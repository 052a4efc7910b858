"""Foundation-model experts: weight resolution, loading, preprocessing and pooling.

The ``*_tiny_same_architecture_loads_and_pools`` tests build tiny randomly initialised
models of the same architectures and file layouts as the released checkpoints, place them
where real weights go (``$MEDMIX_MODEL_DIR/<name>``) and run the experts on real inputs
(chest X-rays, clinical sentences, an ICU stay). They prove the loading, preprocessing and
pooling code, not model quality.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from medmix_experts.foundation import (
    BiomedCLIPExpert,
    ChronosExpert,
    Dinov2Expert,
    Dinov3Teacher,
    ExpertOptionError,
    GatorTronExpert,
    MedCPTExpert,
    Qwen2Expert,
)
from medmix_experts.foundation.weights import CheckpointError
from PIL import Image

from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.experts import Teacher
from medmix_core.types import ImageData, ModalitySpec, TextData, TimeSeriesData, VolumeData

_spec = importlib.util.spec_from_file_location(
    "medmix_tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

IMG = ModalitySpec("cxr", "image")
VOL = ModalitySpec("ct", "volume")
TXT = ModalitySpec("note", "text")
TS = ModalitySpec("vitals", "timeseries")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A MEDMIX_MODEL_DIR holding every tiny model under its expert's folder name."""
    root = tmp_path_factory.mktemp("models")
    built = {
        "biomedclip": tiny.make_biomedclip(root / "biomedclip"),
        "dinov2": tiny.make_dinov2(root / "dinov2"),
        "dinov3": tiny.make_dinov3(root / "dinov3"),
        "gatortron": tiny.make_gatortron(root / "gatortron"),
        "qwen2": tiny.make_qwen2(root / "qwen2"),
        "medcpt-query": tiny.make_medcpt(root / "medcpt-query", seed=0),
        "medcpt-article": tiny.make_medcpt(root / "medcpt-article", seed=1),
        "chronos": tiny.make_chronos(root / "chronos"),
    }
    return root, built


@pytest.fixture
def models(model_dir, monkeypatch, tmp_path):
    root, built = model_dir
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return built


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "models").mkdir()
    return tmp_path


def _cxr_views():
    paths = tiny.cxr_paths()
    assert len(paths) >= 3
    return [str(p) for p in paths]


def _reference_pixels(paths, shortest, crop, mean, std, resample=Image.BICUBIC):
    """torchvision's Resize(shortest) + CenterCrop + ToTensor + Normalize, written out.

    open_clip (BiomedCLIP) and DINOv2's reference transforms are these torchvision steps:
    the shorter side becomes ``shortest`` (long side truncated to int), the crop offset is
    ``int(round((size - crop) / 2))``.
    """
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        nw, nh = (shortest, int(shortest * h / w)) if w <= h else (int(shortest * w / h), shortest)
        im = im.resize((nw, nh), resample=resample)
        top, left = round((nh - crop) / 2.0), round((nw - crop) / 2.0)
        arr = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
        norm = (arr - np.array(mean, np.float32)) / np.array(std, np.float32)
        out.append(norm.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


# -- BiomedCLIP ---------------------------------------------------------------------------

def test_biomedclip_tiny_same_architecture_loads_and_pools(models):
    sd = models["biomedclip"]
    ex = BiomedCLIPExpert()
    assert ex.weights.source == "MEDMIX_MODEL_DIR"
    assert ex.dim(IMG) == 16 and ex.family == "domain"
    views = _cxr_views()
    out = ex.encode(IMG, [ImageData(views=[v]) for v in views])
    assert out.shape == (3, 16) and out.dtype == np.float32 and np.isfinite(out).all()

    # open_clip's eval transform: shortest side -> 32 (bicubic), center crop 32, CLIP mean/std
    pixels = _reference_pixels(views, 32, 32, CLIP_MEAN, CLIP_STD)
    ref = tiny.reference_open_clip_vit(sd, pixels, heads=2).numpy()
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert np.abs(out[0] - out[2]).max() > 1e-3  # different radiographs, different embeddings

    # n_parameters counts the image tower only; provenance hashes the real file
    n_visual = sum(v.numel() for k, v in sd.items() if k.startswith("visual."))
    assert ex.n_parameters() == n_visual
    prov = ex.provenance()
    bin_file = Path(prov["local_path"]) / "open_clip_pytorch_model.bin"
    assert prov["model_id"] == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert prov["weights_sha256"]["open_clip_pytorch_model.bin"] == hashlib.sha256(
        bin_file.read_bytes()).hexdigest()


def test_biomedclip_views_are_averaged_and_arrays_equal_files(models):
    ex = BiomedCLIPExpert()
    views = _cxr_views()
    single = ex.encode(IMG, [ImageData(views=[v]) for v in views[:2]])
    both = ex.encode(IMG, [ImageData(views=views[:2])])
    np.testing.assert_allclose(both[0], single.mean(axis=0), atol=1e-6)
    as_array = np.asarray(Image.open(views[0]))  # [H, W] uint8 grayscale
    np.testing.assert_allclose(ex.encode(IMG, [ImageData(views=[as_array])])[0], single[0],
                               atol=1e-6)
    # deterministic (bitwise, same call twice), and independent of batching up to float error
    np.testing.assert_array_equal(ex.encode(IMG, [ImageData(views=[v]) for v in views[:2]]), single)
    np.testing.assert_allclose(ex.encode(IMG, [ImageData(views=[views[0]])]), single[:1], atol=1e-6)
    small = BiomedCLIPExpert(batch_size=1)
    np.testing.assert_allclose(small.encode(IMG, [ImageData(views=[v]) for v in views[:2]]),
                               single, atol=1e-5)


def test_biomedclip_rejects_checkpoint_with_wrong_layout(tmp_path, monkeypatch):
    folder = tmp_path / "biomedclip"
    sd = tiny.make_biomedclip(folder)
    del sd["visual.trunk.blocks.1.mlp.fc2.bias"]
    sd["visual.trunk.blocks.1.mlp.fc3.bias"] = torch.zeros(32)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    ex = BiomedCLIPExpert(model_path=str(folder))
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.mlp\.fc2\.bias"):
        ex.n_parameters()


def test_image_volume_25d_pipeline(models, tmp_path):
    """A CT phantom: slices sampled uniformly, HU windowed, per-slice embeddings averaged."""

    d, h, w = 20, 48, 40
    zz, yy, xx = np.mgrid[0:d, 0:h, 0:w]
    vol = np.full((d, h, w), -1000.0, dtype=np.float32)  # air
    body = ((yy - 24) / 20.0) ** 2 + ((xx - 20) / 17.0) ** 2 < 1
    vol[body] = 40.0  # soft tissue
    vol[body & (((yy - 22) / 9.0) ** 2 + ((xx - 12) / 5.0) ** 2 < 1)] = -820.0  # lung
    vol[body & (((yy - 38) / 3.0) ** 2 + ((xx - 20) / 3.0) ** 2 < 1)] = 1200.0  # vertebra
    vol += zz.astype(np.float32) * 3.0  # vary along the axis so slices differ

    ex = BiomedCLIPExpert(n_slices=4)
    got = ex.encode(VOL, [VolumeData(volume=vol)])
    assert got.shape == (1, 16)

    # reference: the windowed slices as grayscale [0, 1] images through the (separately
    # verified) 2-D path, averaged
    idx = np.round(np.linspace(0, d - 1, 4)).astype(int)  # [0, 6, 13, 19]
    slices = [((np.clip(vol[i], -1000, 400) + 1000) / 1400.0).astype(np.float32) for i in idx]
    per_slice = ex.encode(IMG, [ImageData(views=[s]) for s in slices])
    np.testing.assert_allclose(got[0], per_slice.mean(0), atol=1e-6)
    assert np.abs(per_slice[0] - per_slice[-1]).max() > 1e-4

    # files: .npy and .npz give the same result as the array
    np.save(tmp_path / "ct.npy", vol)
    np.savez_compressed(tmp_path / "ct.npz", volume=vol)
    files = ex.encode(VOL, [VolumeData(volume=str(tmp_path / "ct.npy")),
                            VolumeData(volume=str(tmp_path / "ct.npz"))])
    np.testing.assert_allclose(files, np.repeat(got, 2, axis=0), atol=1e-6)

    # HU beyond the window is clipped: raising bone further changes nothing
    hot = vol.copy()
    hot[hot > 400] = 3000.0
    np.testing.assert_allclose(ex.encode(VOL, [VolumeData(volume=hot)]), got, atol=1e-6)
    # a dataset's per-payload settings (manifest spec) are used unless the option is explicit
    from medmix_datasets.manifest import ManifestVolume

    hinted = ManifestVolume(volume=vol, n_slices=4, hu_window=(-1000.0, 400.0))
    np.testing.assert_allclose(BiomedCLIPExpert().encode(VOL, [hinted]), got, atol=1e-6)
    assert np.abs(BiomedCLIPExpert().encode(VOL, [VolumeData(volume=vol)]) - got).max() > 1e-5
    np.testing.assert_allclose(BiomedCLIPExpert(n_slices=4).encode(
        VOL, [ManifestVolume(volume=vol, n_slices=9)]), got, atol=1e-6)
    # a different window changes the result
    assert np.abs(BiomedCLIPExpert(n_slices=4, hu_window=(-160, 240)).encode(
        VOL, [VolumeData(volume=vol)]) - got).max() > 1e-4


def test_volume_errors_are_clear(models, tmp_path):
    ex = BiomedCLIPExpert(n_slices=2)
    with pytest.raises(DataError, match=r"expected \[D, H, W\]"):
        ex.encode(VOL, [VolumeData(volume=np.zeros((4, 4)))])
    with pytest.raises(DataError, match="does not exist"):
        ex.encode(VOL, [VolumeData(volume=str(tmp_path / "absent.npy"))])
    bad = np.zeros((3, 8, 8), dtype=np.float32)
    bad[2, 2, 2] = np.nan  # a sampled slice (n_slices=2 of 3 -> slices 0 and 2)
    with pytest.raises(DataError, match="NaN"):
        ex.encode(VOL, [VolumeData(volume=bad)])
    nii = tmp_path / "ct.nii.gz"
    nii.write_bytes(b"not really")
    if importlib.util.find_spec("nibabel") is None:
        with pytest.raises(DataError, match="pip install nibabel"):
            ex.encode(VOL, [VolumeData(volume=str(nii))])
    with pytest.raises(DataError, match="expected ImageData"):
        ex.encode(IMG, [VolumeData(volume=np.zeros((2, 8, 8)))])
    with pytest.raises(DataError, match="does not exist"):
        ex.encode(IMG, [ImageData(views=[str(tmp_path / "nope.jpeg")])])
    with pytest.raises(DataError, match=r"expected \[0, 1\]"):
        ex.encode(IMG, [ImageData(views=[np.full((8, 8), 7.0, dtype=np.float32)])])


# -- DINOv2 / DINOv3 ------------------------------------------------------------------------

def test_dinov2_tiny_same_architecture_loads_and_pools(models):
    model = models["dinov2"]
    views = _cxr_views()
    ex = Dinov2Expert()
    assert ex.dim(IMG) == 32 and ex.family == "general"
    cls_out = ex.encode(IMG, [ImageData(views=[v]) for v in views])
    mean_out = Dinov2Expert(pooling="mean").encode(IMG, [ImageData(views=[v]) for v in views])
    # the checkpoint's preprocessor_config.json (shortest edge 40, crop 32) is honoured
    pixels = _reference_pixels(views, 40, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert ex.preprocess().crop_hw == (32, 32) and ex.preprocess().resize_shortest == 40
    with torch.no_grad():
        hs = model(pixel_values=pixels).last_hidden_state  # [3, 1 + 16, 32]
    np.testing.assert_allclose(cls_out, hs[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(mean_out, hs[:, 1:].mean(1).numpy(), atol=1e-5)
    assert ex.n_parameters() == sum(p.numel() for p in model.parameters())


def test_dinov3_teacher_tiny_same_architecture_loads_and_pools(models):
    from medmix_core.plugins import get_teacher, registry

    assert get_teacher("dinov3") is Dinov3Teacher
    assert "dinov3" not in registry().names("experts")  # a teacher, never a deployed expert
    model = models["dinov3"]
    ex = Dinov3Teacher(pooling="mean")
    assert isinstance(ex, Teacher) and ex.family == "teacher"
    views = _cxr_views()
    out = ex.encode(IMG, [ImageData(views=[v]) for v in views])
    pre = ex.preprocess()
    assert pre.resize_hw == (32, 32) and pre.crop_hw is None
    pixels = torch.from_numpy(np.stack([
        pre(np.asarray(Image.open(v).convert("RGB"))) for v in views]))
    with torch.no_grad():
        hs = model(pixel_values=pixels).last_hidden_state  # [3, 1 + 2 registers + 16, 32]
    assert hs.shape[1] == 1 + 2 + 16
    # mean over patch tokens only: CLS and the 2 register tokens are left out
    np.testing.assert_allclose(out, hs[:, 3:].mean(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(Dinov3Teacher().encode(IMG, [ImageData(views=[views[0]])])[0],
                               hs[0, 0].numpy(), atol=1e-5)


# -- text -------------------------------------------------------------------------------

def _manual_pool(model, tok, texts, pooling, max_length=512):
    outs = []
    for t in texts:  # one at a time: no padding at all
        enc = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            h = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state[0]
        outs.append(h[0] if pooling == "cls" else h.mean(0))
    return torch.stack(outs).numpy()


def test_gatortron_tiny_same_architecture_loads_and_pools(models):
    model, _ = models["gatortron"]
    ex = GatorTronExpert()
    tok = ex.tokenizer
    assert ex.dim(TXT) == 32 and ex.family == "domain"
    texts = tiny.CLINICAL_TEXTS
    out = ex.encode(TXT, [TextData(t) for t in texts])  # one padded batch
    np.testing.assert_allclose(out, _manual_pool(model, tok, texts, "mean"), atol=1e-5)
    cls = GatorTronExpert(pooling="cls").encode(TXT, [TextData(t) for t in texts])
    np.testing.assert_allclose(cls, _manual_pool(model, tok, texts, "cls"), atol=1e-5)
    assert np.abs(cls - out).max() > 1e-3


def test_text_pooling_ignores_padding(models):
    """Mean over valid tokens: a short text padded in a batch == the same text alone."""
    short, long = "No acute distress.", tiny.CLINICAL_TEXTS[3]
    for cls in (GatorTronExpert, Qwen2Expert, MedCPTExpert):
        ex = cls()
        batch = ex.encode(TXT, [TextData(long), TextData(short)])
        alone = ex.encode(TXT, [TextData(short)])
        np.testing.assert_allclose(batch[1], alone[0], atol=1e-5, err_msg=cls.name)
        enc = ex.tokenizer([long, short], padding=True)
        assert sum(enc["attention_mask"][1]) < len(enc["attention_mask"][1])  # really padded


def test_qwen2_tiny_same_architecture_loads_and_pools(models):
    model, _ = models["qwen2"]
    ex = Qwen2Expert()
    tok = ex.tokenizer  # AutoTokenizer maps a qwen2 checkpoint to Qwen2Tokenizer
    assert ex.dim(TXT) == 32 and ex.family == "general"
    texts = tiny.CLINICAL_TEXTS
    out = ex.encode(TXT, [TextData(t) for t in texts])
    np.testing.assert_allclose(out, _manual_pool(model, tok, texts, "mean"), atol=1e-5)
    # truncation to max_length: equals the mean over the first 5 tokens alone
    five = Qwen2Expert(max_length=5).encode(TXT, [TextData(texts[0])])
    ids = tok(texts[0])["input_ids"][:5]
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    np.testing.assert_allclose(five[0], h.mean(0).numpy(), atol=1e-5)


def test_qwen2_tokenizer_without_pad_token_pads_with_eos(tmp_path, monkeypatch):
    folder = tmp_path / "qwen2"
    tiny.make_qwen2(folder, with_pad=False)
    ex = Qwen2Expert(model_path=str(folder))
    out = ex.encode(TXT, [TextData(tiny.CLINICAL_TEXTS[0]), TextData("No acute distress.")])
    alone = ex.encode(TXT, [TextData("No acute distress.")])[0]
    np.testing.assert_allclose(out[1], alone, atol=1e-5)


def test_medcpt_tiny_same_architecture_loads_and_pools(models):
    q_model, tok = models["medcpt-query"]
    a_model, _ = models["medcpt-article"]
    q = MedCPTExpert()
    a = MedCPTExpert(encoder="article")
    assert q.weights.path.name == "medcpt-query" and a.weights.path.name == "medcpt-article"
    assert q.opts["max_length"] == 64 and a.opts["max_length"] == 512
    assert q.weights.repo_id == "ncbi/MedCPT-Query-Encoder"
    assert a.weights.repo_id == "ncbi/MedCPT-Article-Encoder"
    texts = tiny.CLINICAL_TEXTS
    qo = q.encode(TXT, [TextData(t) for t in texts])
    ao = a.encode(TXT, [TextData(t) for t in texts])
    np.testing.assert_allclose(qo, _manual_pool(q_model, tok, texts, "cls", 64), atol=1e-5)
    np.testing.assert_allclose(ao, _manual_pool(a_model, tok, texts, "cls", 512), atol=1e-5)
    assert np.abs(qo - ao).max() > 1e-3
    with pytest.raises(ExpertOptionError, match="pooling"):
        MedCPTExpert(pooling="mean")


def test_text_errors_are_clear(models):
    ex = GatorTronExpert()
    with pytest.raises(DataError, match="empty text"):
        ex.encode(TXT, [TextData("   ")])
    with pytest.raises(DataError, match="expected TextData"):
        ex.encode(TXT, [None])
    with pytest.raises(DataError, match="kinds"):
        ex.encode(IMG, [TextData("x")])
    with pytest.raises(ExpertOptionError, match="Known options"):
        GatorTronExpert(max_lenght=12)


# -- Chronos -----------------------------------------------------------------------------

def _chronos_tokens(series: np.ndarray):
    """Chronos's MeanScaleUniformBins written out with numpy (independent of the expert)."""
    c = tiny.CHRONOS_CONFIG
    x = series[-c["context_length"]:].astype(np.float32)
    obs = ~np.isnan(x)
    scale = np.abs(x[obs]).mean() if obs.any() else 1.0
    scale = scale if scale > 0 else 1.0
    centers = np.linspace(-15, 15, c["n_tokens"] - c["n_special_tokens"] - 1, dtype=np.float32)
    edges = (centers[1:] + centers[:-1]) / 2
    ids = np.searchsorted(edges, x / scale, side="right") + 1 + c["n_special_tokens"]
    ids = np.clip(ids, 0, c["n_tokens"] - 1)
    ids[~obs] = c["pad_token_id"]
    return np.append(ids, c["eos_token_id"]), np.append(obs, True)


def _stay():
    stay = tiny.physionet_stay(0)
    names = ["HR", "RespRate", "NISysABP", "Temp", "Urine"]
    return TimeSeriesData(names, [stay[n][0] for n in names], [stay[n][1] for n in names]), stay


def test_chronos_tiny_same_architecture_loads_and_pools(models):
    from transformers import T5EncoderModel

    ex = ChronosExpert()
    assert ex.dim(TS) == 32 and ex.family == "general"
    ts, stay = _stay()
    out = ex.encode(TS, [ts])
    assert out.shape == (1, 32)

    enc = T5EncoderModel.from_pretrained(str(ex.weights.path)).eval()
    embs = []
    for name in ts.variables:
        t, v = stay[name]
        bins = np.full(48, np.nan)  # hourly means over the 48 h window, NaN = no observation
        for b in range(48):
            sel = (t >= b) & (t < b + 1) if b < 47 else (t >= b)
            if sel.any():
                bins[b] = v[sel].mean()
        ids, mask = _chronos_tokens(bins)
        with torch.no_grad():
            h = enc(
                input_ids=torch.from_numpy(ids[None]),
                attention_mask=torch.from_numpy(mask[None]).long(),
            )
        h = h.last_hidden_state[0].numpy()
        embs.append(h[mask].mean(0))
    np.testing.assert_allclose(out[0], np.mean(embs, axis=0), atol=1e-5)


def test_chronos_raw_order_padding_and_missing_variables(models):
    ts, stay = _stay()
    raw = ChronosExpert(resample_hours=None)
    # a variable without observations takes no part
    empty = TimeSeriesData(ts.variables + ["Lactate"], ts.times + [np.array([])],
                           ts.values + [np.array([])])
    a = raw.encode(TS, [ts])
    np.testing.assert_allclose(raw.encode(TS, [empty]), a, atol=1e-6)
    # padding invariance: series of different lengths batched together == each alone
    one = TimeSeriesData(["HR"], [stay["HR"][0][:5]], [stay["HR"][1][:5]])
    batch = raw.encode(TS, [ts, one])
    np.testing.assert_allclose(batch[0], a[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], raw.encode(TS, [one])[0], atol=1e-5)
    # the context keeps the last context_length steps only
    long = TimeSeriesData(["x"], [np.arange(200.0)], [np.sin(np.arange(200.0) / 5) + 2])
    tail = TimeSeriesData(["x"], [np.arange(64.0)], [np.sin(np.arange(136.0, 200.0) / 5) + 2])
    np.testing.assert_allclose(raw.encode(TS, [long]), raw.encode(TS, [tail]), atol=1e-5)
    nothing = TimeSeriesData(["HR"], [np.array([])], [np.array([])])
    with pytest.raises(DataError, match="missing modality"):
        raw.encode(TS, [nothing])


def test_chronos_rejects_non_chronos_t5(tmp_path):
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                            vocab_size=32)).save_pretrained(tmp_path / "t5")
    with pytest.raises(CheckpointError, match="chronos_config"):
        ChronosExpert(model_path=str(tmp_path / "t5"))


# -- weight resolution ---------------------------------------------------------------------

ALL = [
    (BiomedCLIPExpert, {}, "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
     "biomedclip"),
    (Dinov2Expert, {}, "facebook/dinov2-base", "dinov2"),
    (Dinov3Teacher, {}, "facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3"),
    (GatorTronExpert, {}, "UFNLP/gatortron-base", "gatortron"),
    (Qwen2Expert, {}, "Qwen/Qwen2-0.5B", "qwen2"),
    (MedCPTExpert, {}, "ncbi/MedCPT-Query-Encoder", "medcpt-query"),
    (MedCPTExpert, {"encoder": "article"}, "ncbi/MedCPT-Article-Encoder", "medcpt-article"),
    (ChronosExpert, {}, "amazon/chronos-t5-small", "chronos"),
]


@pytest.mark.parametrize("cls,opts,repo,local", ALL, ids=[a[3] for a in ALL])
def test_absent_weights_fail_fast_with_what_where_and_how(no_weights, cls, opts, repo, local):
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        cls(**opts)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    msg = str(info.value)
    assert repo in msg  # which model
    assert str(no_weights / "models" / local) in msg  # where it looked: MEDMIX_MODEL_DIR
    assert str(no_weights / "hf" / ("models--" + repo.replace("/", "--"))) in msg  # HF cache
    assert "MEDMIX_MODEL_DIR" in msg and "model_path" in msg  # how to fix
    assert f"huggingface-cli download {repo}" in msg


def test_explicit_model_path_is_the_only_place_looked(models, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"model_path=.*does not exist"):
        Dinov2Expert(model_path=str(tmp_path / "nowhere"))  # even though MEDMIX_MODEL_DIR has it
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="lacks model.safetensors"):
        Dinov2Expert(model_path=str(tmp_path / "half"))


def test_weights_found_in_hugging_face_cache_layout(model_dir, monkeypatch, tmp_path):
    """A hub cache (models--org--repo/snapshots/<rev>, refs/main) is read without network."""
    import shutil

    root, _ = model_dir
    cache = tmp_path / "hub"
    repo = cache / "models--facebook--dinov2-base"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(root / "dinov2", snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.delenv("MEDMIX_MODEL_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    ex = Dinov2Expert()
    assert ex.weights.source == "hf-cache" and ex.weights.path == snap
    assert ex.encode(IMG, [ImageData(views=[_cxr_views()[0]])]).shape == (1, 32)


def test_wrong_model_in_folder_is_named(model_dir, monkeypatch):
    root, _ = model_dir
    with pytest.raises(CheckpointError, match="model_type='qwen2'"):
        GatorTronExpert(model_path=str(root / "qwen2"))
    with pytest.raises(WeightsNotFoundError, match="lacks a tokenizer"):
        GatorTronExpert(model_path=str(root / "dinov2"))


def test_plugin_registers_every_expert():
    from medmix_core.plugins import get_expert

    for name, cls in [("biomedclip", BiomedCLIPExpert), ("dinov2", Dinov2Expert),
                      ("gatortron", GatorTronExpert), ("qwen2", Qwen2Expert),
                      ("medcpt", MedCPTExpert), ("chronos", ChronosExpert)]:
        assert get_expert(name) is cls
        assert cls.family in ("general", "domain")
    assert set(BiomedCLIPExpert.kinds) == {"image", "volume"}
    assert ChronosExpert.kinds == ("timeseries",) and Qwen2Expert.kinds == ("text",)


def test_biomedclip_open_clip_backend_needs_open_clip(models):
    if importlib.util.find_spec("open_clip") is not None:
        pytest.skip("open_clip is installed here")
    with pytest.raises(ExpertOptionError, match="backend='native'"):
        BiomedCLIPExpert(backend="open_clip").n_parameters()
    with pytest.raises(ExpertOptionError, match="'native' or 'open_clip'"):
        BiomedCLIPExpert(backend="timm")


def test_download_only_when_allowed(model_dir, no_weights, monkeypatch):
    """allow_download=True calls huggingface_hub.snapshot_download; the default never does."""
    import huggingface_hub

    root, _ = model_dir
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw.get("cache_dir")))
        return str(root / "dinov2")  # what a finished download returns: a snapshot folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(WeightsNotFoundError):
        Dinov2Expert()
    assert calls == []
    ex = Dinov2Expert(allow_download=True)
    assert calls == [("facebook/dinov2-base", str(no_weights / "hf"))]
    assert ex.weights.source == "download" and ex.dim(IMG) == 32


def test_16bit_png_is_min_max_scaled(models, tmp_path):
    ex = BiomedCLIPExpert()
    gray = np.asarray(Image.open(_cxr_views()[0]))  # [H, W] uint8
    g16 = gray.astype(np.uint16) * 200 + 1000  # a 16-bit radiograph's range
    png = tmp_path / "x16.png"
    Image.fromarray(g16).save(png)
    assert Image.open(png).mode.startswith("I")
    scaled = ((g16 - g16.min()) / float(g16.max() - g16.min())).astype(np.float32)
    np.testing.assert_allclose(ex.encode(IMG, [ImageData(views=[str(png)])]),
                               ex.encode(IMG, [ImageData(views=[scaled])]), atol=1e-6)
