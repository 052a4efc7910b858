"""The ``wsi`` expert on small pyramidal TIFFs written here with tifffile, checked against an
independent reference: the known tissue tiles cut from the full-resolution array, block-mean
downsampled with numpy, and pooled with the same tile encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import registered
from medmix_experts.wsi import (
    WSIExpert,
    otsu_threshold,
    saturation,
    select_tiles,
    tissue_fractions,
    tissue_mask,
)

from medmix_core import ExpertEncoder, ImageData, ModalitySpec, SlideData, hookimpl
from medmix_core.errors import DataError, UnknownPluginError
from medmix_core.plugins import get_expert, registry

tifffile = pytest.importorskip("tifffile", reason="writing test slides needs tifffile")
pytest.importorskip("tiffslide", reason="reading slides needs tiffslide (medmix[wsi])")

WSI = ModalitySpec("wsi", "slide")
MPP = 0.25  # a 40x scan
STEP = 64  # level-0 pixels per tile at 20x with tile_size 32
#: (row, col) of the 64-px blocks painted with tissue, in raster order
TISSUE = [(1, 2), (1, 3), (2, 2), (2, 3), (2, 4), (3, 3), (5, 8), (5, 9), (6, 8)]


class TileStats(ExpertEncoder):
    """A deterministic numpy tile encoder: per-channel mean and std of the tile in [0, 1]."""

    name = "tilestats"
    kinds = ("image",)

    def dim(self, modality):
        return 6

    def encode(self, modality, payloads):
        out = []
        for p in payloads:
            x = np.asarray(p.views[0], dtype=np.float64) / 255.0  # [h, w, 3]
            out.append(np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1))]))
        return np.asarray(out, dtype=np.float32)  # [N, 6]


class _Plugin:
    @hookimpl
    def register_experts(self, register):
        register("tilestats", TileStats)


@pytest.fixture()
def tilestats():
    with registered(_Plugin(), "tilestats-test"):
        yield


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [H/f, W/f, 3] uint8, the rounded mean of each f x f block."""
    h, w = a.shape[0] // f, a.shape[1] // f
    m = a[:h * f, :w * f].reshape(h, f, w, f, 3).astype(np.float64).mean(axis=(1, 3))
    return np.floor(m + 0.5).astype(np.uint8)


def slide_array(seed: int = 0, blocks=TISSUE) -> np.ndarray:
    """[512, 768, 3]: near-white glass, H&E-like purple noise in the tissue blocks."""
    rng = np.random.default_rng(seed)
    a = (240 + rng.integers(0, 12, size=(512, 768, 3))).astype(np.uint8)
    for r, c in blocks:
        tissue = np.stack([rng.integers(150, 210, (STEP, STEP)), rng.integers(30, 80, (STEP, STEP)),
                           rng.integers(120, 190, (STEP, STEP))], axis=2)
        a[r * STEP:(r + 1) * STEP, c * STEP:(c + 1) * STEP] = tissue
    return a


def write_slide(path: Path, a: np.ndarray, mpp: float | None = MPP,
                factors=(1, 2, 4)) -> Path:
    """A tiled pyramidal TIFF (levels as SubIFDs) with its pixel size in the resolution tag."""
    kw = {} if mpp is None else {"resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        for k, f in enumerate(factors):
            level = a if f == 1 else block_mean(a, f)
            if mpp is not None:
                kw["resolution"] = (1e4 / (mpp * f), 1e4 / (mpp * f))
            tw.write(level, tile=(64, 64), photometric="rgb", compression="zlib",
                     subifds=len(factors) - 1 if k == 0 else None,
                     subfiletype=1 if k else 0, **kw)
    return path


def reference(a: np.ndarray, blocks, factor: int, pooling: str = "mean") -> np.ndarray:
    """Independent slide embedding: cut the tissue blocks, downsample, TileStats, pool."""
    feats = []
    for r, c in sorted(blocks):
        tile = a[r * STEP:(r + 1) * STEP, c * STEP:(c + 1) * STEP]
        tile = block_mean(tile, factor) if factor > 1 else tile
        x = tile.astype(np.float64) / 255.0
        feats.append(np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1))]))
    feats = np.asarray(feats)
    out = feats.mean(axis=0)
    return np.concatenate([out, feats.max(axis=0)]) if pooling == "meanmax" else out


def expert(**kw) -> WSIExpert:
    opts = {"tile_expert": "tilestats", "tile_size": 32, "thumbnail_size": 200}
    opts.update(kw)
    return get_expert("wsi")(**opts)


# ----------------------------------------------------------------------------- tissue
def test_otsu_threshold_matches_a_brute_force_search():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(0.1, 0.03, 4000), rng.normal(0.6, 0.1, 1500)])
    v = np.clip(v, 0, 1)
    # quantise to bin centres so the brute force sees exactly what the histogram sees
    centers = (np.floor(v * 256).clip(0, 255) + 0.5) / 256
    best, best_t = -1.0, None
    for k in range(1, 256):
        t = k / 256
        lo, hi = centers[centers <= t], centers[centers > t]
        if len(lo) == 0 or len(hi) == 0:
            continue
        between = len(lo) * len(hi) / len(v) ** 2 * (lo.mean() - hi.mean()) ** 2
        if between > best + 1e-15:
            best, best_t = between, t
    assert otsu_threshold(v) == pytest.approx(best_t)
    assert 0.2 < best_t < 0.45
    assert otsu_threshold(np.full(10, 0.3)) == 0.0


def test_tissue_mask_is_the_painted_tissue():
    a = slide_array()
    mask = tissue_mask(a)
    painted = np.zeros(a.shape[:2], dtype=bool)
    for r, c in TISSUE:
        painted[r * STEP:(r + 1) * STEP, c * STEP:(c + 1) * STEP] = True
    assert np.array_equal(mask, painted)
    assert saturation(np.array([[[0, 0, 0], [200, 100, 100]]], np.uint8)).tolist() == [[0.0, 0.5]]
    # a blank slide: Otsu splits the glass noise, the saturation floor keeps it out
    assert not tissue_mask(slide_array(blocks=[])).any()


def test_tissue_fractions_and_capped_selection():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True
    xy = np.array([[0, 0], [4, 0], [0, 4], [2, 2]])
    frac = tissue_fractions(mask, xy, 4, (8, 8))
    assert frac.tolist() == [1.0, 0.0, 0.0, 0.25]
    fr = np.linspace(0, 1, 50)
    a = select_tiles(fr, 0.5, 10, seed=0)
    assert np.array_equal(a, select_tiles(fr, 0.5, 10, seed=0))
    assert len(a) == 10 and (fr[a] >= 0.5).all() and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, select_tiles(fr, 0.5, 10, seed=1))
    # nothing reaches the threshold: the tiles with most tissue
    assert select_tiles(np.array([0.1, 0.3, 0.2, 0.0]), 0.5, 2, 0).tolist() == [1, 2]


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("pooling", ["mean", "meanmax"])
def test_slide_embedding_matches_the_reference_at_20x(tmp_path, tilestats, pooling):
    a = slide_array()
    path = write_slide(tmp_path / "s.tif", a)
    enc = expert(pooling=pooling, batch_tiles=4)
    out = enc.encode(WSI, [SlideData([str(path)])])
    assert out.shape == (1, enc.dim(WSI)) == (1, 12 if pooling == "meanmax" else 6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], reference(a, TISSUE, 2, pooling), atol=1e-6)
    assert enc.family == "domain" and enc.provenance()["tile_expert"]["expert"] == "tilestats"


def test_magnification_picks_the_level_and_resizes_when_the_pyramid_lacks_it(tmp_path,
                                                                            tilestats):
    a = slide_array(seed=1)
    full = write_slide(tmp_path / "full.tif", a, factors=(1, 2, 4))
    sparse = write_slide(tmp_path / "sparse.tif", a, factors=(1, 4))
    # 10x on a 40x scan: 16-px tiles of 64 level-0 px, read from the x4 level
    ten = expert(magnification=10.0, tile_size=16).encode(WSI, [SlideData([str(full)])])
    np.testing.assert_allclose(ten[0], reference(a, TISSUE, 4), atol=1e-6)
    # 20x without an x2 level: read at level 0 and box-resized (rounding may differ by 1/255)
    twenty = expert().encode(WSI, [SlideData([str(sparse)])])
    np.testing.assert_allclose(twenty[0], reference(a, TISSUE, 2), atol=2e-3)
    # mpp= says the same as magnification=
    np.testing.assert_array_equal(expert(mpp=0.5).encode(WSI, [SlideData([str(full)])]),
                                  expert().encode(WSI, [SlideData([str(full)])]))


def test_several_slides_average_and_batching_does_not_change_the_result(tmp_path, tilestats):
    a, b = slide_array(seed=2), slide_array(seed=3, blocks=TISSUE[:4])
    pa, pb = write_slide(tmp_path / "a.tif", a), write_slide(tmp_path / "b.tif", b)
    one = expert(batch_tiles=1).encode(WSI, [SlideData([str(pa), str(pb)]), SlideData([str(pb)])])
    big = expert(batch_tiles=64).encode(WSI, [SlideData([str(pa), str(pb)]), SlideData([str(pb)])])
    np.testing.assert_allclose(one, big, atol=1e-6)
    want = (reference(a, TISSUE, 2) + reference(b, TISSUE[:4], 2)) / 2
    np.testing.assert_allclose(one[0], want, atol=1e-6)
    np.testing.assert_allclose(one[1], reference(b, TISSUE[:4], 2), atol=1e-6)


def test_max_tiles_caps_deterministically(tmp_path, tilestats):
    a = slide_array()
    path = str(write_slide(tmp_path / "s.tif", a))
    x = expert(max_tiles=3, seed=5).encode(WSI, [SlideData([path])])
    assert np.array_equal(x, expert(max_tiles=3, seed=5).encode(WSI, [SlideData([path])]))
    chosen = sorted(TISSUE)
    idx = np.sort(np.random.default_rng(5).choice(len(chosen), 3, replace=False))
    np.testing.assert_allclose(x[0], reference(a, [chosen[i] for i in idx], 2), atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="the tiny DINOv2 needs transformers")
def test_wraps_a_registered_image_expert_tiny_dinov2(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "medmix_tiny_models", Path(__file__).parent / "fixtures" / "tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tiny.make_dinov2(tmp_path / "dinov2")
    a = slide_array()
    path = write_slide(tmp_path / "s.tif", a)
    enc = get_expert("wsi")(tile_expert="dinov2", tile_size=32,
                            tile_options={"model_path": str(tmp_path / "dinov2")})
    out = enc.encode(WSI, [SlideData([str(path)])])
    dino = get_expert("dinov2")(model_path=str(tmp_path / "dinov2"))
    tiles = [block_mean(a[r * STEP:(r + 1) * STEP, c * STEP:(c + 1) * STEP], 2)
             for r, c in sorted(TISSUE)]
    want = dino.encode(ModalitySpec("tiles", "image"), [ImageData([t]) for t in tiles]).mean(axis=0)
    assert out.shape == (1, 32) and enc.family == "general"
    np.testing.assert_allclose(out[0], want, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_bad_slides_raise_clear_errors(tmp_path, tilestats):
    enc = expert()
    with pytest.raises(DataError, match="does not exist"):
        enc.encode(WSI, [SlideData([str(tmp_path / "nope.svs")])])
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(DataError, match="Could not read slide .*junk.svs"):
        enc.encode(WSI, [SlideData([str(junk)])])
    bare = write_slide(tmp_path / "bare.tif", slide_array(), mpp=None)
    with pytest.raises(DataError, match="base_mpp"):
        enc.encode(WSI, [SlideData([str(bare)])])
    ok = expert(base_mpp=MPP).encode(WSI, [SlideData([str(bare)])])
    np.testing.assert_allclose(ok[0], reference(slide_array(), TISSUE, 2), atol=1e-6)
    good = write_slide(tmp_path / "s.tif", slide_array())
    with pytest.raises(DataError, match="choose a lower magnification"):
        expert(magnification=80.0).encode(WSI, [SlideData([str(good)])])
    with pytest.raises(DataError, match="expected the path"):
        enc.encode(WSI, [SlideData([np.zeros((8, 8, 3), np.uint8)])])
    with pytest.raises(DataError, match="expected SlideData"):
        enc.encode(WSI, [None])


def test_bad_options_raise_clear_errors(tilestats):
    with pytest.raises(DataError, match="unknown option"):
        expert(tile_sise=32)
    with pytest.raises(DataError, match="pooling"):
        expert(pooling="attention")
    with pytest.raises(DataError, match="max_tiles"):
        expert(max_tiles=0)
    with pytest.raises(DataError, match="not 'image'"):
        expert(tile_expert="stats")
    with pytest.raises(UnknownPluginError, match="dinov"):
        expert(tile_expert="dinov7")


@pytest.mark.skipif(importlib.util.find_spec("openslide") is not None,
                    reason="OpenSlide is installed here")
def test_an_absent_reader_says_how_to_install_one(tmp_path, tilestats):
    path = write_slide(tmp_path / "s.tif", slide_array())
    with pytest.raises(DataError, match="pip install"):
        expert(reader="openslide").encode(WSI, [SlideData([str(path)])])


def test_wsi_is_registered():
    assert "wsi" in registry().names("experts")
