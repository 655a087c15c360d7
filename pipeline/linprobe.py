"""The linprobe stage: the frozen encoder, BatchNorm1d(affine=False) + Linear on its cls
token (or patch average), LARS or SGD, as in the paper. Without augmentation the encoder's
features are computed once and cached, so an epoch costs only the head."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from mae import build_linear_probe
from mae.optim import absolute_lr, build_lars
from pipeline import tracking
from pipeline.classify import classifier_config, encode_split
from pipeline.downstream import Downstream, run_downstream
from pipeline.engine import EpochLoop, schedule, wrap
from pipeline.errors import UserError
from pipeline.loader import Augment, build_loader
from pipeline.params import Params

log = logging.getLogger(__name__)
STAGE = "linprobe"
POOL = {"cls": "token", "avg": "avg"}


class LinearProber(Downstream):
    stage = STAGE

    def __init__(self, p: Params) -> None:
        lp = self.lp = p.linprobe
        super().__init__(p)
        shards, pre = Path(p.data.shards), self.pre
        self.model = build_linear_probe(
            pre.cfg, self.num_classes, pre.state, global_pool=POOL[lp.pool]
        ).to(self.rt.device)
        img_size = pre.cfg.image_hw[0]
        # augment: the pretraining crops, on every epoch; else eval images, encoded once
        purpose, aug = ("pretrain", Augment()) if lp.augment else ("eval", Augment())
        self.loader = build_loader(
            shards,
            "train",
            purpose,
            batch_size=lp.batch_size,
            img_size=img_size,
            aug=aug,
            num_workers=p.runtime.num_workers,
            seed=p.runtime.seed,
        )
        self.model.eval()  # the encoder never trains; the head switches modes itself
        # each rank encodes its share of a split, and every rank gets all its features
        rt = self.rt
        train = None if lp.augment else encode_split(self.loader, self._encode, rt.device, rt.dist)
        self.train_cache = train
        self.val_cache = encode_split(self.val_loader, self._encode, rt.device, rt.dist)
        world = self.rt.dist.world_size
        self.global_batch = lp.batch_size * world
        steps = len(self.loader) if lp.augment else len(self.train_cache[1]) // self.global_batch
        if steps < 1:
            raise UserError(
                f"linprobe.batch_size {lp.batch_size} x {world} rank(s) is larger than the "
                "train split"
            )
        self.lr = absolute_lr(lp.blr, self.global_batch)
        # DDP over the head alone: the frozen encoder has no gradients to average
        self.head, ddp = wrap(self.model.head, self.rt, compile=False)
        if lp.optimizer == "lars":
            self.optimizer = build_lars(self.model, self.lr, lp.weight_decay)
        else:
            head = [x for x in self.model.parameters() if x.requires_grad]
            self.optimizer = torch.optim.SGD(
                head, lr=self.lr, momentum=0.9, weight_decay=lp.weight_decay
            )
        self.loop = EpochLoop(
            self.optimizer,
            schedule(self.lp, self.lr),
            steps,
            1,
            None,
            lp.log_every,
            hint="Lower linprobe.blr.",
            dist=self.rt.dist,
            ddp=ddp,
        )
        self.config = classifier_config(
            STAGE, pre.cfg, self.manifest, pre.manifest_digest, POOL[lp.pool]
        )

    def derived_params(self) -> dict:
        return {"linprobe.lr": self.lr, "linprobe.cached_features": self.train_cache is not None}

    @torch.no_grad()
    def _encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's feature, just before the BatchNorm + Linear head."""
        m = self.model
        with self.rt.autocast():
            return m.forward_head(m.forward_features(imgs), pre_logits=True).float()

    def _cached_batches(self, epoch: int):
        """Full global batches in an order drawn on every rank alike; this rank's rows."""
        feats, labels = self.train_cache
        order = torch.randperm(len(labels), generator=self.generator)
        g, rows = self.global_batch, self.rt.dist.share(self.lp.batch_size)
        for i in range(0, len(order) - g + 1, g):
            idx = order[i : i + g][rows]
            yield {"feature": feats[idx], "label": labels[idx]}

    def _augmented_batches(self, epoch: int):
        self.loader.set_epoch(epoch)
        d = self.rt.dist
        for batch in self.loader:
            imgs = batch["image"].to(self.rt.device, non_blocking=True)
            if self.loader.device_augment is not None:
                imgs = self.loader.device_augment(imgs, self.generator, d.rank, d.world_size)
            yield {"feature": self._encode(imgs), "label": batch["label"]}

    def train_epoch(self, epoch: int, run) -> dict:
        batches = (
            self._cached_batches if self.train_cache is not None else self._augmented_batches
        )(epoch)
        self.model.head.train()  # BatchNorm statistics of the head; the encoder stays eval
        return self.loop.run(epoch, batches, self._loss, run, self.history.steps)

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self.head(batch["feature"].to(self.rt.device))
        return torch.nn.functional.cross_entropy(logits, batch["label"].to(self.rt.device))

    def validate(self) -> float:
        feats, labels = self.val_cache
        self.model.head.eval()
        with torch.no_grad():
            logits = self.model.head(feats.to(self.rt.device)).cpu()
        top1 = (logits.argmax(1) == labels).float().mean().item()
        return top1 if math.isfinite(top1) else 0.0


def run_linprobe(p: Params) -> str:
    tracking.connect(p.tracking)  # fails now, not hours later
    return run_downstream(LinearProber(p))
