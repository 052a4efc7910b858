"""``onellm``: OneLLM (Han et al., CVPR 2024) as a frozen expert, from its released checkpoint.

OneLLM aligns many modalities with one LLM through three shared parts, which this module
rebuilds with the released parameter names (``csuhan/OneLLM-7B``,
``consolidated.00-of-01.pth``, keys optionally prefixed ``llma.``), so the released state
dict loads as it is:

* the **universal encoder**: a frozen CLIP ViT-L/14 (``clip.visual.*``: ``conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N``,
  ``ln_post``), all tokens kept after ``ln_post``, no CLIP projection;
* the **modality tokenizers**: for images and video, CLIP's own patch convolution
  (``clip.visual.conv1``); video frames are encoded one by one and averaged over time;
* the **universal projection module**: per modality ``clip_proj1.<m>`` (Linear + LayerNorm),
  30 learned ``resample_tokens.<m>`` prepended, a router ``routers.<m>`` (fc1-GELU-fc2,
  sigmoid, normalised over experts), three experts ``resample_layers.<e>`` of 8 transformer
  blocks (RMSNorm, no rotary embedding, full attention, SwiGLU feed-forward), the 30 token
  outputs weighted by the router and summed, then ``clip_proj2.<m>`` (Linear + LayerNorm)
  into the LLM's width (4096).

The expert's embedding of a payload is the mean of those 30 projected tokens (what the LLM
would read between the modality's start and end tags), 4096-d: an image as modality
"image" (several views: mean of the view embeddings), a CT volume as modality "video" over
its 2.5D slices (``n_slices`` frames, HU-windowed). The LLM (LLaMA-2-7B ``tok_embeddings``,
``layers``, ``norm``, ``output``) and the tokenizers of other modalities (audio, point,
IMU, fMRI) are in the file but not needed, so they are not built; text is not encoded
(OneLLM reads text with the LLM itself, which needs the LLaMA-2 SentencePiece tokenizer).

The release has no config file: every size is read from tensor shapes. Two numbers are
not in the shapes and are options: ``clip_heads`` (default width // 64, 16 for ViT-L/14,
open_clip's rule) and ``resampler_heads`` (16, as OneLLM sets it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.types import ImageData, ModalitySpec, Payload, VolumeData

from .base import ExpertOptionError
from .image_experts import ImageExpert
from .imaging import BICUBIC, CLIP_MEAN, CLIP_STD, ImagePreprocess, load_image, volume_slices
from .weights import CheckpointError, WeightsSpec

CHECKPOINT = "consolidated.00-of-01.pth"
#: OneLLM modalities this expert builds: images, and CT volumes read as video
MODALS = ("image", "video")
_PREFIXES = ("llma.", "module.")


def _modules():
    """The torch modules, defined on first use (torch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class QuickGELU(nn.Module):  # OpenAI CLIP's activation
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    class ResidualAttentionBlock(nn.Module):
        """open_clip's block: ``ln_1``, ``attn`` (nn.MultiheadAttention), ``ln_2``, ``mlp``."""

        def __init__(self, width: int, heads: int, mlp: int) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.ln_2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(width, mlp))
            self.mlp.add_module("gelu", QuickGELU())
            self.mlp.add_module("c_proj", nn.Linear(mlp, width))

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class Transformer(nn.Module):
        def __init__(self, width: int, layers: int, heads: int, mlp: int) -> None:
            super().__init__()
            self.resblocks = nn.ModuleList(
                [ResidualAttentionBlock(width, heads, mlp) for _ in range(layers)])

        def forward(self, x):
            for block in self.resblocks:
                x = block(x)
            return x

    class CLIPVisual(nn.Module):
        """The universal encoder: CLIP ViT, every token after ``ln_post``."""

        def __init__(self, width, patch, n_tokens, layers, heads, mlp, proj_dim) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(width))
            self.positional_embedding = nn.Parameter(torch.zeros(n_tokens, width))
            self.ln_pre = nn.LayerNorm(width)
            self.transformer = Transformer(width, layers, heads, mlp)
            self.ln_post = nn.LayerNorm(width)
            # present in the file, unused: OneLLM keeps the width-d tokens
            self.proj = nn.Parameter(torch.zeros(width, proj_dim)) if proj_dim else None

        def forward(self, pixels):  # [n, 3, H, W] -> [n, 1 + g*g, w]
            x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [n, g*g, w]
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
            return self.ln_post(self.transformer(self.ln_pre(x)))

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
                x) * self.weight

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.wq = nn.Linear(dim, dim, bias=False)
            self.wk = nn.Linear(dim, dim, bias=False)
            self.wv = nn.Linear(dim, dim, bias=False)
            self.wo = nn.Linear(dim, dim, bias=False)

        def forward(self, x):  # full attention, no rotary embedding (OneLLM's resampler)
            b, n, d = x.shape

            def split(t):
                return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

            o = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)),
                                               split(self.wv(x)))  # [b, heads, n, d/heads]
            return self.wo(o.transpose(1, 2).reshape(b, n, d))

    class FeedForward(nn.Module):
        def __init__(self, dim: int, hidden: int) -> None:
            super().__init__()
            self.w1 = nn.Linear(dim, hidden, bias=False)
            self.w2 = nn.Linear(hidden, dim, bias=False)
            self.w3 = nn.Linear(dim, hidden, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
            super().__init__()
            self.attention = Attention(dim, heads)
            self.feed_forward = FeedForward(dim, hidden)
            self.attention_norm = RMSNorm(dim, eps)
            self.ffn_norm = RMSNorm(dim, eps)

        def forward(self, x):
            h = x + self.attention(self.attention_norm(x))
            return h + self.feed_forward(self.ffn_norm(h))

    class Mlp(nn.Module):
        def __init__(self, dim: int, hidden: int, out: int) -> None:
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(hidden, out)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Clip(nn.Module):
        def __init__(self, visual) -> None:
            super().__init__()
            self.visual = visual

    class OneLLMEncoder(nn.Module):
        """Universal encoder + universal projection module, OneLLM's parameter names."""

        def __init__(self, s: dict[str, Any], modals: Sequence[str]) -> None:
            super().__init__()
            w = s["width"]
            self.clip = Clip(CLIPVisual(w, s["patch"], s["n_tokens"], s["clip_layers"],
                                        s["clip_heads"], s["clip_mlp"], s["proj_dim"]))
            self.resample_layers = nn.ModuleDict({
                str(e): nn.ModuleList([Block(w, s["resampler_heads"], s["ffn"], s["eps"])
                                       for _ in range(s["resampler_layers"])])
                for e in range(s["experts"])})
            self.routers = nn.ModuleDict(
                {m: Mlp(w, s["router_hidden"], s["experts"]) for m in modals})
            self.resample_tokens = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(1, s["n_query"], w)) for m in modals})
            self.clip_proj1 = nn.ModuleDict(
                {m: nn.Sequential(nn.Linear(w, w), nn.LayerNorm(w)) for m in modals})
            self.clip_proj2 = nn.ModuleDict(
                {m: nn.Sequential(nn.Linear(w, s["dim"]), nn.LayerNorm(s["dim"]))
                 for m in modals})
            self.start_tag = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(1, 1, s["dim"])) for m in modals})
            self.end_tag = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(1, 1, s["dim"])) for m in modals})

        def project(self, feats, modal: str):
            """[b, L, w] universal-encoder tokens -> [b, n_query, dim] LLM-space tokens."""
            x = self.clip_proj1[modal](feats)
            q = self.resample_tokens[modal]
            n = q.shape[1]
            x = torch.cat([q.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # [b, n+L, w]
            r = self.routers[modal](x).sigmoid()
            r = r / r.sum(dim=-1, keepdim=True)  # [b, n+L, experts]
            out = 0
            for e, layers in self.resample_layers.items():
                h = x
                for layer in layers:
                    h = layer(h)
                out = out + h[:, :n] * r[:, :n, int(e)].unsqueeze(-1)  # [b, n, w]
            return self.clip_proj2[modal](out)

        def encode_image(self, pixels):  # [n, 3, H, W] -> [n, n_query, dim]
            return self.project(self.clip.visual(pixels), "image")

        def encode_video(self, frames):  # [B, T, 3, H, W] -> [B, n_query, dim]
            b, t = frames.shape[:2]
            feats = self.clip.visual(frames.flatten(0, 1))  # [B*T, L, w]
            return self.project(feats.view(b, t, *feats.shape[1:]).mean(dim=1), "video")

    return OneLLMEncoder


def strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Keys without the ``llma.`` (MetaModel) or ``module.`` (DDP) prefix."""
    out = {}
    for k, v in state.items():
        while k.startswith(_PREFIXES):  # "module.llma." from a DDP-wrapped MetaModel
            k = k[len(next(p for p in _PREFIXES if k.startswith(p))):]
        out[k] = v
    return out


def infer_sizes(state: dict[str, Any], clip_heads: int | None = None,
                resampler_heads: int = 16) -> dict[str, Any]:
    """Every size of the universal encoder and projection module, from tensor shapes.

    Raises:
        CheckpointError: a tensor OneLLM's layout needs is absent.
    """
    def need(key: str):
        if key not in state:
            raise CheckpointError(
                f"The OneLLM checkpoint lacks {key!r}; expected the released layout of "
                f"csuhan/OneLLM-7B ({CHECKPOINT}: clip.visual.*, resample_layers.*, routers.*, "
                f"clip_proj1.*, clip_proj2.*). Download it again.")
        return state[key]

    conv = need("clip.visual.conv1.weight")  # [w, 3, p, p]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_tokens = int(need("clip.visual.positional_embedding").shape[0])
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise CheckpointError(f"clip.visual.positional_embedding has {n_tokens} rows; expected "
                              f"1 + a square number of patches.")
    layers = {int(k.split(".")[4]) for k in state
              if k.startswith("clip.visual.transformer.resblocks.")}
    experts = {int(k.split(".")[1]) for k in state if k.startswith("resample_layers.")}
    per_expert = {int(k.split(".")[2]) for k in state if k.startswith("resample_layers.0.")}
    if not layers or not experts or not per_expert:
        raise CheckpointError("The OneLLM checkpoint has no CLIP blocks or no resampler experts "
                              "(clip.visual.transformer.resblocks.*, resample_layers.*).")
    heads = clip_heads or max(1, width // 64)
    if width % heads or width % resampler_heads:
        raise ExpertOptionError(f"OneLLM width {width} is not divisible by clip_heads={heads} "
                                f"and resampler_heads={resampler_heads}; set them to divisors.")
    proj = state.get("clip.visual.proj")
    return {
        "width": width, "patch": patch, "n_tokens": n_tokens, "image_size": grid * patch,
        "clip_layers": len(layers), "clip_heads": heads,
        "clip_mlp": int(need("clip.visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
        "proj_dim": int(proj.shape[1]) if proj is not None else 0,
        "experts": len(experts), "resampler_layers": len(per_expert),
        "resampler_heads": resampler_heads,
        "ffn": int(need("resample_layers.0.0.feed_forward.w1.weight").shape[0]),
        "router_hidden": int(need("routers.image.fc1.weight").shape[0]),
        "n_query": int(need("resample_tokens.image").shape[1]),
        "dim": int(need("clip_proj2.image.0.weight").shape[0]), "eps": 1e-5,
    }


def load_checkpoint(path) -> dict[str, Any]:
    """The released state dict (memory-mapped, so the 7B LLM is not read into memory)."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"Could not read the OneLLM checkpoint {path} "
                              f"({type(exc).__name__}: {exc}); download it again.") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state dict.")
    return strip_prefix(state)


def build_encoder(state: dict[str, Any], clip_heads: int | None = None,
                  resampler_heads: int = 16):
    """OneLLM's universal encoder and projection module with ``state`` loaded (for the image
    and video modalities). Returns (module, sizes)."""
    sizes = infer_sizes(state, clip_heads, resampler_heads)
    model = _modules()(sizes, MODALS)
    own = model.state_dict()
    if sizes["proj_dim"] == 0:
        own.pop("clip.visual.proj", None)
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise CheckpointError(
            f"The OneLLM checkpoint lacks {len(missing)} tensors of the universal encoder / "
            f"projection module (e.g. {missing[:3]}); download csuhan/OneLLM-7B again.")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"OneLLM tensors with unexpected shapes: "
                              f"{[(k, tuple(state[k].shape)) for k in bad[:3]]}.")
    model.load_state_dict({k: state[k].float() for k in own}, strict=False)
    return model, sizes


class OneLLMExpert(ImageExpert):
    """OneLLM's universal encoder + projection, frozen; mean of the 30 LLM-space tokens."""

    name: ClassVar[str] = "onellm"
    family: ClassVar[str] = "general"
    kinds: ClassVar[tuple[str, ...]] = ("image", "volume")
    batch_size: ClassVar[int] = 8
    default_options: ClassVar[dict[str, Any]] = {
        **ImageExpert.default_options, "clip_heads": None, "resampler_heads": 16}
    # the release has no config file: the checkpoint itself is what must be there
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="onellm", repo_id="csuhan/OneLLM-7B", local_names=("onellm", "OneLLM-7B"),
        config_files=(CHECKPOINT,), weight_files=(CHECKPOINT,))

    def __init__(self, **options: Any) -> None:
        try:
            super().__init__(**options)
        except WeightsNotFoundError as exc:
            raise type(exc)(
                f"{exc}\nOneLLM needs one file from csuhan/OneLLM-7B: {CHECKPOINT} (universal "
                f"encoder, modality tokenizers, universal projection module and LLM in one "
                f"state dict); the GitHub repository's code is not needed.") from exc
        self._sizes: dict[str, Any] | None = None

    def _validate_options(self) -> None:
        super()._validate_options()
        for key in ("clip_heads", "resampler_heads"):
            v = self.opts[key]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ExpertOptionError(f"Option {key}={v!r} of 'onellm' must be a positive "
                                        f"integer.")

    def config(self) -> dict[str, Any]:  # no config.json: sizes from the tensors
        return self.sizes()

    def sizes(self) -> dict[str, Any]:
        if self._sizes is None:
            self._sizes = infer_sizes(load_checkpoint(self.weights.weight_file),
                                      self.opts["clip_heads"], self.opts["resampler_heads"])
        return self._sizes

    def dim(self, modality: ModalitySpec) -> int:
        return int(self.sizes()["dim"])

    def _load(self):
        model, self._sizes = build_encoder(load_checkpoint(self.weights.weight_file),
                                           self.opts["clip_heads"], self.opts["resampler_heads"])
        return model

    def preprocess(self) -> ImagePreprocess:
        s = int(self.sizes()["image_size"])  # CLIP's transform: resize, center crop, CLIP stats
        return ImagePreprocess(s, None, (s, s), BICUBIC, CLIP_MEAN, CLIP_STD)

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out["parts"] = "universal encoder + universal projection module (LLM not loaded)"
        return out

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed images (modality "image"; mean over views) or CT volumes (modality
        "video" over the sampled slices).

        Returns:
            ``[N, dim]`` float32 (dim = the LLM width, 4096 for OneLLM-7B).
        """
        import torch

        self._check_payloads(modality, payloads, {"image": ImageData, "volume": VolumeData})
        d = self.dim(modality)
        if not payloads:
            return np.zeros((0, d), dtype=np.float32)
        prep, model, dtype = self.preprocess(), self.model, self.torch_dtype()
        bs = int(self.opts["batch_size"])
        out = []
        for i, p in enumerate(payloads):
            if isinstance(p, ImageData):
                if not p.views or any(v is None for v in p.views):
                    raise DataError(f"onellm: modality {modality.name!r} payload {i} has no or "
                                    f"None views; a sample without images is a missing "
                                    f"modality (None).")
                pix = np.stack([prep(load_image(v, where=f"{modality.name}[{i}] view {j}"))
                                for j, v in enumerate(p.views)])  # [V, 3, H, W]
                parts = []
                with torch.no_grad():
                    for s in range(0, len(pix), bs):
                        x = torch.from_numpy(pix[s:s + bs]).to(self._device, dtype=dtype)
                        parts.append(model.encode_image(x).float().mean(dim=1))  # [v, dim]
                e = torch.cat(parts).mean(dim=0)  # [dim]
            else:
                n_slices, window = self._volume_settings(p)
                frames = np.stack([prep(s) for s in volume_slices(
                    p.volume, n_slices, window, where=f"{modality.name}[{i}]")])  # [T, 3, H, W]
                x = torch.from_numpy(frames[None]).to(self._device, dtype=dtype)
                with torch.no_grad():
                    e = model.encode_video(x).float().mean(dim=1)[0]  # [dim]
            out.append(e.cpu().numpy())
        return self._finite(np.stack(out), self.name)  # [N, dim]
