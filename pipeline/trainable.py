"""Combinations of params.yaml values that pass each key's own checks but cannot train:
found when params.yaml is read, before any work or MLflow run, each named by the key to
change and why (`ParamsError`). What needs the data (a batch larger than the train split)
is checked by the stages, still before their MLflow run."""

from __future__ import annotations

from pipeline.errors import ParamsError
from pipeline.sections import Params


def check_trainable(p: Params) -> None:
    """Raise ParamsError for the first combination of `p` that cannot train."""
    for check in (
        _mask_ratio,
        _mask_type,
        _decoder,
        _trainable_blocks,
        _mixup_batch,
        _probe_batch,
        _knn_k,
    ):
        problem = check(p)
        if problem is not None:
            raise ParamsError(*problem)


def _mask_ratio(p: Params) -> tuple[str, str] | None:
    """The loss is the error on masked patches only: none masked is 0 / 0 (the paper's
    Sec. 3, "we compute the loss only on masked patches"), none visible leaves the
    encoder nothing to see."""
    from mae.config import len_keep, mae_config

    patches, ratio = mae_config(p.model.name).num_patches, p.pretrain.mask_ratio
    try:
        kept = len_keep(patches, ratio)
    except ValueError as err:
        return "pretrain.mask_ratio", f"{err} of model {p.model.name}"
    if kept == patches:
        return (
            "pretrain.mask_ratio",
            f"{ratio} masks none of the {patches} patches of model {p.model.name}: the loss "
            "is computed on masked patches only",
        )
    return None


def _mask_type(p: Params) -> tuple[str, str] | None:
    """Grid masking keeps one patch per k x k cell: the ratio and the grid must fit."""
    from mae.config import grid_cell, mae_config

    if p.pretrain.mask_type != "grid":
        return None
    grid = mae_config(p.model.name).grid_size
    try:
        grid_cell(grid, p.pretrain.mask_ratio)
    except ValueError as err:
        return "pretrain.mask_type", f"grid with pretrain.mask_ratio: {err} (model {p.model.name})"
    return None


def _decoder(p: Params) -> tuple[str, str] | None:
    """The preset with `model.decoder_*` must be a model `MAEConfig` accepts (the width
    splits over the preset's decoder heads and into the sin-cos embedding's quarters)."""
    from mae.config import mae_config

    try:
        mae_config(p.model.name, **p.model.overrides())
    except ValueError as err:  # decoder_depth is a positive count already: the width
        return "model.decoder_embed_dim", f"{err} (model {p.model.name})"
    return None


def _trainable_blocks(p: Params) -> tuple[str, str] | None:
    from mae.config import mae_config

    depth, k = mae_config(p.model.name).depth, p.finetune.trainable_blocks
    if k is not None and k > depth:
        return (
            "finetune.trainable_blocks",
            f"{k}, but model {p.model.name} has {depth} blocks: use 0 to {depth}, or null (all)",
        )
    return None


def _mixup_batch(p: Params) -> tuple[str, str] | None:
    """timm's Mixup pairs each image with another of its batch (the batch flipped)."""
    f = p.finetune
    if (f.mixup > 0 or f.cutmix > 0) and f.batch_size % 2:
        return (
            "finetune.batch_size",
            f"{f.batch_size} is odd, but mixup/cutmix (finetune.mixup, finetune.cutmix) pair "
            "each image with another of its batch: use an even batch size",
        )
    return None


def _probe_batch(p: Params) -> tuple[str, str] | None:
    """The linear probe's BatchNorm normalises each feature over the batch."""
    if p.linprobe.batch_size < 2:
        return (
            "linprobe.batch_size",
            f"{p.linprobe.batch_size}: the probe's BatchNorm needs at least 2 samples a batch",
        )
    return None


def _knn_k(p: Params) -> tuple[str, str] | None:
    pretrain = p.pretrain
    if (
        pretrain.probe_every
        and pretrain.knn_bank is not None
        and pretrain.knn_k > pretrain.knn_bank
    ):
        return (
            "pretrain.knn_k",
            f"{pretrain.knn_k} neighbours, but the k-NN bank holds {pretrain.knn_bank} images "
            "(pretrain.knn_bank)",
        )
    return None
