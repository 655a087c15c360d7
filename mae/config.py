"""Model configurations: one frozen dataclass and the named presets.

`mae_config("mae_vit_base_patch16", img_size=112)` returns a preset with overrides; an
unknown name or key raises `ValueError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class MAEConfig:
    img_size: int | tuple[int, int] = 224  # (H, W) or one side of a square image
    patch_size: int = 16  # square patches; must divide both image sides
    in_chans: int = 3  # 1 for Fashion-MNIST
    embed_dim: int = 1024  # encoder width
    depth: int = 24  # encoder blocks
    num_heads: int = 16  # encoder attention heads
    decoder_embed_dim: int = 512  # decoder width (the paper's "lightweight" decoder)
    decoder_depth: int = 8  # decoder blocks
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False  # regress per-patch normalised pixels (paper Table 1c)

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):  # JSON round trip turns tuples into lists
            object.__setattr__(self, "img_size", tuple(self.img_size))
        for name in (
            "patch_size",
            "in_chans",
            "embed_dim",
            "depth",
            "num_heads",
            "decoder_embed_dim",
            "decoder_depth",
            "decoder_num_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        h, w = _pair(self.img_size)
        if h < 1 or w < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size!r}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} does not divide img_size {self.img_size!r}"
            )
        for dim, heads, prefix in (
            (self.embed_dim, self.num_heads, ""),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_"),
        ):
            if dim % heads:
                raise ValueError(
                    f"{prefix}embed_dim {dim} is not divisible by {prefix}num_heads {heads}"
                )
            if dim % 4:  # 2-D sin-cos needs four equal quarters
                raise ValueError(f"{prefix}embed_dim must be divisible by 4, got {dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


_OFFICIAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRESETS: dict[str, MAEConfig] = {
    # The official ImageNet models (facebookresearch/mae models_mae.py).
    "mae_vit_base_patch16": MAEConfig(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, **_OFFICIAL_DECODER
    ),
    "mae_vit_large_patch16": MAEConfig(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_OFFICIAL_DECODER
    ),
    "mae_vit_huge_patch14": MAEConfig(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_OFFICIAL_DECODER
    ),
    # Fashion-MNIST on a GPU (recipes/fashion-mnist-gpu.yaml): ViT-S widths, 49 tokens.
    "mae_vit_s_patch4_28": MAEConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    ),
    # Fashion-MNIST on a CPU: 28x28x1 images, 4x4 patches -> 7x7 = 49 tokens; half a
    # ViT-Ti (192 wide, 6 deep). Named mae_vit_small_patch4_28 until 2026-11-27.
    "mae_vit_mini_patch4_28": MAEConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_tiny_patch4_28": MAEConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # The CPU default: 7x7 patches -> 4x4 = 16 tokens; about 3x faster than patch 4.
    "mae_vit_tiny_patch7_28": MAEConfig(
        img_size=28,
        patch_size=7,
        in_chans=1,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # Tests: runs a step in milliseconds.
    "mae_vit_test": MAEConfig(
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
}


# old name -> new name: a params file with an old name fails, saying the new one
RENAMED = {"mae_vit_small_patch4_28": "mae_vit_mini_patch4_28"}


def mae_config(name: str, **overrides: Any) -> MAEConfig:
    """The preset `name` with `overrides` applied (validated like any config)."""
    if name in RENAMED:
        raise ValueError(f"model {name!r} is now called {RENAMED[name]!r}")
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[name].to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
    return MAEConfig(**{**base, **overrides})


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample, int(L * (1 - mask_ratio)) as the official code."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return len_keep


MASK_TYPES = ("random", "block", "grid")  # mae.masking: how the masked patches are chosen


def grid_cell(grid: tuple[int, int], mask_ratio: float) -> int:
    """The side k of the cells grid masking keeps one patch of: 1 - 1/k^2 == mask_ratio
    and k divides both sides of the patch `grid`; ValueError naming why otherwise."""
    k = round(1 / math.sqrt(1 - mask_ratio)) if mask_ratio < 1 else 0
    if k < 2 or abs((1 - 1 / k**2) - mask_ratio) > 1e-6:
        raise ValueError(
            f"grid masking keeps one patch of every k x k cell: mask_ratio must be "
            f"1 - 1/k^2 (0.75, 0.8889, 0.9375, ...), got {mask_ratio}"
        )
    if grid[0] % k or grid[1] % k:
        raise ValueError(
            f"grid masking at mask_ratio {mask_ratio} keeps one patch of every {k}x{k} "
            f"cell, which do not tile the {grid[0]}x{grid[1]} patch grid"
        )
    return k
