"""The finetune stage: the pretrained encoder as a timm ViT classifier, trained end to end
(layer-wise lr decay, drop path, label smoothing, optional mixup/cutmix), the kept model
chosen on validation top-1. A child MLflow run of the pretrain run; resumable."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae import build_classifier, freeze_all_but_last_blocks
from mae.optim import FINETUNE_BETAS, build_adamw, finetune_param_groups
from pipeline.artifacts import classifier_config
from pipeline.data.loader import Augment, Loader
from pipeline.stages.downstream import Downstream
from pipeline.train.eval import evaluate


class Finetuner(Downstream):
    name = "finetune"
    hint = "Lower finetune.blr or set finetune.clip_grad."

    def build_model(self) -> torch.nn.Module:
        pre = self.pre
        return build_classifier(
            pre.cfg, self.num_classes, pre.state, drop_path_rate=self.section.drop_path
        )

    def freeze(self) -> None:
        """`finetune.trainable_blocks` k: all but the last k blocks, the final norm and the
        head frozen (no gradient, no optimizer state); null: every parameter trains."""
        k = self.section.trainable_blocks
        self.frozen = [] if k is None else freeze_all_but_last_blocks(self.model, k)

    def build_loader(self) -> Loader:
        s = self.section
        aug = Augment(scale_min=s.scale_min, randaugment=s.randaugment, reprob=s.reprob)
        return self.loader_for("train", "finetune", s.batch_size, self.pre.cfg.image_hw[0], aug=aug)

    def build_optimizer(self) -> torch.optim.Optimizer:
        s = self.section
        groups = finetune_param_groups(self.model, s.weight_decay, s.layer_decay)
        return build_adamw(groups, self.lr, FINETUNE_BETAS)

    def prepare(self) -> None:
        self.mixup, self.criterion = self._criterion()
        self.config = classifier_config(self.name, self.pre.cfg, self.manifest, self.digest, "avg")

    def _criterion(self) -> tuple[Mixup | None, torch.nn.Module]:
        s = self.section
        if s.mixup > 0 or s.cutmix > 0:  # mixup/cutmix make soft targets, smoothing inside
            mixup = Mixup(
                mixup_alpha=s.mixup,
                cutmix_alpha=s.cutmix,
                label_smoothing=s.smoothing,
                num_classes=self.num_classes,
            )
            return mixup, SoftTargetCrossEntropy()
        if s.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(s.smoothing)
        return None, torch.nn.CrossEntropyLoss()

    def derived_params(self) -> dict:
        trainable = sum(x.numel() for x in self.model.parameters() if x.requires_grad)
        return {
            f"{self.section_name}.lr": self.lr,
            f"{self.section_name}.effective_batch": self.effective_batch,
            f"{self.section_name}.trainable_parameters": trainable,
        }

    def fit(self, epoch: int, run) -> dict:
        self.net.train()
        for block in self.frozen:
            block.eval()
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
