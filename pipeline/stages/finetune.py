"""The finetune stage: the pretrained encoder as a timm ViT classifier, trained end to end
(layer-wise lr decay, drop path, label smoothing, optional mixup/cutmix), the kept model
chosen on validation top-1. A child MLflow run of the pretrain run; resumable."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae import build_classifier
from mae.optim import FINETUNE_BETAS, build_adamw, finetune_param_groups
from pipeline.artifacts import classifier_config
from pipeline.data.loader import Augment
from pipeline.params import Params
from pipeline.stages.downstream import Downstream
from pipeline.train.eval import evaluate
from pipeline.train.runtime import Runtime, wrap
from pipeline.train.stage import run_stage


class Finetuner(Downstream):
    name = "finetune"
    hint = "Lower finetune.blr or set finetune.clip_grad."

    def __init__(self, p: Params, rt: Runtime) -> None:
        super().__init__(p, rt)
        fp, pre = self.section, self.pre
        self.model = build_classifier(
            pre.cfg, self.num_classes, pre.state, drop_path_rate=fp.drop_path
        ).to(rt.device)
        self.net, ddp = wrap(self.model, rt, p.runtime.compile)
        aug = Augment(scale_min=fp.scale_min, randaugment=fp.randaugment, reprob=fp.reprob)
        self.loader = self.loader_for(
            "train", "finetune", fp.batch_size, pre.cfg.image_hw[0], aug=aug
        )
        self.derive_lr()
        groups = finetune_param_groups(self.model, fp.weight_decay, fp.layer_decay)
        self.optimizer = build_adamw(groups, self.lr, FINETUNE_BETAS)
        self.mixup, self.criterion = self._criterion()
        self.loop = self.build_loop(len(self.loader), ddp)
        self.config = classifier_config(self.name, pre.cfg, self.manifest, self.digest, "avg")

    def _criterion(self) -> tuple[Mixup | None, torch.nn.Module]:
        fp = self.section
        if fp.mixup > 0 or fp.cutmix > 0:  # mixup/cutmix make soft targets, smoothing inside
            mixup = Mixup(
                mixup_alpha=fp.mixup,
                cutmix_alpha=fp.cutmix,
                label_smoothing=fp.smoothing,
                num_classes=self.num_classes,
            )
            return mixup, SoftTargetCrossEntropy()
        if fp.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(fp.smoothing)
        return None, torch.nn.CrossEntropyLoss()

    def derived_params(self) -> dict:
        return {"finetune.lr": self.lr, "finetune.effective_batch": self.effective_batch}

    def fit(self, epoch: int, run) -> dict:
        self.net.train()
        self.loader.set_epoch(epoch)
        return self.loop.run(epoch, self.loader, self._loss, run, self.history.steps)

    def _loss(self, batch: dict) -> torch.Tensor:
        d = self.rt.dist
        imgs = self.loader.images(batch, self.rt.device, self.generator, d.rank, d.world_size)
        labels = batch["label"].to(self.rt.device, non_blocking=True)
        if self.mixup is not None:
            imgs, labels = self.mixup(imgs, labels)
        with self.rt.autocast():
            return self.criterion(self.net(imgs), labels)

    def validate(self) -> float:
        rt = self.rt
        result = evaluate(
            self.model, self.val_loader, rt.device, self.num_classes, rt.autocast, rt.dist
        )
        return result["top1"]


def run_finetune(p: Params) -> str:
    return run_stage(Finetuner, p)
