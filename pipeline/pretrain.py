"""The pretrain stage: MAE pretraining on the train shards, tracked in MLflow, resumable.

Outputs (`paths.models`/pretrain): model.safetensors (encoder + decoder), config.json,
reconstruction.png, run_id; `paths.metrics`/pretrain.json; `paths.plots`/pretrain/.
"""

from __future__ import annotations

import json
import logging
import math
import time
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save_file

from mae import MaskedAutoencoderViT, keep_count, mae_config
from mae.knn import knn_predict, pooled_features
from mae.optim import absolute_lr, build_adamw, pretrain_param_groups
from mae.visualize import reconstruction_grid, to_png
from pipeline import reports, tracking
from pipeline.classify import encode_split
from pipeline.engine import (
    Checkpoints,
    EpochLoop,
    History,
    Runtime,
    params_key,
    resolve_runtime,
    rng_state,
    schedule,
    seed_everything,
    seed_rank,
    wrap,
)
from pipeline.errors import UserError
from pipeline.loader import build_loader, manifest_digest, read_manifest
from pipeline.params import Params, flatten

log = logging.getLogger(__name__)
STAGE = "pretrain"


def build_model(p: Params, manifest: dict) -> MaskedAutoencoderViT:
    cfg = mae_config(p.model.name, norm_pix_loss=p.pretrain.norm_pix_loss)
    if cfg.in_chans != manifest["channels"]:
        raise UserError(
            f"model.name {p.model.name} takes {cfg.in_chans}-channel images but "
            f"the shards have {manifest['channels']} channel(s)"
        )
    return MaskedAutoencoderViT(cfg)


def run_pretrain(p: Params) -> str:
    """Train, write the outputs, log everything; -> the MLflow run id."""
    shards = Path(p.data.shards)
    manifest = read_manifest(shards)
    digest = manifest_digest(shards)
    rt = resolve_runtime(p.runtime)
    main = rt.dist.main  # rank 0 alone logs and writes
    experiment_id = tracking.connect(p.tracking) if main else None  # fails now, not later
    trainer = Pretrainer(p, shards, manifest, rt)
    pp = p.pretrain
    key = params_key(flatten(p.model), flatten(pp), flatten(p.runtime), digest, rt.dist.world_size)
    checkpoints = Checkpoints(Path(p.paths.checkpoints) / f"{STAGE}-{key}")
    seed_rank(p.runtime.seed, rt.dist)  # a checkpoint's own streams replace these on resume
    meta = checkpoints.resume(rt.dist, trainer.model, trainer.optimizer, trainer.masking, pp.epochs)
    start_epoch, run_id = (meta["epoch"] + 1, meta["run_id"]) if meta else (0, None)
    if meta:
        trainer.history = History(**meta["history"])
    with tracking.start_run(
        experiment_id,
        stage=STAGE,
        digest=digest,
        run_name=f"{STAGE} mask={pp.mask_ratio}",
        run_id=run_id,
        enabled=main,
    ) as run:
        if not run.resumed:
            run.log_params(trainer.run_params())
            run.log_dataset(shards / "manifest.json", digest, f"{p.data.source}/train", "training")
        fixed = _fixed_val_images(shards, manifest, trainer.model, p.runtime.seed) if main else None
        for epoch in range(start_epoch, pp.epochs):
            trainer.train_epoch(epoch, run)
            rngs = rt.dist.gather(rng_state())  # every rank's, for rank 0's checkpoint
            if not main:
                continue
            if (epoch + 1) % pp.recon_every == 0 and epoch + 1 < pp.epochs:
                png = trainer.reconstructions(fixed)
                run.log_bytes(png, f"reconstructions/epoch_{epoch + 1:03d}.png")
            saved = checkpoints.save(
                epoch,
                trainer.model,
                trainer.optimizer,
                trainer.masking,
                {"run_id": run.id, "history": trainer.history.__dict__},
                rng_states=rngs,
            )
            log.info("checkpoint saved: %s", saved)
        if main:
            png = trainer.reconstructions(fixed)
            run.log_bytes(png, f"reconstructions/epoch_{pp.epochs:03d}.png")
            _write_outputs(p, trainer.model, png, run, trainer.history, digest)
            checkpoints.clear()  # done: a later run with these params starts afresh
    return run.id


class Pretrainer:
    """One pretraining run's state: model, data, optimiser, masking RNG and history."""

    def __init__(self, p: Params, shards: Path, manifest: dict, rt: Runtime) -> None:
        self.p, self.pp, self.manifest, self.rt = p, p.pretrain, manifest, rt
        seed_everything(p.runtime.seed)  # the same initial weights on every rank
        self.model = build_model(p, manifest).to(rt.device)
        self.net, ddp = wrap(self.model, rt, p.runtime.compile)
        self.loader = build_loader(
            shards,
            "train",
            "pretrain",
            batch_size=self.pp.batch_size,
            img_size=self.model.cfg.image_hw[0],
            num_workers=p.runtime.num_workers,
            seed=p.runtime.seed,
            pin_memory=self.rt.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader) // self.pp.accum_iter
        if self.steps_per_epoch < 1:
            raise UserError(
                f"pretrain.batch_size {self.pp.batch_size} x accum_iter {self.pp.accum_iter} "
                f"is larger than the train split ({manifest['splits']['train']['count']})"
            )
        self.effective_batch = self.pp.batch_size * self.pp.accum_iter * rt.dist.world_size
        self.lr = absolute_lr(self.pp.blr, self.effective_batch)
        groups = pretrain_param_groups(self.model, self.pp.weight_decay)
        self.optimizer = build_adamw(groups, self.lr)
        self.masking = torch.Generator().manual_seed(p.runtime.seed)  # masks and crops
        self.history = History()
        self.probe = KnnProbe(p, shards, manifest, self.model, rt) if self.pp.probe_every else None
        self.loop = EpochLoop(
            self.optimizer,
            schedule(self.pp, self.lr),
            self.steps_per_epoch,
            self.pp.accum_iter,
            self.pp.clip_grad,
            self.pp.log_every,
            hint="Lower pretrain.blr or set pretrain.clip_grad.",
            dist=rt.dist,
            ddp=ddp,
        )

    def run_params(self) -> dict:
        cfg = self.model.cfg
        return {
            **flatten(self.p),
            **{f"model.{k}": v for k, v in cfg.to_dict().items()},
            "model.parameters": sum(x.numel() for x in self.model.parameters()),
            "pretrain.lr": self.lr,
            "pretrain.effective_batch": self.effective_batch,
            "pretrain.patches_kept": keep_count(cfg.num_patches, self.pp.mask_ratio),
        }

    def train_epoch(self, epoch: int, run) -> None:
        self.net.train()
        self.loader.set_epoch(epoch)
        summary = self.loop.run(epoch, self.loader, self._loss, run, self.history.steps)
        last = epoch + 1 == self.pp.epochs
        if self.probe is not None and ((epoch + 1) % self.pp.probe_every == 0 or last):
            summary |= self.probe.run()
        self.history.epochs.append(summary)
        metrics = {
            "epoch/loss": summary["loss"],
            "epoch/img_per_s": summary["img_per_s"],
            "epoch/seconds": summary["seconds"],
        }
        if "knn_top1" in summary:
            metrics |= {f"{STAGE}/knn_top1": summary["knn_top1"], "knn/seconds": summary["knn_s"]}
        run.log_metrics(metrics, step=epoch + 1)
        knn = f", k-NN top-1 {summary['knn_top1']:.4f}" if "knn_top1" in summary else ""
        log.info(
            "epoch %d/%d: loss %.4f, %.0f img/s, %.1f s%s",
            epoch + 1,
            self.pp.epochs,
            summary["loss"],
            summary["img_per_s"],
            summary["seconds"],
            knn,
        )

    def _loss(self, batch: dict) -> torch.Tensor:
        imgs = batch["image"].to(self.rt.device, non_blocking=True)
        d, n = self.rt.dist, imgs.shape[0]
        if self.loader.device_augment is not None:  # crop + flip on the device, one call
            imgs = self.loader.device_augment(imgs, self.masking, d.rank, d.world_size)
        # drawn for the global batch, this rank's rows kept: ranks do not change the masks
        noise = torch.rand(n * d.world_size, self.model.cfg.num_patches, generator=self.masking)
        noise = noise[d.share(n)]
        with self.rt.autocast():
            loss, _, _ = self.net(imgs, self.pp.mask_ratio, noise.to(self.rt.device))
        return loss

    @torch.no_grad()
    def reconstructions(self, fixed: tuple[torch.Tensor, torch.Tensor]) -> bytes:
        imgs, noise = fixed
        model = self.model.eval()
        with self.rt.autocast():
            _, pred, mask = model(
                imgs.to(self.rt.device), self.pp.mask_ratio, noise.to(self.rt.device)
            )
        model.train()
        scale = max(1, 112 // imgs.shape[-1])  # small images: enlarge for the eye
        m, sd = self.manifest["mean"], self.manifest["std"]
        grid = reconstruction_grid(model, imgs, pred.float(), mask, m, sd, scale=scale)
        return to_png(grid)


class KnnProbe:
    """The online k-NN probe: the encoder's pooled features of the train split (the bank)
    and of the val split (the queries), cosine k-NN vote; -> val top-1. Every rank encodes
    its share of each split. With `pretrain.knn_bank` the bank is the first that many
    train samples in shard order (the shard stage's seeded shuffle: a fixed random subset,
    rounded up to whole batches), so a probe costs less than a pass over the split."""

    def __init__(self, p: Params, shards: Path, manifest: dict, model, rt: Runtime) -> None:
        if not manifest["splits"]["val"]["count"]:
            raise UserError(
                "the val split is empty: the k-NN probe queries it (set data.val_fraction "
                "above 0, or pretrain.probe_every to 0)"
            )
        self.model, self.rt, self.pp = model, rt, p.pretrain
        bank, world = p.pretrain.knn_bank, rt.dist.world_size
        batch = 1024 if bank is None else min(1024, math.ceil(bank / world))
        self.bank_batches = None if bank is None else math.ceil(bank / (batch * world))
        self.num_classes = len(manifest["classes"])
        self.loaders = [
            build_loader(
                shards,
                split,
                "eval",
                batch_size=batch,
                img_size=model.cfg.image_hw[0],
                num_workers=p.runtime.num_workers,
            )
            for split in ("train", "val")
        ]

    def _encode(self, imgs: torch.Tensor) -> torch.Tensor:
        with self.rt.autocast():
            return pooled_features(self.model, imgs)

    def run(self) -> dict:
        start = time.perf_counter()
        self.model.eval()
        rt = self.rt
        train, val = self.loaders
        bank_loader = islice(train, self.bank_batches)  # None: all of it
        bank, bank_labels = encode_split(bank_loader, self._encode, rt.device, rt.dist)
        queries, labels = encode_split(val, self._encode, rt.device, rt.dist)
        self.model.train()
        pred = knn_predict(
            bank, bank_labels, queries, self.num_classes, self.pp.knn_k, self.pp.knn_t
        )
        top1 = (pred == labels).float().mean().item()
        return {"knn_top1": top1, "knn_s": time.perf_counter() - start}


def _fixed_val_images(shards: Path, manifest: dict, model, masking_seed: int, n: int = 8):
    """The same validation images and masks at every epoch, for comparable grids."""
    split = "val" if manifest["splits"]["val"]["count"] else "train"
    loader = build_loader(shards, split, "eval", batch_size=n, img_size=model.cfg.image_hw[0])
    imgs = next(iter(loader))["image"]
    noise = torch.rand(
        imgs.shape[0], model.cfg.num_patches, generator=torch.Generator().manual_seed(masking_seed)
    )
    return imgs, noise


def _write_outputs(p: Params, model, png: bytes, run, history: History, digest: str) -> None:
    out = Path(p.paths.models) / STAGE
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"run_id": run.id})
    config = {
        "model": model.cfg.to_dict(),
        "preset": p.model.name,
        "mask_ratio": p.pretrain.mask_ratio,
        "manifest_digest": digest,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "reconstruction.png").write_bytes(png)
    plots = Path(p.paths.plots) / STAGE
    reports.write_curve(plots / "loss.csv", history.steps)
    reports.plot_curve(plots / "loss.png", history.steps, "step", ["loss", "lr"], run.id)
    final = history.epochs[-1]
    metrics = {
        "loss": final["loss"],
        "img_per_s": sum(e["img_per_s"] for e in history.epochs) / len(history.epochs),
        "minutes": sum(e["seconds"] for e in history.epochs) / 60,  # training alone
    }
    run.log_metrics({f"{STAGE}/{k}": v for k, v in metrics.items()})
    probes = [e for e in history.epochs if "knn_top1" in e]
    curve = [{"epoch": e["epoch"], "knn_top1": e["knn_top1"]} for e in probes]
    reports.write_curve(plots / "knn.csv", curve, fields=["epoch", "knn_top1"])
    if probes:  # pretrain/knn_top1 is logged already, as a curve over epochs
        knn_minutes = sum(e["knn_s"] for e in probes) / 60
        metrics |= {"knn_top1": probes[-1]["knn_top1"], "knn_minutes": knn_minutes}
    reports.write_metrics(Path(p.paths.metrics) / f"{STAGE}.json", metrics)
    for path in (out / "model.safetensors", out / "config.json"):
        run.log_file(path, "model")
    run.log_file(plots / "loss.png", "plots")
    run.log_bytes(json.dumps(flatten(p), indent=2).encode(), "params.json")
    (out / "run_id").write_text(run.id + "\n")  # last: its presence means "complete"
