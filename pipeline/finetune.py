"""The finetune stage: the pretrained encoder as a timm ViT classifier, trained end to end
(layer-wise lr decay, drop path, label smoothing, optional mixup/cutmix), the kept model
chosen on validation top-1. A child MLflow run of the pretrain run; resumable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae import build_classifier
from mae.optim import FINETUNE_BETAS, absolute_lr, build_adamw, finetune_param_groups
from pipeline import tracking
from pipeline.classify import classifier_config, evaluate
from pipeline.downstream import Downstream, run_downstream
from pipeline.engine import EpochLoop, schedule, wrap
from pipeline.errors import UserError
from pipeline.loader import Augment, build_loader
from pipeline.params import Params

log = logging.getLogger(__name__)
STAGE = "finetune"


class Finetuner(Downstream):
    stage = STAGE
    hint = "Lower finetune.blr or set finetune.clip_grad."

    def __init__(self, p: Params) -> None:
        fp = self.fp = p.finetune
        super().__init__(p)
        shards, pre = Path(p.data.shards), self.pre
        self.model = build_classifier(
            pre.cfg, self.num_classes, pre.state, drop_path_rate=fp.drop_path
        ).to(self.rt.device)
        self.net, ddp = wrap(self.model, self.rt, p.runtime.compile)
        aug = Augment(scale_min=fp.scale_min, randaugment=fp.randaugment, reprob=fp.reprob)
        self.loader = build_loader(
            shards,
            "train",
            "finetune",
            batch_size=fp.batch_size,
            img_size=pre.cfg.image_hw[0],
            aug=aug,
            num_workers=p.runtime.num_workers,
            seed=p.runtime.seed,
            pin_memory=self.rt.device.type == "cuda",
        )
        steps = len(self.loader) // fp.accum_iter
        if steps < 1:
            raise UserError(
                f"finetune.batch_size {fp.batch_size} x accum_iter "
                f"{fp.accum_iter} is larger than the train split"
            )
        self.effective_batch = fp.batch_size * fp.accum_iter * self.rt.dist.world_size
        self.lr = absolute_lr(fp.blr, self.effective_batch)
        groups = finetune_param_groups(self.model, fp.weight_decay, fp.layer_decay)
        self.optimizer = build_adamw(groups, self.lr, FINETUNE_BETAS)
        self.mixup = None
        if fp.mixup > 0 or fp.cutmix > 0:  # mixup/cutmix make soft targets, smoothing inside
            self.mixup = Mixup(
                mixup_alpha=fp.mixup,
                cutmix_alpha=fp.cutmix,
                label_smoothing=fp.smoothing,
                num_classes=self.num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif fp.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(fp.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.loop = EpochLoop(
            self.optimizer,
            schedule(self.fp, self.lr),
            steps,
            fp.accum_iter,
            fp.clip_grad,
            fp.log_every,
            hint=self.hint,
            dist=self.rt.dist,
            ddp=ddp,
        )
        self.config = classifier_config(
            self.stage, pre.cfg, self.manifest, pre.manifest_digest, "avg"
        )

    def derived_params(self) -> dict:
        return {"finetune.lr": self.lr, "finetune.effective_batch": self.effective_batch}

    def train_epoch(self, epoch: int, run) -> dict:
        self.net.train()
        self.loader.set_epoch(epoch)
        return self.loop.run(epoch, self.loader, self._loss, run, self.history.steps)

    def _loss(self, batch: dict) -> torch.Tensor:
        imgs = batch["image"].to(self.rt.device, non_blocking=True)
        labels = batch["label"].to(self.rt.device, non_blocking=True)
        if self.loader.device_augment is not None:
            d = self.rt.dist
            imgs = self.loader.device_augment(imgs, self.generator, d.rank, d.world_size)
        if self.mixup is not None:
            imgs, labels = self.mixup(imgs, labels)
        with self.rt.autocast():
            return self.criterion(self.net(imgs), labels)

    def validate(self) -> float:
        return evaluate(
            self.model,
            self.val_loader,
            self.rt.device,
            self.num_classes,
            self.rt.autocast,
            self.rt.dist,
        )["top1"]


def run_finetune(p: Params) -> str:
    tracking.connect(p.tracking)  # fails now, not hours later
    return run_downstream(Finetuner(p))
