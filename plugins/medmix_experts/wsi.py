"""``wsi``: whole-slide images as an expert input, through any registered image expert.

The pipeline, per slide (the 2-D analogue of the CT 2.5D pipeline of
:mod:`medmix_experts.foundation.imaging`):

1. **Open** the slide with a maintained reader: ``tiffslide`` (pure Python over tifffile
   and zarr; SVS, generic pyramidal TIFF, NDPI, ...) or OpenSlide (``openslide-python`` +
   ``openslide-bin``). Option ``reader``: "auto" (tiffslide, else OpenSlide), "tiffslide",
   "openslide". Both are optional: ``pip install 'medmix[wsi]'``.
2. **Find tissue on a thumbnail** (longest side ``thumbnail_size``, default 1024 px): the
   HSV saturation ``(max - min) / max`` of each thumbnail pixel, thresholded with Otsu's
   method on its 256-bin histogram; the threshold is never below ``min_saturation``
   (default 0.05), so a blank slide's faint noise is not called tissue. Stained tissue is
   saturated; glass, background and pen-free white areas are not.
3. **Tile at a chosen magnification**: the target pixel size is ``10 / magnification``
   um/px (20x = 0.5 um/px, the usual convention) or ``mpp`` when given. The slide's own
   pixel size comes from its metadata (``base_mpp`` overrides it; a slide without one is
   an error, never a guess). Tiles of ``tile_size`` px at the target size form a grid over
   the slide; each is read from the pyramid level just finer than the target and resized
   to ``tile_size`` with PIL's box filter (the mean of the covered pixels). A tile is kept
   when at least ``tissue_fraction`` (default 0.5) of its footprint on the thumbnail is
   tissue; a slide where no tile reaches it keeps its tiles with the most tissue
   (``max_tiles`` of them), so a pale slide still gets an embedding.
4. **Cap, deterministically**: when more than ``max_tiles`` (default 256) tiles qualify,
   ``max_tiles`` are drawn without replacement by ``numpy.random.default_rng(seed)`` (option
   ``seed``, default 0) over the qualifying tiles in raster order; the same slide and
   options always give the same tiles.
5. **Embed** the tiles with the image expert named by ``tile_expert`` (default
   ``dinov2``, constructed with ``tile_options``), ``batch_tiles`` tiles per call, on the
   expert's device (``to(device)`` moves it). The tile expert sees each tile as a one-view
   :class:`ImageData` and preprocesses it as it does any image.
6. **Pool** to one embedding per slide, without attention (nothing is trained here):
   ``pooling="mean"`` (default): the mean of the tile embeddings, ``[d]``;
   ``pooling="meanmax"``: the mean and the element-wise maximum concatenated, ``[2d]``;
   the maximum keeps a focal finding (a small high-grade region) that the mean dilutes.
   A payload with several slides gets the mean of its slide embeddings.

Payloads are :class:`SlideData` (modality kind ``slide``): slide file paths. Bad input raises
:class:`DataError` saying what was expected and found: a missing or unreadable file, a
slide without a pixel size, a magnification finer than the scan, an absent reader.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core import ExpertEncoder, ImageData, ModalitySpec, SlideData, hookimpl
from medmix_core.errors import DataError
from medmix_core.types import Payload

#: pixel size (um/px) of a 1x objective: 20x -> 0.5 um/px
MPP_AT_1X = 10.0
READERS = ("auto", "tiffslide", "openslide")
POOLINGS = ("mean", "meanmax")
_INSTALL = ("pip install tiffslide (or: pip install openslide-python openslide-bin; "
            "both come with pip install 'medmix[wsi]')")

DEFAULTS: dict[str, Any] = {
    "tile_expert": "dinov2",
    "tile_options": {},
    "magnification": 20.0,
    "mpp": None,
    "base_mpp": None,
    "tile_size": 224,
    "max_tiles": 256,
    "tissue_fraction": 0.5,
    "min_saturation": 0.05,
    "thumbnail_size": 1024,
    "pooling": "mean",
    "seed": 0,
    "batch_tiles": 64,
    "reader": "auto",
}


# -- tissue detection ----------------------------------------------------------------------

def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB image.

    Args:
        rgb: ``[H, W, 3]`` uint8.
    Returns:
        ``[H, W]`` float64 in [0, 1]; 0 where the pixel is black.
    """
    x = rgb.astype(np.float64)
    hi, lo = x.max(axis=2), x.min(axis=2)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)  # [H, W]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut maximising between-class variance.

    Args:
        values: any shape, in [0, 1].
        bins: histogram bins.
    Returns:
        the threshold t: values ``> t`` are the upper class. 0.0 for constant input.
    """
    hist, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(p)  # [bins] share at or below bin k
    m0 = np.cumsum(p * centers)
    mt = m0[-1]
    w1 = 1.0 - w0
    between = np.zeros(bins)
    ok = (w0 > 0) & (w1 > 0)
    between[ok] = (mt * w0[ok] - m0[ok]) ** 2 / (w0[ok] * w1[ok])
    if not ok.any():
        return 0.0
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(thumbnail: np.ndarray, min_saturation: float = 0.05) -> np.ndarray:
    """Tissue pixels of a slide thumbnail (saturation above max(Otsu, ``min_saturation``)).

    Args:
        thumbnail: ``[h, w, 3]`` uint8 RGB.
        min_saturation: lowest threshold allowed.
    Returns:
        ``[h, w]`` bool.
    """
    s = saturation(thumbnail)
    return s > max(otsu_threshold(s), float(min_saturation))


# -- slide readers -------------------------------------------------------------------------

class Slide:
    """A whole-slide image opened with tiffslide or OpenSlide (level 0 = full resolution)."""

    def __init__(self, path: str | Path, reader: str = "auto") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"Slide file {self.path} does not exist; expected a whole-slide "
                            f"image (.svs, .tif, .ndpi, ...).")
        self.backend, module = _reader_module(reader)
        try:
            if self.backend == "tiffslide":
                self._s = module.TiffSlide(str(self.path))
            else:
                self._s = module.OpenSlide(str(self.path))
            self.dimensions = tuple(int(v) for v in self._s.dimensions)  # (W, H) at level 0
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._s.level_dimensions]
            self.level_downsamples = [float(d) for d in self._s.level_downsamples]
            props = dict(self._s.properties)
        except Exception as exc:  # each reader has its own error classes
            raise DataError(f"Could not read slide {self.path} with {self.backend}: "
                            f"{type(exc).__name__}: {exc}. Expected a whole-slide image the "
                            f"reader supports (SVS, pyramidal TIFF, NDPI, ...); the file may "
                            f"be truncated or of another format.") from exc
        key = "tiffslide.mpp-x" if self.backend == "tiffslide" else "openslide.mpp-x"
        try:
            mpp = float(props.get(key) or "nan")
        except (TypeError, ValueError):
            mpp = float("nan")
        self.mpp: float | None = mpp if np.isfinite(mpp) and mpp > 0 else None

    def thumbnail(self, longest: int) -> np.ndarray:
        """The whole slide, longest side ``longest`` px: ``[h, w, 3]`` uint8 RGB."""
        w, h = self.dimensions
        scale = min(1.0, longest / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        try:
            img = self._s.get_thumbnail(size)
        except Exception as exc:
            raise DataError(f"Could not read a thumbnail of slide {self.path}: "
                            f"{type(exc).__name__}: {exc}.") from exc
        return _rgb(np.asarray(img))

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """A region: top-left (x, y) in level-0 pixels, size (w, h) at ``level``.

        Returns:
            ``[h, w, 3]`` uint8 RGB (transparent pixels, outside the scan, are white).
        """
        try:
            if self.backend == "tiffslide":
                arr = self._s.read_region((int(x), int(y)), int(level), (int(w), int(h)),
                                          as_array=True)
            else:
                arr = np.asarray(self._s.read_region((int(x), int(y)), int(level),
                                                     (int(w), int(h))))
        except Exception as exc:
            raise DataError(f"Could not read a region of slide {self.path} (level {level}, "
                            f"x={x}, y={y}, {w}x{h}): {type(exc).__name__}: {exc}.") from exc
        return _rgb(arr)

    def close(self) -> None:
        try:
            self._s.close()
        except Exception:  # closing is best effort
            pass


def _rgb(arr: np.ndarray) -> np.ndarray:
    """Any reader output -> ``[h, w, 3]`` uint8, alpha composited onto white."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[-1] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        rgb = arr[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.round(rgb).astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8, copy=False)


def _reader_module(reader: str):
    """(backend name, imported module) for a ``reader`` option value."""
    order = ["tiffslide", "openslide"] if reader == "auto" else [reader]
    errors = []
    for name in order:
        try:
            return name, importlib.import_module(name)
        except (ImportError, OSError) as exc:  # openslide raises OSError without its library
            errors.append(f"{name}: {exc}")
    raise DataError(f"Reading whole-slide images needs a slide reader, and none is usable "
                    f"({'; '.join(errors)}). Install one: {_INSTALL}.")


# -- tiling ----------------------------------------------------------------------------------

def tile_grid(slide: Slide, target_mpp: float, tile_size: int) -> dict[str, Any]:
    """The tile grid of a slide at a target pixel size.

    Args:
        slide: an opened slide with a known ``mpp``.
        target_mpp: pixel size of the tiles (um/px).
        tile_size: tile side in pixels at ``target_mpp``.
    Returns:
        "xy" ``[T, 2]`` int64 level-0 top-left corners (raster order), "step" (level-0
        pixels per tile side), "level", "read" (tile side in pixels at that level).
    Raises:
        DataError: a target finer than the scan, or a slide smaller than one tile.
    """
    assert slide.mpp is not None
    ds = target_mpp / slide.mpp  # level-0 pixels per target pixel
    if ds < 1.0 - 1e-6:
        raise DataError(f"Slide {slide.path} is scanned at {slide.mpp:.4g} um/px, coarser than "
                        f"the requested {target_mpp:.4g} um/px; choose a lower magnification "
                        f"(at most {MPP_AT_1X / slide.mpp:.3g}x) or a larger mpp.")
    step = int(round(tile_size * ds))
    w, h = slide.dimensions
    if step > w or step > h:
        raise DataError(f"Slide {slide.path} ({w}x{h} px at {slide.mpp:.4g} um/px) is smaller "
                        f"than one {tile_size}-px tile at {target_mpp:.4g} um/px; lower "
                        f"tile_size or the magnification.")
    # the coarsest level that is still at least as fine as the target
    level = max(i for i, d in enumerate(slide.level_downsamples) if d <= ds + 1e-6)
    read = int(round(step / slide.level_downsamples[level]))
    ys, xs = np.mgrid[0:h - step + 1:step, 0:w - step + 1:step]
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)  # [T, 2] raster order
    return {"xy": xy, "step": step, "level": level, "read": read}


def tissue_fractions(mask: np.ndarray, xy: np.ndarray, step: int,
                     dims: tuple[int, int]) -> np.ndarray:
    """Share of tissue pixels of each tile's footprint on the thumbnail mask.

    Args:
        mask: ``[h, w]`` bool thumbnail tissue mask.
        xy: ``[T, 2]`` level-0 tile corners.
        step: tile side in level-0 pixels.
        dims: slide (W, H) at level 0.
    Returns:
        ``[T]`` float in [0, 1].
    """
    h, w = mask.shape
    sx, sy = w / dims[0], h / dims[1]
    csum = np.zeros((h + 1, w + 1), dtype=np.int64)
    csum[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)  # summed-area table
    x0 = np.clip(np.floor(xy[:, 0] * sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(xy[:, 1] * sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((xy[:, 0] + step) * sx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((xy[:, 1] + step) * sy).astype(np.int64), y0 + 1, h)
    area = (x1 - x0) * (y1 - y0)
    inside = csum[y1, x1] - csum[y0, x1] - csum[y1, x0] + csum[y0, x0]
    return inside / area


def select_tiles(fractions: np.ndarray, min_fraction: float, max_tiles: int,
                 seed: int) -> np.ndarray:
    """Indices of the tiles to embed, in raster order (see the module docs, steps 3-4).

    Args:
        fractions: ``[T]`` tissue share per tile.
        min_fraction: share a tile needs to count as tissue.
        max_tiles: cap on the number of tiles.
        seed: seed of the draw when more tiles qualify than the cap.
    Returns:
        ``[n]`` sorted int64 indices, 1 <= n <= max_tiles.
    """
    keep = np.flatnonzero(fractions >= min_fraction)
    if len(keep) == 0:  # a pale slide: its tiles with the most tissue (stable on ties)
        keep = np.sort(np.argsort(-fractions, kind="stable")[:max_tiles])
    if len(keep) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_tiles, replace=False))
    return keep.astype(np.int64)


def slide_tiles(slide: Slide, opts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The selected tiles of one slide and their level-0 corners.

    Args:
        slide: an opened slide.
        opts: the expert's resolved options.
    Returns:
        (corners ``[n, 2]`` int64, tiles ``[n, tile_size, tile_size, 3]`` uint8).
    """
    from PIL import Image

    base = opts["base_mpp"] if opts["base_mpp"] is not None else slide.mpp
    if base is None:
        raise DataError(f"Slide {slide.path} records no pixel size (um/px), so no "
                        f"magnification can be chosen. Give the expert option base_mpp= "
                        f"(the scan's um/px, e.g. 0.25 for 40x).")
    slide.mpp = float(base)
    target = float(opts["mpp"]) if opts["mpp"] is not None else MPP_AT_1X / opts["magnification"]
    size = int(opts["tile_size"])
    grid = tile_grid(slide, target, size)
    mask = tissue_mask(slide.thumbnail(int(opts["thumbnail_size"])), opts["min_saturation"])
    frac = tissue_fractions(mask, grid["xy"], grid["step"], slide.dimensions)
    idx = select_tiles(frac, float(opts["tissue_fraction"]), int(opts["max_tiles"]),
                       int(opts["seed"]))
    tiles = np.empty((len(idx), size, size, 3), dtype=np.uint8)  # [n, s, s, 3]
    r = grid["read"]
    for k, i in enumerate(idx):
        x, y = grid["xy"][i]
        region = slide.read(x, y, grid["level"], r, r)
        if r != size:
            region = np.asarray(Image.fromarray(region).resize((size, size), Image.BOX))
        tiles[k] = region
    return grid["xy"][idx], tiles


# -- the expert --------------------------------------------------------------------------------

class WSIExpert(ExpertEncoder):
    """Whole-slide images -> tissue tiles -> any image expert -> pooled slide embedding.

    Options: see the module docs (``tile_expert``, ``tile_options``, ``magnification`` /
    ``mpp``, ``base_mpp``, ``tile_size``, ``max_tiles``, ``tissue_fraction``,
    ``min_saturation``, ``thumbnail_size``, ``pooling``, ``seed``, ``batch_tiles``,
    ``reader``).
    """

    name: ClassVar[str] = "wsi"
    kinds: ClassVar[tuple[str, ...]] = ("slide",)
    version: ClassVar[str] = "1"
    #: slides per encode() call; each brings up to max_tiles tiles
    batch_size: ClassVar[int] = 4

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise DataError(f"Expert 'wsi': unknown option(s) {unknown}; it takes "
                            f"{sorted(DEFAULTS)}.")
        self.opts = {**DEFAULTS, **options}
        self._validate()
        from medmix_core.plugins import get_expert

        name = str(self.opts["tile_expert"])
        if name == self.name:
            raise DataError("Expert 'wsi' cannot be its own tile_expert; name an image expert "
                            "(e.g. tile_expert='dinov2').")
        cls = get_expert(name)
        if "image" not in getattr(cls, "kinds", ()):
            raise DataError(f"Expert 'wsi': tile_expert={name!r} encodes kinds "
                            f"{list(getattr(cls, 'kinds', ()))}, not 'image'; name an image "
                            f"expert (biomedclip, dinov2, ...).")
        self.tile = cls(**dict(self.opts["tile_options"]))
        # the slide embedding plays the tile expert's role in the committee
        self.family = getattr(self.tile, "family", "domain")
        self._tile_spec = ModalitySpec("wsi_tiles", "image")

    def _validate(self) -> None:
        o = self.opts

        def positive(key: str, integer: bool) -> None:
            v = o[key]
            ok = (isinstance(v, int) if integer else isinstance(v, (int, float)))
            if isinstance(v, bool) or not ok or not v > 0:
                kind = "a positive integer" if integer else "a positive number"
                raise DataError(f"Expert 'wsi': option {key}={v!r} must be {kind}.")

        for key in ("tile_size", "max_tiles", "thumbnail_size", "batch_tiles"):
            positive(key, True)
        positive("magnification", False)
        for key in ("mpp", "base_mpp"):
            if o[key] is not None:
                positive(key, False)
        for key in ("tissue_fraction", "min_saturation"):
            v = o[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise DataError(f"Expert 'wsi': option {key}={v!r} must be a number in [0, 1].")
        if o["pooling"] not in POOLINGS:
            raise DataError(f"Expert 'wsi': option pooling={o['pooling']!r} must be one of "
                            f"{list(POOLINGS)}.")
        if o["reader"] not in READERS:
            raise DataError(f"Expert 'wsi': option reader={o['reader']!r} must be one of "
                            f"{list(READERS)}.")
        if not isinstance(o["seed"], int) or isinstance(o["seed"], bool):
            raise DataError(f"Expert 'wsi': option seed={o['seed']!r} must be an integer.")
        if not isinstance(o["tile_options"], dict):
            raise DataError(f"Expert 'wsi': option tile_options must be a dict of the tile "
                            f"expert's options, got {type(o['tile_options']).__name__}.")

    def dim(self, modality: ModalitySpec) -> int:
        d = int(self.tile.dim(self._tile_spec))
        return 2 * d if self.opts["pooling"] == "meanmax" else d

    def to(self, device: str) -> WSIExpert:
        self.tile = self.tile.to(device)
        return self

    def check_weights(self) -> None:
        self.tile.check_weights()

    def n_parameters(self) -> int:
        return int(self.tile.n_parameters())

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["tile_expert"] = self.tile.provenance()
        return out

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed the slides of N payloads.

        Args:
            modality: a ``slide`` modality.
            payloads: N present :class:`SlideData`.
        Returns:
            ``[N, dim]`` float32: per payload, the mean over its slides of the pooled tile
            embeddings.
        """
        slides: list[tuple[int, Path]] = []
        for i, p in enumerate(payloads):
            if not isinstance(p, SlideData):
                found = "None (missing)" if p is None else type(p).__name__
                raise DataError(f"Expert 'wsi', modality {modality.name!r}: payload {i} is "
                                f"{found}, expected SlideData of slide paths (absent payloads "
                                f"are left out, not passed as None).")
            if not p.paths:
                raise DataError(f"Expert 'wsi', modality {modality.name!r}: payload {i} has "
                                f"no slides; a sample without slides is a missing modality.")
            for j, v in enumerate(p.paths):
                if not isinstance(v, (str, Path)):
                    raise DataError(f"Expert 'wsi', modality {modality.name!r}: payload {i} "
                                    f"view {j} is a {type(v).__name__}; expected the path of "
                                    f"a whole-slide image file.")
                slides.append((i, Path(v)))
        d = int(self.tile.dim(self._tile_spec))
        n = len(payloads)
        if n == 0:
            return np.zeros((0, self.dim(modality)), dtype=np.float32)
        sums = np.zeros((len(slides), d), dtype=np.float64)
        maxs = np.full((len(slides), d), -np.inf, dtype=np.float64)
        counts = np.zeros(len(slides), dtype=np.int64)
        pending: list[np.ndarray] = []
        owners: list[int] = []

        def flush() -> None:
            if not pending:
                return
            e = np.asarray(self.tile.encode(self._tile_spec, [ImageData([t]) for t in pending]),
                           dtype=np.float64)  # [b, d]
            if e.shape != (len(pending), d):
                raise DataError(f"Expert 'wsi': tile expert {self.opts['tile_expert']!r} "
                                f"returned shape {list(e.shape)} for {len(pending)} tiles; "
                                f"expected [{len(pending)}, {d}].")
            own = np.asarray(owners)
            np.add.at(sums, own, e)
            np.maximum.at(maxs, own, e)
            np.add.at(counts, own, 1)
            pending.clear()
            owners.clear()

        bs = int(self.opts["batch_tiles"])
        for k, (_, path) in enumerate(slides):
            slide = Slide(path, self.opts["reader"])
            try:
                _, tiles = slide_tiles(slide, self.opts)
            finally:
                slide.close()
            for t in tiles:
                pending.append(t)
                owners.append(k)
                if len(pending) >= bs:
                    flush()
        flush()
        pooled = sums / counts[:, None]  # [S, d] per slide
        if self.opts["pooling"] == "meanmax":
            pooled = np.concatenate([pooled, maxs], axis=1)  # [S, 2d]
        out = np.zeros((n, pooled.shape[1]), dtype=np.float64)
        per = np.zeros(n, dtype=np.int64)
        own = np.asarray([i for i, _ in slides])
        np.add.at(out, own, pooled)
        np.add.at(per, own, 1)
        out = (out / per[:, None]).astype(np.float32)  # [N, dim]
        if not np.isfinite(out).all():
            raise DataError(f"Expert 'wsi': tile expert {self.opts['tile_expert']!r} produced "
                            f"non-finite embeddings.")
        return out


@hookimpl
def register_experts(register):
    register("wsi", WSIExpert)
