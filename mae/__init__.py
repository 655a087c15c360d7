"""Masked Autoencoders (He et al., 2021): model, downstream heads and training helpers.

A library: depends on torch, torchvision, timm, numpy and Pillow only, and reads no files,
environment variables or argv.
"""

from mae.classifier import build_classifier, build_linear_probe, load_encoder
from mae.config import PRESETS, MAEConfig, mae_config
from mae.model import MaskedAutoencoderViT, count_parameters, encoder_state_dict, keep_count


def create_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """A fresh MAE from a named preset, e.g. `create_mae("mae_vit_base_patch16")`."""
    return MaskedAutoencoderViT(mae_config(name, **overrides))


__all__ = [
    "PRESETS",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "build_classifier",
    "build_linear_probe",
    "count_parameters",
    "create_mae",
    "encoder_state_dict",
    "keep_count",
    "load_encoder",
    "mae_config",
]
