"""The pretrain stage: MAE pretraining on the train shards, tracked in MLflow, resumable.

Outputs (`paths.models`/pretrain): model.safetensors (encoder + decoder), config.json,
reconstruction.png, run_id; `paths.metrics`/pretrain.json; `paths.plots`/pretrain/.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from mae import MaskedAutoencoderViT, len_keep, mae_config
from mae.knn import knn_predict, pooled_features
from mae.masking import mask_noise
from mae.optim import build_adamw, pretrain_param_groups
from mae.visualize import reconstruction_grid, to_png
from pipeline import reports, settings
from pipeline.artifacts import save_pretrained
from pipeline.data.memory import to_device
from pipeline.data.store import shard_store
from pipeline.errors import UserError
from pipeline.params import Params, flatten
from pipeline.train.eval import encode_split
from pipeline.train.loop import speed
from pipeline.train.runtime import Runtime, runtime_key, seed_everything
from pipeline.train.stage import Stage

log = logging.getLogger(__name__)
STAGE = "pretrain"


def build_model(p: Params, manifest: dict, decoder: bool = True) -> MaskedAutoencoderViT:
    """The MAE of `model.name`, its decoder as `model.decoder_*` set it (`decoder=False`:
    the preset's, for the scratch control, which reads the encoder alone)."""
    overrides = p.model.overrides() if decoder else {}
    cfg = mae_config(p.model.name, norm_pix_loss=p.pretrain.norm_pix_loss, **overrides)
    if cfg.in_chans != manifest["channels"]:
        raise UserError(
            f"model.name {p.model.name} takes {cfg.in_chans}-channel images but "
            f"the shards have {manifest['channels']} channel(s)"
        )
    return MaskedAutoencoderViT(cfg)


class Pretrainer(Stage):
    """One pretraining run: model, data, optimiser, the masking RNG, the k-NN probe."""

    name = STAGE
    hint = "Lower pretrain.blr or set pretrain.clip_grad."
    curves = ("knn_top1", "knn_minutes")  # pretrain/knn_top1 is logged per probe already

    def __init__(self, p: Params, rt: Runtime) -> None:
        super().__init__(p, rt)
        shards = shard_store(p.data)
        self.manifest, self.digest = shards.manifest(), shards.digest()

    def build_model(self) -> MaskedAutoencoderViT:
        seed_everything(self.p.runtime.seed)  # the same initial weights on every rank
        return build_model(self.p, self.manifest)  # the mask ratio fits: checked in params

    def build_loader(self):
        batch_size, img_size = self.section.batch_size, self.model.cfg.image_hw[0]
        return self.loader_for("train", "pretrain", batch_size, img_size)

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = pretrain_param_groups(self.model, self.section.weight_decay)
        return build_adamw(groups, self.lr)

    def prepare(self) -> None:
        self.probe = KnnProbe(self) if self.section.probe_every else None

    def key(self) -> dict:
        p = self.p
        return {
            "model": flatten(p.model),
            "pretrain": flatten(self.section),
            "runtime": runtime_key(p.runtime, self.rt),
            "data.manifest_digest": self.digest,
            "world_size": self.rt.dist.world_size,
        }

    def run_name(self) -> str:
        """`pretrain mask=<ratio>` and what else differs from the committed params.yaml."""
        p = self.p
        now = _without_labels(flatten(p.data, "data.")) | flatten(p.model, "model.")
        now |= flatten(self.section, "pretrain.")
        return settings.run_name(f"{STAGE} mask={self.section.mask_ratio}", now, STAGE)

    def run_params(self) -> dict:
        cfg = self.model.cfg
        return {
            **_without_labels(flatten(self.p)),
            **{f"model.{k}": v for k, v in cfg.to_dict().items()},
            "model.parameters": sum(x.numel() for x in self.model.parameters()),
            "pretrain.lr": self.lr,
            "pretrain.effective_batch": self.effective_batch,
            "pretrain.patches_kept": len_keep(cfg.num_patches, self.section.mask_ratio),
            "data.train_in_memory": self.loader.in_memory,  # what data.in_memory resolved to
        }

    def begin(self) -> None:
        if self.rt.dist.main:  # the same images and masks in every grid
            self.fixed = self._fixed_val_images()

    def _fixed_val_images(self, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The same validation images and masks at every epoch, for comparable grids."""
        split = "val" if self.manifest["splits"]["val"]["count"] else "train"
        loader = self.loader_for(split, "eval", n, self.model.cfg.image_hw[0])
        imgs = loader.images(next(iter(loader)), self.rt.device)
        masking = torch.Generator().manual_seed(self.p.runtime.seed)
        return imgs, self._noise(imgs.shape[0], masking).to(self.rt.device)

    def _noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, L) masking noise of `pretrain.mask_type` (`mae.masking`)."""
        s, cfg = self.section, self.model.cfg
        return mask_noise(s.mask_type, n, cfg.grid_size, s.mask_ratio, generator)

    def train_epoch(self, epoch: int, run) -> dict:
        self.net.train()
        self.loader.set_epoch(epoch)
        summary = self.loop.run(epoch, self.loader, self._loss, run, self.history.steps)
        last = epoch + 1 == self.section.epochs
        if self.probe is not None and ((epoch + 1) % self.section.probe_every == 0 or last):
            summary |= self.probe.run()
        return summary

    def after_epoch(self, epoch: int, run) -> None:
        if (epoch + 1) % self.section.recon_every == 0 and epoch + 1 < self.section.epochs:
            run.log_bytes(self.reconstructions(), f"reconstructions/epoch_{epoch + 1:03d}.png")

    def _loss(self, batch: dict) -> torch.Tensor:
        d = self.rt.dist
        imgs = self.loader.images(batch, self.rt.device, self.generator, d.rank, d.world_size)
        # drawn for the global batch, this rank's rows kept: ranks do not change the masks
        n = imgs.shape[0]
        noise = self._noise(n * d.world_size, self.generator)
        noise = to_device(noise[d.share(n)], self.rt.device)
        with self.rt.autocast():
            loss, _, _ = self.net(imgs, self.section.mask_ratio, noise)
        return loss

    @torch.no_grad()
    def reconstructions(self) -> bytes:
        imgs, noise = self.fixed
        model = self.model.eval()
        with self.rt.autocast():
            _, pred, mask = model(imgs, self.section.mask_ratio, noise)
        model.train()
        scale = max(1, 112 // imgs.shape[-1])  # small images: enlarge for the eye
        m, sd = self.manifest["mean"], self.manifest["std"]
        grid = reconstruction_grid(model, imgs, pred.float(), mask, m, sd, scale=scale)
        return to_png(grid)

    def write_outputs(self, run, out: Path, plots: Path) -> dict:
        png = self.reconstructions()
        run.log_bytes(png, f"reconstructions/epoch_{self.section.epochs:03d}.png")
        save_pretrained(
            out, self.model, self.p.model.name, self.section.mask_ratio, self.digest, run.id
        )
        (out / "reconstruction.png").write_bytes(png)
        steps = self.history.steps
        reports.write_curve(plots / "loss.csv", steps)
        reports.plot_curve(plots / "loss.png", steps, "step", ["loss", "lr"], run.id)
        run.log_file(plots / "loss.png", "plots")
        epochs = self.history.epochs
        metrics = {"loss": epochs[-1]["loss"], **speed(epochs)}
        probes = [e for e in epochs if "knn_top1" in e]
        curve = [{"epoch": e["epoch"], "knn_top1": e["knn_top1"]} for e in probes]
        reports.write_curve(plots / "knn.csv", curve, fields=["epoch", "knn_top1"])
        if probes:
            knn_minutes = sum(e["knn_s"] for e in probes) / 60
            metrics |= {"knn_top1": probes[-1]["knn_top1"], "knn_minutes": knn_minutes}
        return metrics


class KnnProbe:
    """The online k-NN probe: the encoder's pooled features of the train split (the bank)
    and of the val split (the queries), cosine k-NN vote; -> val top-1. Every rank encodes
    its share of each split. With `pretrain.knn_bank` the bank is the first that many
    train samples in shard order (the shard stage's seeded shuffle: a fixed random subset,
    rounded up to whole batches), so a probe costs less than a pass over the split. A
    split held in memory for training is read from there."""

    def __init__(self, stage: Pretrainer) -> None:
        if not stage.manifest["splits"]["val"]["count"]:
            raise UserError(
                "the val split is empty: the k-NN probe queries it (set data.val_fraction "
                "above 0, or pretrain.probe_every to 0)"
            )
        self.model, self.rt, self.section = stage.model, stage.rt, stage.section
        img_size = self.model.cfg.image_hw[0]
        bank, world = self.section.knn_bank, self.rt.dist.world_size
        count = stage.manifest["splits"]["train"]["count"]
        if self.section.knn_k > min(count, bank or count):
            raise UserError(
                f"pretrain.knn_k: {self.section.knn_k} neighbours, but the k-NN bank holds "
                f"{min(count, bank or count)} images (the train split's)"
            )
        batch = 1024 if bank is None else min(1024, math.ceil(bank / world))
        self.bank_batches = None if bank is None else math.ceil(bank / (batch * world))
        self.num_classes = len(stage.manifest["classes"])
        self.loaders = [
            stage.loader_for(split, "eval", batch, img_size) for split in ("train", "val")
        ]

    def _encode(self, imgs: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            return pooled_features(self.model, imgs)

    def run(self) -> dict:
        start = time.perf_counter()
        self.model.eval()
        rt = self.rt
        train, val = self.loaders
        bank, bank_labels = encode_split(
            train, self._encode, rt.device, rt.dist, max_batches=self.bank_batches
        )
        queries, labels = encode_split(val, self._encode, rt.device, rt.dist)
        self.model.train()
        pred = knn_predict(
            bank, bank_labels, queries, self.num_classes, self.section.knn_k, self.section.knn_t
        )
        top1 = (pred == labels).float().mean().item()
        return {"knn_top1": top1, "knn_s": time.perf_counter() - start}


def _without_labels(params: dict) -> dict:
    """Pretraining sees every train image and no label: the label keys are the children's
    to log (each its own), never the pretrain run's."""
    return {k: v for k, v in params.items() if k not in ("data.labels", "data.labels_seed")}
