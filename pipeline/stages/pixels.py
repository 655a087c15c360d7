"""The pixels stage, the linear probe's control: the probe's head (BatchNorm1d(affine=False)
+ Linear) and recipe (`linprobe.*`) on the raw pixels, flattened and normalised as the
encoder sees them (the same resize, the shards' mean/std), on the same labels. evaluate's
`probe_gain` is linprobe's test top-1 minus this stage's: whether the learned
representation beats the pixels it started from.

It reads neither the pretrained model nor `linprobe.pool` and `linprobe.augment` (the
pixels are the feature, computed once): a mask-ratio sweep takes it from DVC's cache, as
it does scratch. `model.name` gives the image size alone."""

from __future__ import annotations

import torch

from mae.classifier import build_pixel_probe
from pipeline.artifacts import Pretrained, classifier_config
from pipeline.data.loader import Augment, Loader
from pipeline.data.store import shard_store
from pipeline.params import Params, flatten
from pipeline.stages.linprobe import LinearProber
from pipeline.stages.pretrain import build_model


class PixelProber(LinearProber):
    name = "pixels"
    section_name = "linprobe"
    hint = "Lower linprobe.blr."
    unpaired = "(raw pixels)"

    def __init__(self, p: Params, rt) -> None:
        super().__init__(p, rt)
        self.section = p.linprobe.model_copy(update={"augment": False})  # pixels: cached

    def encoder(self, p: Params) -> Pretrained:
        """No encoder: the model's config (image size, channels) and the shards' digest."""
        shards = shard_store(p.data)
        cfg = build_model(p, shards.manifest(), decoder=False).cfg
        return Pretrained(cfg, {}, None, shards.digest())

    def build_model(self) -> torch.nn.Module:
        cfg = self.pre.cfg
        return build_pixel_probe(cfg.in_chans, cfg.image_hw, self.num_classes)

    def build_loader(self) -> Loader:
        s = self.section
        return self.loader_for(
            "train", "eval", s.batch_size, self.pre.cfg.image_hw[0], aug=Augment()
        )

    def prepare(self) -> None:
        super().prepare()
        pre = self.pre
        self.config = classifier_config("pixels", pre.cfg, self.manifest, self.digest, "pixels")

    def own_params(self) -> dict:
        """`linprobe.*` as this stage reads it: without `pool` and `augment`."""
        return {k: v for k, v in flatten(self.given).items() if k not in ("pool", "augment")}

    def derived_params(self) -> dict:
        return super().derived_params() | {"pixels.features": self.model.head[1].in_features}
