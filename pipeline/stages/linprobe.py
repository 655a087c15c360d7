"""The linprobe stage: the frozen encoder, BatchNorm1d(affine=False) + Linear on its cls
token (or patch average), LARS or SGD, as in the paper. Without augmentation the encoder's
features are computed once and cached, so an epoch costs only the head."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from mae import build_linear_probe
from mae.optim import build_lars
from pipeline.artifacts import classifier_config
from pipeline.data.loader import Augment, Loader
from pipeline.data.memory import free_bytes, to_device
from pipeline.stages.downstream import Downstream
from pipeline.tracking import NullRun
from pipeline.train.eval import encode_split
from pipeline.train.runtime import wrap

log = logging.getLogger(__name__)

POOL = {"cls": "token", "avg": "avg"}


class LinearProber(Downstream):
    name = "linprobe"
    hint = "Lower linprobe.blr."

    @property
    def pool(self) -> str:
        """What the head reads: timm's `global_pool`, "token" (cls) or "avg" (patches)."""
        return POOL[self.section.pool]

    def build_model(self) -> torch.nn.Module:
        """The encoder, frozen, under BatchNorm1d + Linear (`mae.build_linear_probe`)."""
        pre = self.pre
        return build_linear_probe(pre.cfg, self.num_classes, pre.state, global_pool=self.pool)

    def wrap(self) -> tuple[torch.nn.Module, Any]:
        # DDP over the head alone: the frozen encoder has no gradients to average
        return wrap(self.model.head, self.rt, compile=False)

    def build_loader(self) -> Loader:
        # augment: the pretraining crops, on every epoch; else eval images, encoded once
        s = self.section
        augmentation = "pretrain" if s.augment else "eval"
        return self.loader_for(
            "train", augmentation, s.batch_size, self.pre.cfg.image_hw[0], aug=Augment()
        )

    def build_optimizer(self) -> torch.optim.Optimizer:
        s = self.section
        if s.optimizer == "lars":
            return build_lars(self.model, self.lr, s.weight_decay)
        head = [x for x in self.model.parameters() if x.requires_grad]
        return torch.optim.SGD(head, lr=self.lr, momentum=0.9, weight_decay=s.weight_decay)

    def batches_per_epoch(self) -> int:
        # cached features: each once an epoch, in full global batches
        count = self.train_count()
        return len(self.loader) if self.section.augment else count // self.effective_batch

    def prepare(self) -> None:
        """The features of the val split and, without augmentation, of the train split."""
        rt = self.rt
        self.model.eval()  # the encoder never trains; the head switches modes itself
        # each rank encodes its share of a split, and every rank gets all its features
        augment = self.section.augment
        train = None if augment else encode_split(self.loader, self._encode, rt.device, rt.dist)
        if train is not None and train[0].nbytes <= free_bytes(rt.device) // 2:
            train = tuple(t.to(rt.device) for t in train)  # no copy per step to a GPU
        self.train_cache = train
        self.val_cache = encode_split(self.val_loader, self._encode, rt.device, rt.dist)
        # kind "linprobe" whatever the stage's name: what rebuilds it (classifier_from_config)
        pre, kind = self.pre, "linprobe"
        self.config = classifier_config(kind, pre.cfg, self.manifest, self.digest, self.pool)
        self.grid = self.search()

    def search(self) -> list[dict]:
        """The blr and weight decay of the run, chosen on val from `linprobe.grid_blr` x
        `grid_weight_decay`: each pair trains the head from its initial weights for the
        section's epochs (no logging, no checkpoint), and the best val top-1 of any epoch
        wins (the first pair on a tie). The probe and the pixels control search the same
        grid, so neither is weak by construction. -> the grid with each pair's val top-1
        (empty without a grid, or when the features are not cached: too costly)."""
        s = self.section
        if (s.grid_blr is None and s.grid_weight_decay is None) or self.train_cache is None:
            return []
        head = {k: v.clone() for k, v in self.model.head.state_dict().items()}
        streams = (self.generator.get_state(), torch.get_rng_state())
        grid = []
        for blr, decay in itertools.product(
            s.grid_blr or [s.blr], s.grid_weight_decay or [s.weight_decay]
        ):
            self._use(blr, decay, head)
            tops = []
            for epoch in range(self.section.epochs):
                self.loop.run(epoch, self._cached_batches(epoch), self._loss, NullRun(), [])
                tops.append(self.validate())
            grid.append({"blr": blr, "weight_decay": decay, "val_top1": max(tops)})
            self.generator.set_state(streams[0])
            torch.set_rng_state(streams[1])
        best = max(grid, key=lambda g: g["val_top1"])  # max keeps the first of equals
        self._use(best["blr"], best["weight_decay"], head)
        if self.rt.dist.main:
            chosen = (best["blr"], best["weight_decay"], best["val_top1"], len(grid))
            log.info(
                "%s: blr %g, weight decay %g chosen on val (top-1 %.4f) of %d", self.name, *chosen
            )
        return grid

    def _use(self, blr: float, decay: float, head: dict) -> None:
        """Train from here with `blr` and `decay`: the head at its initial weights, a new
        optimizer and loop (lr = blr x batch / 256)."""
        self.section = self.section.model_copy(update={"blr": blr, "weight_decay": decay})
        self.model.head.load_state_dict(head)
        self.derive_lr()
        self.optimizer = self.build_optimizer()
        self.loop = self.build_loop(self.batches_per_epoch(), self.ddp)

    def write_outputs(self, run, out: Path, plots: Path) -> dict:
        metrics = super().write_outputs(run, out, plots)
        if self.grid:  # the grid beside the model (and in MLflow), the pair chosen
            (out / "grid.json").write_text(json.dumps(self.grid, indent=1) + "\n")
            metrics |= {"blr": self.section.blr, "weight_decay": self.section.weight_decay}
        return metrics

    def derived_params(self) -> dict:
        return {
            f"{self.name}.lr": self.lr,
            f"{self.name}.cached_features": self.train_cache is not None,
            f"{self.name}.chosen_blr": self.section.blr,
            f"{self.name}.chosen_weight_decay": self.section.weight_decay,
        }

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
        g, rows = self.effective_batch, self.rt.dist.share(self.section.batch_size)
        for i in range(0, len(order) - g + 1, g):
            idx = to_device(order[i : i + g][rows], feats.device)
            yield {"feature": feats[idx], "label": labels[idx]}

    def _augmented_batches(self, epoch: int):
        self.loader.set_epoch(epoch)
        d = self.rt.dist
        for batch in self.loader:
            imgs = self.loader.images(batch, self.rt.device, self.generator, d.rank, d.world_size)
            yield {"feature": self._encode(imgs), "label": batch["label"]}

    def fit(self, epoch: int, run) -> dict:
        batches = (
            self._cached_batches if self.train_cache is not None else self._augmented_batches
        )(epoch)
        self.model.head.train()  # BatchNorm statistics of the head; the encoder stays eval
        return self.loop.run(epoch, batches, self._loss, run, self.history.steps)

    def _loss(self, batch: dict) -> torch.Tensor:
        device = self.rt.device
        logits = self.net(batch["feature"].to(device, non_blocking=True))
        labels = batch["label"].to(device, non_blocking=True)
        return torch.nn.functional.cross_entropy(logits, labels)

    def validate(self) -> float:
        feats, labels = self.val_cache
        self.model.head.eval()
        with torch.no_grad():
            logits = self.model.head(feats.to(self.rt.device)).cpu()
        top1 = (logits.argmax(1) == labels).float().mean().item()
        return top1 if math.isfinite(top1) else 0.0
