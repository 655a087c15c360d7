"""Masked Autoencoders (He et al., 2021): model, downstream heads and training helpers.

A library: depends on torch, torchvision, timm, numpy and Pillow only, and reads no files,
environment variables or argv.
"""

from importlib import import_module

# Names are imported on first use (PEP 562): `mae.config` alone (what params.yaml's checks
# need) stays free of torch and timm, ~5 s and ~600 MB per process that never trains.
_HOME = {
    "build_classifier": "mae.classifier",
    "build_linear_probe": "mae.classifier",
    "build_pixel_probe": "mae.classifier",
    "classifier_from_config": "mae.classifier",
    "eval_transform": "mae.augment",
    "freeze_all_but_last_blocks": "mae.classifier",
    "load_encoder": "mae.classifier",
    "PRESETS": "mae.config",
    "MAEConfig": "mae.config",
    "mae_config": "mae.config",
    "MaskedAutoencoderViT": "mae.model",
    "count_parameters": "mae.model",
    "encoder_state_dict": "mae.model",
    "len_keep": "mae.config",
    "mask_noise": "mae.masking",
    "to_mode": "mae.images",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'mae' has no attribute {name!r}")
    value = globals()[name] = getattr(import_module(_HOME[name]), name)
    return value


def create_mae(name: str, **overrides):
    """A fresh MAE from a named preset, e.g. `create_mae("mae_vit_base_patch16")`."""
    from mae.config import mae_config
    from mae.model import MaskedAutoencoderViT

    return MaskedAutoencoderViT(mae_config(name, **overrides))


__all__ = [
    "PRESETS",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "build_classifier",
    "build_linear_probe",
    "build_pixel_probe",
    "classifier_from_config",
    "count_parameters",
    "create_mae",
    "encoder_state_dict",
    "eval_transform",
    "freeze_all_but_last_blocks",
    "len_keep",
    "load_encoder",
    "mae_config",
    "mask_noise",
    "to_mode",
]
