"""The pretrain stage: MAE pretraining on the train shards, tracked in MLflow, resumable.

Outputs (`paths.models`/pretrain): model.safetensors (encoder + decoder), config.json,
reconstruction.png, run_id; `paths.metrics`/pretrain.json; `paths.plots`/pretrain/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from mae import MaskedAutoencoderViT, keep_count, mae_config
from mae.optim import absolute_lr, build_adamw, lr_at, pretrain_param_groups, set_lr
from mae.visualize import reconstruction_grid, to_png
from pipeline import reports, tracking
from pipeline.engine import Checkpoints, Diverged, params_key, resolve_runtime, seed_everything
from pipeline.errors import UserError
from pipeline.loader import build_loader
from pipeline.params import Params, flatten

log = logging.getLogger(__name__)
STAGE = "pretrain"


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # step, epoch, loss, lr
    epochs: list[dict] = field(default_factory=list)  # epoch, loss, img_per_s, seconds


def manifest_digest(shards: Path) -> str:
    return hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()


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
    manifest = (
        json.loads((shards / "manifest.json").read_text())
        if (shards / "manifest.json").is_file()
        else None
    )
    if manifest is None:
        raise UserError(f"no shards at {shards} (run `mae-cli shard` or `dvc repro shard`)")
    digest = manifest_digest(shards)
    experiment_id = tracking.connect(p.tracking)  # fails now, not hours later
    rt = resolve_runtime(p.runtime)
    seed_everything(p.runtime.seed)
    model = build_model(p, manifest).to(rt.device)
    pp = p.pretrain
    loader = build_loader(
        shards,
        "train",
        "pretrain",
        batch_size=pp.batch_size,
        img_size=model.cfg.image_hw[0],
        num_workers=p.runtime.num_workers,
        seed=p.runtime.seed,
        pin_memory=rt.device.type == "cuda",
    )
    steps_per_epoch = len(loader) // pp.accum_iter
    if steps_per_epoch < 1:
        raise UserError(
            f"pretrain.batch_size {pp.batch_size} x accum_iter {pp.accum_iter} is "
            f"larger than the train split ({manifest['splits']['train']['count']})"
        )
    effective_batch = pp.batch_size * pp.accum_iter * loader.dataset.world_size
    lr = absolute_lr(pp.blr, effective_batch)
    optimizer = build_adamw(pretrain_param_groups(model, pp.weight_decay), lr)
    masking = torch.Generator().manual_seed(p.runtime.seed)
    key = params_key(flatten(p.model), flatten(pp), flatten(p.runtime), digest)
    checkpoints = Checkpoints(Path(p.paths.checkpoints) / f"{STAGE}-{key}")

    start_epoch, history, run_id = 0, History(), None
    if (latest := checkpoints.latest()) is not None:
        meta = checkpoints.load(latest, model, optimizer, masking)
        start_epoch, run_id = meta["epoch"] + 1, meta["run_id"]
        history = History(meta["history"]["steps"], meta["history"]["epochs"])
        if not tracking.run_exists(run_id):
            log.warning("run %s of the checkpoint is not in the store; starting a new run", run_id)
            run_id = None
        log.info("resuming from %s (epoch %d of %d)", latest, start_epoch + 1, pp.epochs)

    net = torch.compile(model) if p.runtime.compile else model
    tags = {
        "stage": STAGE,
        "git.commit": tracking.git_commit(tracking.project_root()),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "data.manifest_digest": digest,
    }
    name = f"{STAGE} mask={pp.mask_ratio}"
    with tracking.start_run(experiment_id, run_name=name, run_id=run_id, tags=tags) as run:
        if run_id is None:
            run.log_params(
                {
                    **flatten(p),
                    **{f"model.{k}": v for k, v in model.cfg.to_dict().items()},
                    "pretrain.lr": lr,
                    "pretrain.effective_batch": effective_batch,
                    "pretrain.patches_kept": keep_count(model.cfg.num_patches, pp.mask_ratio),
                    "model.parameters": sum(x.numel() for x in model.parameters()),
                }
            )
            run.log_dataset(shards / "manifest.json", digest, f"{p.data.source}/train", "training")
        fixed = _fixed_val_images(shards, manifest, model, p.runtime.seed)
        for epoch in range(start_epoch, pp.epochs):
            _train_epoch(
                net,
                model,
                loader,
                optimizer,
                masking,
                rt,
                p,
                epoch,
                lr,
                steps_per_epoch,
                history,
                run,
            )
            if (epoch + 1) % pp.recon_every == 0 and epoch + 1 < pp.epochs:
                png = _reconstructions(model, fixed, pp.mask_ratio, manifest, rt)
                run.log_bytes(png, f"reconstructions/epoch_{epoch + 1:03d}.png")
            saved = checkpoints.save(
                epoch, model, optimizer, masking, {"run_id": run.id, "history": history.__dict__}
            )
            log.info("checkpoint saved: %s", saved)
        png = _reconstructions(model, fixed, pp.mask_ratio, manifest, rt)
        run.log_bytes(png, f"reconstructions/epoch_{pp.epochs:03d}.png")
        _write_outputs(p, model, png, run, history, digest)
    checkpoints.clear()  # done: a later run with these params starts afresh
    return run.id


def _train_epoch(
    net,
    model,
    loader,
    optimizer,
    masking,
    rt,
    p: Params,
    epoch: int,
    lr: float,
    steps_per_epoch: int,
    history: History,
    run,
) -> None:
    pp = p.pretrain
    net.train()
    loader.set_epoch(epoch)
    optimizer.zero_grad(set_to_none=True)
    losses, images, start = [], 0, time.perf_counter()
    step = epoch * steps_per_epoch
    last_lr = lr_at(
        epoch, lr=lr, epochs=pp.epochs, warmup_epochs=pp.warmup_epochs, min_lr=pp.min_lr
    )
    for it, batch in enumerate(loader):
        if it >= steps_per_epoch * pp.accum_iter:
            break  # a partial accumulation at the end of an epoch is not applied
        if it % pp.accum_iter == 0:  # the lr follows the schedule every optimizer step
            last_lr = lr_at(
                epoch + it / (steps_per_epoch * pp.accum_iter),
                lr=lr,
                epochs=pp.epochs,
                warmup_epochs=pp.warmup_epochs,
                min_lr=pp.min_lr,
            )
            set_lr(optimizer, last_lr)
        imgs = batch["image"].to(rt.device, non_blocking=True)
        if loader.device_augment is not None:  # crop + flip on the device, one call a batch
            imgs = loader.device_augment(imgs, generator=masking)
        noise = torch.rand(imgs.shape[0], model.cfg.num_patches, generator=masking)
        with rt.autocast():
            loss, _, _ = net(imgs, pp.mask_ratio, noise.to(rt.device, non_blocking=True))
        value = loss.item()
        if not math.isfinite(value):
            raise Diverged(
                f"loss is {value} at step {step} (epoch {epoch + 1}, lr {last_lr:.3g});"
                " the last good checkpoint is kept. Lower pretrain.blr or set "
                "pretrain.clip_grad"
            )
        (loss / pp.accum_iter).backward()
        losses.append(value)
        images += imgs.shape[0]
        if (it + 1) % pp.accum_iter == 0:
            if pp.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), pp.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % pp.log_every == 0:
                point = {
                    "step": step,
                    "epoch": epoch + it / len(loader),
                    "loss": value,
                    "lr": last_lr,
                }
                history.steps.append(point)
                run.log_metrics({"train/loss": value, "train/lr": last_lr}, step=step)
    seconds = time.perf_counter() - start
    summary = {
        "epoch": epoch + 1,
        "loss": sum(losses) / len(losses),
        "img_per_s": images / seconds,
        "seconds": seconds,
    }
    history.epochs.append(summary)
    run.log_metrics(
        {
            "epoch/loss": summary["loss"],
            "epoch/img_per_s": summary["img_per_s"],
            "epoch/seconds": seconds,
        },
        step=epoch + 1,
    )
    log.info(
        "epoch %d/%d: loss %.4f, %.0f img/s, %.1f s",
        epoch + 1,
        pp.epochs,
        summary["loss"],
        summary["img_per_s"],
        seconds,
    )


def _fixed_val_images(shards: Path, manifest: dict, model, masking_seed: int, n: int = 8):
    """The same validation images and masks at every epoch, for comparable grids."""
    split = "val" if manifest["splits"]["val"]["count"] else "train"
    loader = build_loader(shards, split, "eval", batch_size=n, img_size=model.cfg.image_hw[0])
    imgs = next(iter(loader))["image"]
    noise = torch.rand(
        imgs.shape[0], model.cfg.num_patches, generator=torch.Generator().manual_seed(masking_seed)
    )
    return imgs, noise


@torch.no_grad()
def _reconstructions(model, fixed, mask_ratio: float, manifest: dict, rt) -> bytes:
    imgs, noise = fixed
    model.eval()
    with rt.autocast():
        _, pred, mask = model(imgs.to(rt.device), mask_ratio, noise.to(rt.device))
    model.train()
    grid = reconstruction_grid(model, imgs, pred.float(), mask, manifest["mean"], manifest["std"])
    return to_png(grid)


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
        "minutes": sum(e["seconds"] for e in history.epochs) / 60,
    }
    reports.write_metrics(Path(p.paths.metrics) / f"{STAGE}.json", metrics)
    run.log_metrics({f"{STAGE}/{k}": v for k, v in metrics.items()})
    for path in (out / "model.safetensors", out / "config.json"):
        run.log_file(path, "model")
    run.log_file(plots / "loss.png", "plots")
    run.log_bytes(json.dumps(flatten(p), indent=2).encode(), "params.json")
    (out / "run_id").write_text(run.id + "\n")  # last: its presence means "complete"
