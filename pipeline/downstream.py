"""The skeleton of the downstream stages (finetune, linprobe, scratch): an MLflow run (a
child of the pretrain run; scratch's is its own, shared by every pretrain run it controls),
epochs with validation top-1, the best model kept, resumable checkpoints, and the outputs
every stage writes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline import reports, tracking
from pipeline.classify import Pretrained, load_pretrained, save_classifier
from pipeline.engine import (
    Checkpoints,
    History,
    params_key,
    resolve_runtime,
    rng_state,
    seed_everything,
    seed_rank,
)
from pipeline.errors import UserError
from pipeline.loader import build_loader, read_manifest
from pipeline.params import Params, flatten

log = logging.getLogger(__name__)


class Downstream:
    """Subclasses set `model`, `optimizer`, `config` and implement `train_epoch`,
    `validate` and `derived_params`."""

    stage = ""
    section_name = ""  # the params.yaml section it reads; default: the stage's name
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    config: dict

    def __init__(self, p: Params) -> None:
        self.p = p
        self.pre = pre = self.encoder(p)
        self.section = getattr(p, self.section_name or self.stage)
        self.rt = resolve_runtime(p.runtime)
        seed_everything(p.runtime.seed)
        shards = Path(p.data.shards)
        self.manifest = read_manifest(shards)
        self.num_classes = len(self.manifest["classes"])
        if not self.manifest["splits"]["val"]["count"]:
            raise UserError(
                "the val split is empty: the kept model is chosen on it "
                "(set data.val_fraction above 0)"
            )
        self.val_loader = build_loader(
            shards,
            "val",
            "eval",
            batch_size=512,
            img_size=pre.cfg.image_hw[0],
            num_workers=p.runtime.num_workers,
        )
        self.generator = torch.Generator().manual_seed(p.runtime.seed)  # crops, shuffles
        self.history = History()

    def encoder(self, p: Params) -> Pretrained:
        """Where the encoder starts: the pretrain stage's output."""
        return load_pretrained(Path(p.paths.models) / "pretrain", Path(p.data.shards))

    def train_epoch(self, epoch: int, run) -> dict:
        raise NotImplementedError

    def validate(self) -> float:
        raise NotImplementedError

    def derived_params(self) -> dict:
        return {}


def run_downstream(t: Downstream) -> str:
    """Train `t` with validation, keep the best epoch, write outputs; -> the run id."""
    p, stage, d = t.p, t.stage, t.rt.dist
    experiment_id, inherited = None, {}
    if d.main:  # rank 0 alone talks to MLflow
        experiment_id = tracking.connect(p.tracking)
        inherited = _inherited_params(t)
    key = params_key(
        flatten(t.section),
        flatten(p.runtime),
        t.pre.cfg.to_dict(),
        t.pre.run_id,
        t.pre.manifest_digest,
        d.world_size,
    )
    checkpoints = Checkpoints(Path(p.paths.checkpoints) / f"{stage}-{key}")
    start, run_id, best = 0, None, {"top1": -1.0, "epoch": 0, "state": None}
    seed_rank(p.runtime.seed, d)  # a checkpoint's own streams replace these on resume
    meta = checkpoints.resume(d, t.model, t.optimizer, t.generator, t.section.epochs)
    if meta:
        t.history = History(**meta["history"])
        best = {"top1": meta["best_top1"], "epoch": meta["best_epoch"], "state": meta["tensors"]}
        start, run_id = meta["epoch"] + 1, meta["run_id"]
    with tracking.start_run(
        experiment_id,
        stage=stage,
        digest=t.pre.manifest_digest,
        run_name=_run_name(stage, inherited),
        run_id=run_id,
        parent_id=t.pre.run_id,
        enabled=d.main,
    ) as run:
        if not run.resumed:
            own = {f"{stage}.{k}": v for k, v in flatten(t.section).items()}
            runtime = {f"runtime.{k}": v for k, v in flatten(p.runtime).items()}
            run.log_params(
                {
                    **inherited,
                    **own,
                    **runtime,
                    **t.derived_params(),
                    "pretrain.run_id": t.pre.run_id or "none (random init)",
                }
            )
            shards = Path(p.data.shards)
            run.log_dataset(
                shards / "manifest.json",
                t.pre.manifest_digest,
                f"{p.data.source}/train",
                "training",
            )
        for epoch in range(start, t.section.epochs):
            summary = t.train_epoch(epoch, run)
            summary["val_top1"] = t.validate()
            t.history.epochs.append(summary)
            run.log_metrics(
                {
                    "epoch/loss": summary["loss"],
                    "val/top1": summary["val_top1"],
                    "epoch/img_per_s": summary["img_per_s"],
                    "epoch/seconds": summary["seconds"],
                },
                step=epoch + 1,
            )
            log.info(
                "%s epoch %d/%d: loss %.4f, val top-1 %.4f, %.0f img/s, %.1f s",
                stage,
                epoch + 1,
                t.section.epochs,
                summary["loss"],
                summary["val_top1"],
                summary["img_per_s"],
                summary["seconds"],
            )
            if summary["val_top1"] > best["top1"]:  # chosen on validation, never on test
                state = {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()}
                best = {"top1": summary["val_top1"], "epoch": epoch + 1, "state": state}
            rngs = d.gather(rng_state())  # every rank's, for rank 0's checkpoint
            if not d.main:
                continue
            checkpoints.save(
                epoch,
                t.model,
                t.optimizer,
                t.generator,
                {
                    "run_id": run.id,
                    "history": t.history.__dict__,
                    "best_top1": best["top1"],
                    "best_epoch": best["epoch"],
                },
                extra_tensors=best["state"],
                rng_states=rngs,
            )
        if d.main:
            _write_outputs(t, run, best)
            checkpoints.clear()
    return run.id


def _inherited_params(t: Downstream) -> dict:
    """The pretrain run's data, model and pretrain params, so either run compares mask
    ratios; from a random init, the model's config alone."""
    if t.pre.run_id is None:
        model = {f"model.{k}": v for k, v in t.pre.cfg.to_dict().items()}
        return {"model.name": t.p.model.name, **model}
    parent = tracking.get_run(t.pre.run_id)
    prefixes = ("pretrain.", "model.", "data.")
    return {k: v for k, v in parent.data.params.items() if k.startswith(prefixes)}


def _run_name(stage: str, inherited: dict) -> str:
    ratio = inherited.get("pretrain.mask_ratio")
    return f"{stage} mask={ratio}" if ratio is not None else f"{stage} (random init)"


def _write_outputs(t: Downstream, run, best: dict) -> None:
    p, stage = t.p, t.stage
    out = Path(p.paths.models) / stage
    for path in save_classifier(out, t.model, t.config, best["state"]):
        run.log_file(path, "model")
    plots = Path(p.paths.plots) / stage
    curve = [
        {"epoch": e["epoch"], "loss": e["loss"], "val_top1": e["val_top1"]}
        for e in t.history.epochs
    ]
    reports.write_curve(plots / "curve.csv", curve)
    reports.plot_curve(plots / "curve.png", curve, "epoch", ["loss", "val_top1"], run.id)
    run.log_file(plots / "curve.png", "plots")
    metrics = {
        "val_top1": best["top1"],
        "best_epoch": best["epoch"],
        "train_loss": t.history.epochs[-1]["loss"],
        "minutes": sum(e["seconds"] for e in t.history.epochs) / 60,
    }
    reports.write_metrics(Path(p.paths.metrics) / f"{stage}.json", metrics)
    run.log_metrics({f"{stage}/{k}": v for k, v in metrics.items()})
    run.log_bytes(json.dumps(flatten(p), indent=2).encode(), "params.json")
    (out / "run_id").write_text(run.id + "\n")  # last: its presence means "complete"
