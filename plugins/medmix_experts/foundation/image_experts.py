"""Image experts: BiomedCLIP (domain), DINOv2 (general) and the DINOv3 teacher.

All three accept modality kinds ``image`` and ``volume``:

* ``ImageData``: every view is embedded; a sample with several views (frontal + lateral)
  gets the mean of its view embeddings, so the output does not depend on view count.
* ``VolumeData`` (CT): the 2.5D pipeline of :mod:`.imaging` -- ``n_slices`` uniformly
  sampled axial slices (default 16), HU window ``hu_window`` (default (-1000, 400)) rescaled
  to [0, 1], gray -> RGB, per-slice 2-D embedding, mean over slices. A payload carrying its
  own ``n_slices`` / ``hu_window`` attributes (the ``manifest`` dataset sets them from its
  spec) uses them unless the expert was given those options explicitly.

Options (besides the common ones of :mod:`.base`): ``n_slices``, ``hu_window``; DINOv2 and
DINOv3 also ``pooling`` ("cls": the final-norm CLS token; "mean": mean of the patch tokens,
register tokens excluded); BiomedCLIP also ``backend`` ("native": the built-in tower of
:mod:`.vit`; "open_clip": open_clip's own model, when that package is installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError
from medmix_core.experts import Teacher
from medmix_core.types import ImageData, ModalitySpec, Payload, VolumeData

from .base import ExpertOptionError, FoundationExpert
from .imaging import (
    BICUBIC,
    BILINEAR,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    load_image,
    volume_slices,
)
from .weights import CheckpointError, WeightsSpec


class ImageExpert(FoundationExpert):
    """Shared image/volume logic: payloads -> preprocessed pixels -> pooled embeddings."""

    kinds: ClassVar[tuple[str, ...]] = ("image", "volume")
    batch_size: ClassVar[int] = 64
    default_options: ClassVar[dict[str, Any]] = {"n_slices": 16, "hu_window": (-1000.0, 400.0)}
    #: config "model_type" values this expert can load (empty: not checked)
    model_types: ClassVar[tuple[str, ...]] = ()

    def _validate_options(self) -> None:
        n = self.opts["n_slices"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ExpertOptionError(
                f"Option n_slices={n!r} of {self.name!r} must be a positive integer."
            )
        hw = self.opts["hu_window"]
        try:
            lo, hi = (float(v) for v in hw)
        except (TypeError, ValueError):
            raise ExpertOptionError(
                f"Option hu_window={hw!r} of {self.name!r} must be two numbers (low, high) HU."
            ) from None
        if not lo < hi:
            raise ExpertOptionError(f"Option hu_window={hw!r} of {self.name!r} needs low < high.")
        self.opts["hu_window"] = (lo, hi)
        pooling = self.opts.get("pooling")
        if "pooling" in self.default_options and pooling not in ("cls", "mean"):
            raise ExpertOptionError(
                f"Option pooling={pooling!r} of {self.name!r} must be 'cls' or 'mean'."
            )

    def _check_model_type(self) -> None:
        if self.model_types:
            mt = self.config().get("model_type")
            if mt not in self.model_types:
                raise CheckpointError(
                    f"{self.weights.config_file} has model_type={mt!r}; expert {self.name!r} "
                    f"loads {list(self.model_types)}. The folder holds another model: point "
                    f"model_path/MEDMIX_MODEL_DIR at {self.weights.repo_id}."
                )

    def _volume_settings(self, payload: VolumeData) -> tuple[int, tuple[float, float]]:
        """(n_slices, hu_window): an option given to the expert wins, then the payload's own
        ``n_slices`` / ``hu_window`` attributes (set by a dataset, e.g. ``manifest``), then
        the defaults (16, (-1000, 400))."""
        n = self.opts["n_slices"]
        if "n_slices" not in self.options and getattr(payload, "n_slices", None) is not None:
            n = int(payload.n_slices)
            if n < 1:
                raise DataError(f"{self.name}: a volume asks for n_slices={n}; expected >= 1.")
        window = self.opts["hu_window"]
        if "hu_window" not in self.options and getattr(payload, "hu_window", None) is not None:
            lo, hi = (float(v) for v in payload.hu_window)
            if not lo < hi:
                raise DataError(f"{self.name}: a volume asks for hu_window=({lo}, {hi}); "
                                f"expected low < high.")
            window = (lo, hi)
        return n, window

    def preprocess(self) -> ImagePreprocess:
        raise NotImplementedError

    def _forward(self, pixels):
        """[n, 3, H, W] float tensor -> [n, d] tensor."""
        raise NotImplementedError

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed images (mean over views) or CT volumes (mean over sampled slices).

        Args:
            modality: an ``image`` or ``volume`` modality.
            payloads: N present ``ImageData`` / ``VolumeData`` payloads.
        Returns:
            ``[N, dim]`` float32.
        """
        import torch

        self._check_payloads(modality, payloads, {"image": ImageData, "volume": VolumeData})
        n = len(payloads)
        d = self.dim(modality)
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        prep = self.preprocess()
        bs = int(self.opts["batch_size"])
        sums = np.zeros((n, d), dtype=np.float64)
        counts = np.zeros(n, dtype=np.int64)
        pending: list[np.ndarray] = []
        owners: list[int] = []
        model = self.model
        dtype = self.torch_dtype()

        def flush() -> None:
            if not pending:
                return
            x = torch.from_numpy(np.stack(pending)).to(self._device, dtype=dtype)  # [b, 3, H, W]
            with torch.no_grad():
                e = self._forward(x).float().cpu().numpy()  # [b, d]
            np.add.at(sums, np.asarray(owners), e.astype(np.float64))
            np.add.at(counts, np.asarray(owners), 1)
            pending.clear()
            owners.clear()

        model.eval()
        for i, p in enumerate(payloads):
            if isinstance(p, ImageData):
                if not p.views:
                    raise DataError(
                        f"{self.name}: modality {modality.name!r} payload {i} has no views; a "
                        f"sample without images is a missing modality (None)."
                    )
                for j, v in enumerate(p.views):
                    if v is None:
                        raise DataError(
                            f"{self.name}: modality {modality.name!r} payload {i} view {j} is "
                            f"None; list only present views."
                        )
                    pending.append(prep(load_image(v, where=f"{modality.name}[{i}] view {j}")))
                    owners.append(i)
                    if len(pending) >= bs:
                        flush()
            else:
                n_slices, window = self._volume_settings(p)
                for s in volume_slices(p.volume, n_slices, window, where=f"{modality.name}[{i}]"):
                    pending.append(prep(s))
                    owners.append(i)
                    if len(pending) >= bs:
                        flush()
        flush()
        return self._finite((sums / counts[:, None]).astype(np.float32), self.name)  # [N, d]


class BiomedCLIPExpert(ImageExpert):
    """BiomedCLIP's ViT-B/16 image tower; 512-d projected (not normalised) embedding."""

    name: ClassVar[str] = "biomedclip"
    family: ClassVar[str] = "domain"
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="biomedclip",
        repo_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        local_names=("biomedclip",),
        config_files=("open_clip_config.json",),
        weight_files=("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
    )
    default_options: ClassVar[dict[str, Any]] = {**ImageExpert.default_options, "backend": "native"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.opts["backend"] not in ("native", "open_clip"):
            raise ExpertOptionError(
                f"Option backend={self.opts['backend']!r} of 'biomedclip' must be 'native' or "
                f"'open_clip'."
            )
        cfg = self.config()
        if "model_cfg" not in cfg or "vision_cfg" not in cfg["model_cfg"]:
            raise CheckpointError(
                f"{self.weights.config_file} has no model_cfg.vision_cfg; expected BiomedCLIP's "
                f"open_clip_config.json."
            )

    def dim(self, modality: ModalitySpec) -> int:
        return int(self.config()["model_cfg"]["embed_dim"])

    def preprocess(self) -> ImagePreprocess:
        cfg = self.config()
        vision = cfg["model_cfg"]["vision_cfg"]
        pre = cfg.get("preprocess_cfg", {})
        size = vision.get("image_size", 224)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        interp = {"bicubic": BICUBIC, "bilinear": BILINEAR}.get(pre.get("interpolation", "bicubic"))
        mode = pre.get("resize_mode", "shortest")
        if interp is None or mode not in ("shortest", "squash"):
            raise CheckpointError(
                f"{self.weights.config_file}: preprocess_cfg interpolation="
                f"{pre.get('interpolation')!r}, resize_mode={mode!r} are not supported "
                f"(bicubic/bilinear; shortest/squash)."
            )
        mean = tuple(pre.get("mean", CLIP_MEAN))
        std = tuple(pre.get("std", CLIP_STD))
        if mode == "squash":
            return ImagePreprocess(None, (size, size), None, interp, mean, std)  # type: ignore[arg-type]
        return ImagePreprocess(size, None, (size, size), interp, mean, std)  # type: ignore[arg-type]

    def _load(self):
        import torch

        wf = self.weights.weight_file
        try:
            if wf.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(wf))
            else:
                try:  # memory-mapped: the text tower's tensors are never read
                    state = torch.load(wf, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
                    state = torch.load(wf, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"Could not read {wf}: {type(exc).__name__}: {exc}. The file looks damaged; "
                f"download BiomedCLIP again."
            ) from exc
        model_cfg = self.config()["model_cfg"]
        if self.opts["backend"] == "open_clip":
            return self._load_open_clip(state, model_cfg, str(wf))

        from .vit import build_from_open_clip

        return build_from_open_clip(state, model_cfg, where=str(wf))

    @staticmethod
    def _load_open_clip(state, model_cfg, where: str):
        """open_clip's own ``TimmModel`` image tower (needs open_clip and timm installed).

        Only the image tower is built, so BiomedCLIP's text tower (whose config open_clip
        would fetch from the hub) is never touched.
        """
        try:
            from open_clip.timm_model import TimmModel
        except ImportError as exc:
            raise ExpertOptionError(
                "backend='open_clip' needs the open_clip and timm packages, which are not "
                "installed; use the default backend='native' (same weights, no extra "
                "dependency)."
            ) from exc
        from .vit import visual_state_dict

        v = model_cfg["vision_cfg"]
        size = v.get("image_size", 224)
        tower = TimmModel(v["timm_model_name"], embed_dim=int(model_cfg["embed_dim"]),
                          image_size=size, pool=v.get("timm_pool", "avg"),
                          proj=v.get("timm_proj", "linear"),
                          proj_bias=bool(v.get("timm_proj_bias", False)))
        missing, unexpected = tower.load_state_dict(visual_state_dict(state), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{where} does not fit open_clip's TimmModel({v['timm_model_name']!r}): missing "
                f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}."
            )
        return tower  # forward == CLIP.encode_image(normalize=False)

    def _forward(self, pixels):
        return self.model(pixels)


class _HFVisionExpert(ImageExpert):
    """A Hugging Face ViT (DINOv2, DINOv3): CLS token or mean of patch tokens."""

    default_options: ClassVar[dict[str, Any]] = {**ImageExpert.default_options, "pooling": "cls"}
    default_preprocess: ClassVar[ImagePreprocess]
    model_class: ClassVar[str]

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._check_model_type()

    def dim(self, modality: ModalitySpec) -> int:
        return int(self.config()["hidden_size"])

    def preprocess(self) -> ImagePreprocess:
        return ImagePreprocess.from_hf_processor(self.weights.path, self.default_preprocess)

    def _n_prefix_tokens(self) -> int:
        return 1

    def _load(self):
        import transformers

        cls = getattr(transformers, self.model_class, None)
        if cls is None:
            raise CheckpointError(
                f"Expert {self.name!r} needs transformers.{self.model_class}, which the "
                f"installed transformers {transformers.__version__} lacks; upgrade it "
                f"(pip install -U transformers)."
            )
        return cls.from_pretrained(str(self.weights.path), local_files_only=True,
                                   dtype=self.torch_dtype())

    def _forward(self, pixels):
        out = self.model(pixel_values=pixels)
        if self.opts["pooling"] == "cls":
            return out.last_hidden_state[:, 0]  # [n, d] final-norm CLS token
        return out.last_hidden_state[:, self._n_prefix_tokens():].mean(dim=1)  # [n, d]


class Dinov2Expert(_HFVisionExpert):
    """DINOv2 (transformers ``Dinov2Model``), general-purpose image features."""

    name: ClassVar[str] = "dinov2"
    family: ClassVar[str] = "general"
    model_types: ClassVar[tuple[str, ...]] = ("dinov2",)
    model_class: ClassVar[str] = "Dinov2Model"
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="dinov2", repo_id="facebook/dinov2-base", local_names=("dinov2",))
    # facebook/dinov2-*'s preprocessor_config.json: shortest edge 256, center crop 224
    default_preprocess: ClassVar[ImagePreprocess] = ImagePreprocess(
        256, None, (224, 224), BICUBIC, IMAGENET_MEAN, IMAGENET_STD)


class Dinov3Teacher(_HFVisionExpert, Teacher):
    """DINOv3 ViT (transformers ``DINOv3ViTModel``), used as a distillation teacher."""

    name: ClassVar[str] = "dinov3"
    family: ClassVar[str] = "teacher"
    model_types: ClassVar[tuple[str, ...]] = ("dinov3_vit",)
    model_class: ClassVar[str] = "DINOv3ViTModel"
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="dinov3", repo_id="facebook/dinov3-vitb16-pretrain-lvd1689m", local_names=("dinov3",))
    # DINOv3ViTImageProcessor: resize to 224 x 224 (no crop), bilinear
    default_preprocess: ClassVar[ImagePreprocess] = ImagePreprocess(
        None, (224, 224), None, BILINEAR, IMAGENET_MEAN, IMAGENET_STD)

    def _n_prefix_tokens(self) -> int:
        return 1 + int(self.config().get("num_register_tokens", 0))
