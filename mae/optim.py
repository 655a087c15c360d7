"""Learning-rate rule and schedule, parameter groups and optimisers of the MAE recipe.

The schedule is a pure function of the (fractional) epoch; `set_lr` applies it every
iteration, honouring each group's `lr_scale` (layer-wise decay).
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def absolute_lr(blr: float, effective_batch: int) -> float:
    """The paper's linear scaling rule: lr = blr * effective batch / 256."""
    return blr * effective_batch / 256


def lr_at(
    epoch: float, *, lr: float, epochs: float, warmup_epochs: float, min_lr: float = 0.0
) -> float:
    """Linear warm-up from 0 to `lr`, then half-cycle cosine down to `min_lr` at `epochs`.

    `epoch` is fractional (epoch + iteration / iterations per epoch).
    """
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    progress = min(progress, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def pretrain_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-d parameters), as the official recipe."""
    return param_groups_weight_decay(model, weight_decay)


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay (BEiT/MAE): block i gets `layer_decay ** (depth + 1 - (i + 1))`.

    The stem (patch embed, cls token, pos embed) gets the smallest scale, the head 1.0.
    No weight decay on 1-d parameters and on the model's `no_weight_decay()` set.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(
        model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
    )


def lars_param_groups(model: nn.Module, weight_decay: float):
    """LARS as in MAE's linear probe: trainable weights get decay and trust-ratio
    adaptation, biases and other 1-d parameters get neither."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "params": [p for p in params if p.ndim > 1],
            "weight_decay": weight_decay,
            "always_adapt": True,
        },
        {
            "params": [p for p in params if p.ndim <= 1],
            "weight_decay": 0.0,
            "always_adapt": False,
        },
    ]


def build_lars(
    model: nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> Lars:
    """timm's LARS (trust coefficient 0.001) over the trainable parameters of `model`."""
    groups = [g for g in lars_param_groups(model, weight_decay) if g["params"]]
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=0.001)


PRETRAIN_BETAS = (0.9, 0.95)  # the paper's pretraining table (Table 8)
FINETUNE_BETAS = (0.9, 0.999)  # the paper's fine-tuning table (Table 9), official main_finetune


def build_adamw(
    param_groups: list[dict],
    lr: float,
    betas: tuple[float, float] = PRETRAIN_BETAS,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; pretraining uses betas (0.9, 0.95), fine-tuning (0.9, 0.999). On CUDA the fused
    kernel by default (`fused=None`): one launch updates every parameter, where the official
    code's default (foreach) launches several per group."""
    if fused is None:
        fused = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)
