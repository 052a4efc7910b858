"""Image and CT-volume preprocessing with PIL and numpy (no torchvision).

Images: each view is read (file path, or an array), converted to RGB, resized (shortest
side to ``resize_shortest`` keeping the aspect ratio, or exactly to ``resize_hw``), center
cropped to ``crop_hw``, scaled to [0, 1] and normalised with the model's own mean/std: the
same steps, in the same order, as the model's reference processor (open_clip's transform
for BiomedCLIP, the Hugging Face image processor for DINOv2/DINOv3). Resampling is PIL's;
processors built on torchvision may differ in the last decimals.

Input conventions:
    * 8-bit images (JPEG/PNG files, uint8 arrays) are used as they are.
    * images with more than 8 bits (16-bit PNG, uint16/int arrays) are min-max scaled per
      image to [0, 1], since their stored range (10, 12 or 16 bits) is not recorded.
    * float arrays must already be in [0, 1].
    * grayscale is replicated to three channels.

Volumes (the paper's 2.5D pipeline): ``n_slices`` axial slices are sampled uniformly over
the full depth, intensities are clipped to the HU window and rescaled to [0, 1], each slice
is replicated to RGB and preprocessed like an image; the expert embeds each slice and
averages the slice embeddings. Volumes are ``[D, H, W]`` arrays in Hounsfield units, or
files: ``.npy``, ``.npz`` (key ``volume``, or its only array), and ``.nii``/``.nii.gz``
when ``nibabel`` is installed (reoriented to RAS, then ``[z, y, x]`` with rows running
anterior to posterior and columns right to left, the radiological display).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmix_core.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes (the values Hugging Face's PILImageResampling uses too)
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
_RESAMPLE_NAMES = {"nearest": NEAREST, "lanczos": LANCZOS, "bilinear": BILINEAR,
                   "bicubic": BICUBIC, "box": BOX, "hamming": HAMMING}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize -> center crop -> [0, 1] -> normalise, as a model's processor does.

    Args:
        resize_shortest: shortest side after resizing (aspect ratio kept), or None.
        resize_hw: exact (height, width) after resizing, or None.
        crop_hw: (height, width) of the center crop, or None for no crop.
        resample: PIL resampling code.
        mean, std: per-channel normalisation constants.
    """

    resize_shortest: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.crop_hw:
            return self.crop_hw
        if self.resize_hw:
            return self.resize_hw
        raise DataError("An image preprocessing without a crop needs a fixed resize_hw.")

    @classmethod
    def from_hf_processor(cls, path: Path, default: ImagePreprocess) -> ImagePreprocess:
        """Read a Hugging Face ``preprocessor_config.json``; fields it lacks keep ``default``."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return default
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataError(f"{file} is not valid JSON ({exc}); download it again.") from exc
        shortest, hw, crop = default.resize_shortest, default.resize_hw, default.crop_hw
        if cfg.get("do_resize", True) and "size" in cfg:
            size = cfg["size"]
            if isinstance(size, int):
                shortest, hw = size, None
            elif "shortest_edge" in size:
                shortest, hw = int(size["shortest_edge"]), None
            elif "height" in size and "width" in size:
                shortest, hw = None, (int(size["height"]), int(size["width"]))
        elif not cfg.get("do_resize", True):
            shortest, hw = None, None
        if "do_center_crop" in cfg or "crop_size" in cfg:
            if cfg.get("do_center_crop", default.crop_hw is not None) and cfg.get("crop_size"):
                c = cfg["crop_size"]
                crop = (
                    (int(c), int(c)) if isinstance(c, int)
                    else (int(c["height"]), int(c["width"]))
                )
            elif not cfg.get("do_center_crop", True):
                crop = None
        resample = cfg.get("resample", default.resample)
        if isinstance(resample, str):
            resample = _RESAMPLE_NAMES.get(resample.lower(), default.resample)
        mean = tuple(float(v) for v in cfg.get("image_mean", default.mean))
        std = tuple(float(v) for v in cfg.get("image_std", default.std))
        return cls(shortest, hw, crop, int(resample), mean, std)  # type: ignore[arg-type]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image -> ``[3, H, W]`` float32, normalised.

        Args:
            image: ``[H, W, 3]`` uint8 RGB, or ``[H, W]`` float32 in [0, 1] (grayscale).
        Returns:
            ``[3, h, w]`` float32 array ready for the model.
        """
        from PIL import Image

        if image.dtype == np.uint8:
            pil = Image.fromarray(np.ascontiguousarray(image))  # mode RGB
            pil = self._resize_crop(pil)
            arr = np.asarray(pil, dtype=np.float32) / 255.0  # [h, w, 3]
        else:
            pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))  # mode F
            pil = self._resize_crop(pil)
            # bicubic overshoots; an 8-bit pipeline would clip, so clip too
            gray = np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)
            arr = np.repeat(gray[:, :, None], 3, axis=2)  # [h, w, 3]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((arr - mean) / std).transpose(2, 0, 1).astype(np.float32)  # [3, h, w]

    def _resize_crop(self, pil):
        w, h = pil.size
        if self.resize_hw is not None:
            pil = pil.resize((self.resize_hw[1], self.resize_hw[0]), resample=self.resample)
        elif self.resize_shortest is not None:
            s = self.resize_shortest
            # same rounding as torchvision.Resize / HF get_resize_output_image_size
            if w <= h:
                nw, nh = s, int(s * h / w)
            else:
                nh, nw = s, int(s * w / h)
            if (nw, nh) != (w, h):
                pil = pil.resize((nw, nh), resample=self.resample)
        if self.crop_hw is not None:
            ch, cw = self.crop_hw
            w, h = pil.size
            # only after an exact resize below the crop: scale up, no black pad
            if w < cw or h < ch:
                scale = max(cw / w, ch / h)
                pil = pil.resize((max(cw, round(w * scale)), max(ch, round(h * scale))),
                                 resample=self.resample)
                w, h = pil.size
            top = round((h - ch) / 2.0)  # torchvision's CenterCrop offsets
            left = round((w - cw) / 2.0)
            pil = pil.crop((left, top, left + cw, top + ch))
        return pil


def _array_to_image(arr: np.ndarray, where: str) -> np.ndarray:
    """An array view -> [H, W, 3] uint8 or [H, W] float32 in [0, 1]."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[:, :, :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise DataError(
            f"Image {where} has shape {tuple(arr.shape)}; expected [H, W] (grayscale) or "
            f"[H, W, 3] (RGB, channels last). Transpose channels-first arrays first."
        )
    if min(arr.shape[:2]) < 1:
        raise DataError(f"Image {where} is empty (shape {tuple(arr.shape)}).")
    if arr.dtype == np.uint8:
        return arr if arr.ndim == 3 else np.repeat(arr[:, :, None], 3, axis=2)
    if arr.dtype == bool:
        raise DataError(f"Image {where} is boolean; expected uint8, integer or float pixels.")
    if np.issubdtype(arr.dtype, np.integer):
        f = arr.astype(np.float32)
        lo, hi = float(f.min()), float(f.max())
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
    elif np.issubdtype(arr.dtype, np.floating):
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise DataError(f"Image {where} holds NaN or inf pixels; expected finite values.")
        if f.min() < -1e-6 or f.max() > 1 + 1e-6:
            raise DataError(
                f"Float image {where} has values in [{f.min():.4g}, {f.max():.4g}]; expected "
                f"[0, 1]. Scale it, or pass uint8 pixels."
            )
        f = np.clip(f, 0.0, 1.0)
    else:
        raise DataError(f"Image {where} has dtype {arr.dtype}; expected uint8, integer or float.")
    if f.ndim == 3:  # RGB float: back to 8 bits so it follows the processor path
        return np.round(f * 255.0).astype(np.uint8)
    return f


def load_image(view: Any, where: str = "") -> np.ndarray:
    """Read one view.

    Args:
        view: a file path (any format PIL reads, or ``.npy``), or an array.
        where: text naming the view in error messages.
    Returns:
        ``[H, W, 3]`` uint8 RGB, or ``[H, W]`` float32 grayscale in [0, 1] (>8-bit input).
    """
    if isinstance(view, np.ndarray):
        return _array_to_image(view, where or "(array)")
    if isinstance(view, (str, Path)):
        path = Path(view)
        label = f"{where} {path}".strip()
        if not path.is_file():
            raise DataError(f"Image file {path} does not exist ({where or 'image view'}).")
        if path.suffix.lower() == ".npy":
            return _array_to_image(np.load(path, allow_pickle=False), label)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return _array_to_image(np.asarray(im), label)
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"Could not read image {path}: {exc}. Expected a file PIL can "
                            f"open (JPEG, PNG, ...) or a .npy array.") from exc
    try:  # a PIL image
        from PIL import Image

        if isinstance(view, Image.Image):
            if view.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _array_to_image(np.asarray(view), where or "(PIL image)")
            return np.asarray(view.convert("RGB"), dtype=np.uint8)
    except ImportError:  # pragma: no cover
        pass
    raise DataError(
        f"Image view {where} is a {type(view).__name__}; expected a file path, a numpy array "
        f"or a PIL image."
    )


# -- volumes -------------------------------------------------------------------------------

def slice_indices(depth: int, n_slices: int) -> np.ndarray:
    """Uniformly spaced axial slice indices over the full depth (all slices if fewer)."""
    if depth < 1:
        raise DataError("A volume with zero slices cannot be encoded.")
    return np.unique(np.round(np.linspace(0, depth - 1, n_slices)).astype(np.int64))


def _open_volume(vol: Any, where: str):
    """(shape [D, H, W], slice getter) without reading the whole volume when avoidable."""
    if isinstance(vol, np.ndarray):
        arr = vol
    elif isinstance(vol, (str, Path)):
        path = Path(vol)
        if not path.is_file():
            raise DataError(f"Volume file {path} does not exist ({where or 'volume'}).")
        name = path.name.lower()
        if name.endswith(".npy"):
            arr = np.load(path, mmap_mode="r", allow_pickle=False)  # reads sampled slices only
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "volume" in keys:
                    arr = z["volume"]
                elif len(keys) == 1:
                    arr = z[keys[0]]
                else:
                    raise DataError(
                        f"Volume file {path} holds arrays {keys}; expected one named 'volume' "
                        f"or a single array."
                    )
        elif name.endswith((".nii", ".nii.gz")):
            try:
                import nibabel as nib
            except ImportError as exc:
                raise DataError(
                    f"Reading {path} needs the optional package nibabel, which is not "
                    f"installed: pip install nibabel (or convert the volume to .npy [D, H, W] "
                    f"in HU)."
                ) from exc
            img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+
            shape = img.shape
            if len(shape) != 3:
                raise DataError(f"NIfTI volume {path} has shape {shape}; expected 3-D.")

            def get(i: int) -> np.ndarray:
                # dataobj applies scl_slope/scl_inter: values are HU
                s = np.asarray(img.dataobj[:, :, int(i)], dtype=np.float32)  # [x, y]
                return s.T[::-1, ::-1]  # rows anterior->posterior, cols right->left

            return (shape[2], shape[1], shape[0]), get
        else:
            raise DataError(
                f"Volume file {path} has an unsupported type; expected .npy, .npz, .nii or "
                f".nii.gz (a [D, H, W] volume in HU)."
            )
    else:
        raise DataError(
            f"Volume {where} is a {type(vol).__name__}; expected a [D, H, W] array in HU or a "
            f"path to .npy/.npz/.nii.gz."
        )
    if arr.ndim != 3:
        raise DataError(
            f"Volume {where} has shape {tuple(arr.shape)}; expected [D, H, W] (axial slices "
            f"first)."
        )
    if not (
        np.issubdtype(arr.dtype, np.number)
        and not np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise DataError(f"Volume {where} has dtype {arr.dtype}; expected numbers (HU).")
    return tuple(arr.shape), (lambda i: np.asarray(arr[int(i)], dtype=np.float32))


def volume_slices(vol: Any, n_slices: int, hu_window: tuple[float, float],
                  where: str = "") -> list[np.ndarray]:
    """The 2.5D slices of one CT volume.

    Args:
        vol: ``[D, H, W]`` array in HU, or a path to .npy/.npz/.nii(.gz).
        n_slices: how many axial slices to sample uniformly over the depth.
        hu_window: (low, high) HU clip window.
        where: text naming the volume in error messages.
    Returns:
        ``n`` grayscale slices, each ``[H, W]`` float32 in [0, 1] (n = min(n_slices, D)).
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    shape, get = _open_volume(vol, where)
    if min(shape) < 1:
        raise DataError(f"Volume {where} is empty (shape {shape}).")
    out = []
    for i in slice_indices(shape[0], n_slices):
        s = get(int(i))
        if not np.isfinite(s).all():
            raise DataError(f"Volume {where} slice {int(i)} holds NaN or inf; expected finite HU.")
        out.append(((np.clip(s, lo, hi) - lo) / (hi - lo)).astype(np.float32))  # [H, W]
    return out
