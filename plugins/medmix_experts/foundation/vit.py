"""BiomedCLIP's image tower in plain PyTorch, loading the released open_clip checkpoint.

BiomedCLIP (``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) ships
``open_clip_config.json`` and ``open_clip_pytorch_model.bin``. Its image tower is an
open_clip ``TimmModel``: a timm ``vit_base_patch16_224`` trunk (classifier removed, default
CLS-token pooling, ``timm_pool: ""``) followed by ``head.proj``, a bias-free linear map
768 -> 512 (``timm_proj: "linear"``). The modules below reproduce that tower with the same
attribute names, so after dropping the ``visual.`` prefix the checkpoint's keys load one to
one (``load_state_dict(strict=True)``); text-tower keys (``text.*``) and ``logit_scale``
are ignored.

Key mapping (checkpoint -> this module, ``i`` = block index)::

    visual.trunk.patch_embed.proj.{weight,bias}   -> trunk.patch_embed.proj  Conv2d(3, W, p, p)
    visual.trunk.cls_token        [1, 1, W]       -> trunk.cls_token
    visual.trunk.pos_embed        [1, 1+G*G, W]   -> trunk.pos_embed  (CLS position first)
    visual.trunk.blocks.i.norm1.{weight,bias}     -> trunk.blocks.i.norm1    LayerNorm(eps=1e-6)
    visual.trunk.blocks.i.attn.qkv.{weight,bias}  -> trunk.blocks.i.attn.qkv Linear(W, 3W)
    visual.trunk.blocks.i.attn.proj.{weight,bias} -> trunk.blocks.i.attn.proj Linear(W, W)
    visual.trunk.blocks.i.norm2.{weight,bias}     -> trunk.blocks.i.norm2
    visual.trunk.blocks.i.mlp.fc1.{weight,bias}   -> trunk.blocks.i.mlp.fc1  Linear(W, 4W), GELU
    visual.trunk.blocks.i.mlp.fc2.{weight,bias}   -> trunk.blocks.i.mlp.fc2  Linear(4W, W)
    visual.trunk.norm.{weight,bias}               -> trunk.norm (final LayerNorm)
    visual.head.proj.weight       [E, W]          -> head.proj (no bias unless the
                                                     checkpoint has visual.head.proj.bias)

Forward (timm ``VisionTransformer`` with ``global_pool="token"``, then open_clip's head)::

    x = patch_embed(img).flatten(2).transpose(1, 2)        # [B, G*G, W]
    x = cat([cls_token, x], 1) + pos_embed                 # [B, 1+G*G, W]
    x = blocks(x); x = norm(x)                             # pre-norm blocks
    out = head.proj(x[:, 0])                               # [B, E]

The architecture (width W, depth, patch p, grid G, MLP width, output E) is read from the
tensor shapes. The number of attention heads is not visible in the shapes: it is taken from
``vision_cfg.timm_model_kwargs.num_heads`` when the config gives it, else from the timm
model name (``vit_{tiny,small,base,large,huge}_patch*``), else ``W // 64`` (head width 64,
as in every standard ViT). The output is the projected embedding, not L2-normalised
(open_clip's ``encode_image(normalize=False)``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .weights import CheckpointError

_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16}


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise CheckpointError(
                f"ViT width {dim} is not divisible by num_heads={num_heads}; set "
                f"vision_cfg.timm_model_kwargs.num_heads in open_clip_config.json."
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, c/H]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, c/H]
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, G*G, W]


class TimmViTTrunk(nn.Module):
    """timm ``VisionTransformer`` (class token, learned absolute positions, pre-norm)."""

    def __init__(self, width: int, depth: int, num_heads: int, patch: int, grid: int,
                 mlp_hidden: int) -> None:
        super().__init__()
        self.patch_size, self.grid = patch, grid
        self.patch_embed = _PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self.blocks = nn.Sequential(*[_Block(width, num_heads, mlp_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    @property
    def image_size(self) -> int:
        return self.patch_size * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> CLS features [B, W]."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, 1+G*G, W]
        x = self.norm(self.blocks(x))
        return x[:, 0]  # [B, W]


class OpenClipTimmVisual(nn.Module):
    """open_clip's ``TimmModel`` image tower: trunk + ``head.proj``."""

    def __init__(self, trunk: TimmViTTrunk, embed_dim: int, proj_bias: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(OrderedDict(proj=nn.Linear(trunk.norm.normalized_shape[0],
                                                             embed_dim, bias=proj_bias)))

    @property
    def image_size(self) -> int:
        return self.trunk.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, E] image embeddings."""
        return self.head(self.trunk(x))


def _heads_from_config(vision_cfg: dict[str, Any], width: int) -> int:
    kwargs = vision_cfg.get("timm_model_kwargs") or {}
    if "num_heads" in kwargs:
        return int(kwargs["num_heads"])
    m = re.match(
        r"(?:vit|deit)_(tiny|small|base|large|huge|giant)_patch",
        str(vision_cfg.get("timm_model_name", "")),
    )
    if m:
        return _TIMM_HEADS[m.group(1)]
    return max(1, width // 64)


def visual_state_dict(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image-tower tensors of an open_clip checkpoint, with the ``visual.`` prefix dropped."""
    for wrapper in ("state_dict", "model"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
            checkpoint = checkpoint[wrapper]
    out = {}
    for k, v in checkpoint.items():
        k = k.removeprefix("module.")
        if k.startswith("visual."):
            out[k[len("visual."):]] = v
    return out


def build_from_open_clip(checkpoint: dict[str, torch.Tensor], model_cfg: dict[str, Any],
                         where: str = "checkpoint") -> OpenClipTimmVisual:
    """Build the tower from an open_clip checkpoint and its ``model_cfg``; load strictly.

    Args:
        checkpoint: the full open_clip state dict (text keys are ignored).
        model_cfg: ``open_clip_config.json``'s ``model_cfg``.
        where: file name used in error messages.
    Returns:
        The tower with the checkpoint's weights loaded.
    Raises:
        CheckpointError: when the checkpoint is not a timm-ViT open_clip image tower.
    """
    vision_cfg = model_cfg.get("vision_cfg", {})
    pool = vision_cfg.get("timm_pool", "")
    proj = vision_cfg.get("timm_proj", "linear")
    if pool not in ("", "token", None) or proj != "linear":
        raise CheckpointError(
            f"{where}: vision_cfg has timm_pool={pool!r}, timm_proj={proj!r}; the built-in "
            f"tower implements BiomedCLIP's (timm_pool='' -> CLS token, timm_proj='linear'). "
            f"For other open_clip towers install open_clip and pass backend='open_clip'."
        )
    sd = visual_state_dict(checkpoint)
    need = ["trunk.patch_embed.proj.weight", "trunk.pos_embed", "trunk.cls_token",
            "head.proj.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(
            f"{where} is not an open_clip checkpoint with a timm ViT image tower: keys "
            f"{['visual.' + k for k in absent]} are absent ({len(sd)} 'visual.*' keys found). "
            f"Expected BiomedCLIP's open_clip_pytorch_model.bin."
        )
    pw = sd["trunk.patch_embed.proj.weight"]  # [W, 3, p, p]
    width, patch = int(pw.shape[0]), int(pw.shape[-1])
    n_pos = int(sd["trunk.pos_embed"].shape[1]) - 1
    grid = round(n_pos ** 0.5)
    if grid * grid != n_pos:
        raise CheckpointError(f"{where}: pos_embed has {n_pos} patch positions, not a square grid.")
    depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
    mlp_hidden = int(sd["trunk.blocks.0.mlp.fc1.weight"].shape[0]) if depth else 4 * width
    embed_dim = int(sd["head.proj.weight"].shape[0])
    if "embed_dim" in model_cfg and int(model_cfg["embed_dim"]) != embed_dim:
        raise CheckpointError(
            f"{where}: head.proj maps to {embed_dim} dims but open_clip_config.json says "
            f"embed_dim={model_cfg['embed_dim']}; config and weights do not belong together."
        )
    trunk = TimmViTTrunk(
        width, depth, _heads_from_config(vision_cfg, width), patch, grid, mlp_hidden
    )
    model = OpenClipTimmVisual(trunk, embed_dim, proj_bias="head.proj.bias" in sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match BiomedCLIP's image tower layout: missing keys "
            f"{sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}. Expected the "
            f"timm ViT layout under visual.trunk.* and visual.head.proj.weight."
        )
    return model
