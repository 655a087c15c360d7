"""The one skeleton every training stage runs in (`run_stage`): build the stage in one
fixed order, resume from the newest checkpoint, start or reopen the stage's MLflow run
(rank 0 alone talks to MLflow), log its params and dataset once, train epoch by epoch with
a checkpoint after each, keep the best epoch on validation where the stage validates,
write the outputs, clear the checkpoints.

A stage plugs in by subclassing `Stage` and writing only what differs: the build steps
(`build_model`, `build_loader`, `build_optimizer`; `freeze`, `wrap`, `batches_per_epoch`
and `prepare` where the default does not fit), the checkpoint key, the run's name and
params, one epoch's training (and validation), and its outputs. `pipeline.stages` lists
the stages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mae.optim import absolute_lr
from pipeline import kept, reports, tracking
from pipeline.artifacts import staged
from pipeline.data.loader import Loader, build_loader
from pipeline.data.store import shard_store
from pipeline.errors import UserError
from pipeline.params import Params, flatten
from pipeline.train.checkpoint import Checkpoints, params_key, rng_state
from pipeline.train.loop import EpochLoop, History, epoch_line, epoch_metrics, schedule
from pipeline.train.runtime import Runtime, graphs, resolve_runtime, seed_rank, wrap

log = logging.getLogger(__name__)
# Optimizer steps below which a stage warns before it starts: the defaults, sized for
# Fashion-MNIST's 54,000 images, fine-tuned a 1,300-image ImageFolder in 10 steps (chance).
FEW_STEPS = 200


class Stage:
    """A training stage's state and the hooks `run_stage` calls."""

    name = ""  # the stage: its MLflow tag, its folder under models/, metrics/ and plots/
    section_name = ""  # the params.yaml section it reads; default: `name`
    hint = ""  # what to change when the loss diverges
    curves: tuple[str, ...] = ()  # metrics logged as curves already: the file only
    p: Params
    rt: Runtime
    model: torch.nn.Module  # what checkpoints keep (not its DDP or compiled wrapper)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # crops, masks, shuffles: drawn for the global batch
    net: torch.nn.Module  # what the loss runs through: `model` wrapped (DDP, compiled)
    loader: Loader  # the train split's
    loop: EpochLoop
    digest: str  # the manifest's: names the data the run sees
    parent_id: str | None = None  # the MLflow parent run
    lr: float
    effective_batch: int

    def __init__(self, p: Params, rt: Runtime) -> None:
        self.p, self.rt = p, rt
        self.section_name = self.section_name or self.name
        self.section: Any = getattr(p, self.section_name)
        self.history = History()
        self.best: dict = {"top1": -1.0, "epoch": 0, "state": None}
        self.generator = torch.Generator().manual_seed(p.runtime.seed)

    @classmethod
    def create(cls, p: Params, rt: Runtime) -> Stage:
        """The stage, built: what `run_stage` trains."""
        stage = cls(p, rt)
        stage.build()
        return stage

    # ---------------------------------------------------------------- the build steps
    def build(self) -> None:
        """The build steps in the one order every stage needs: the model (seeded), any
        freezing, its DDP/compiled wrapper, the train loader, lr, optimizer, epoch loop,
        then whatever else the stage prepares."""
        self.given = self.section  # as params.yaml says: what the run logs and is named by
        self.section = self.schedule_for(self.section)
        self.model = self.build_model().to(self.rt.device)
        self.freeze()
        self.net, self.ddp = self.wrap()
        self.loader = self.build_loader()
        self.derive_lr()
        self.optimizer = self.build_optimizer()
        self.loop = self.build_loop(self.batches_per_epoch(), self.ddp)
        self.prepare()

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_count(self) -> int:
        """Images the stage trains on per epoch (a label subset's, where one is set)."""
        raise NotImplementedError

    def schedule_for(self, s: Any) -> Any:
        """The section the stage trains with, for a section with `min_steps`: the batch
        capped at the train images (even under mixup/cutmix; lr = blr x it / 256 follows),
        epochs raised to reach `min_steps` optimizer steps, warm-up scaled with them. Under
        few labels (10 per class: 100 images) 2 epochs at batch 256 are no step at all;
        this gives every point of a label sweep a schedule that can learn, with no edit."""
        if getattr(s, "min_steps", None) is None:
            return s
        count, world, accum = (
            self.train_count(),
            self.rt.dist.world_size,
            getattr(s, "accum_iter", 1),
        )
        batch = min(s.batch_size, count // (accum * world))
        batch -= batch % 2 if getattr(s, "mixup", 0) or getattr(s, "cutmix", 0) else 0
        if batch < 1:
            return s  # refused when the loop is built, naming the batch
        steps = count // (batch * accum * world)
        epochs = max(s.epochs, -(-s.min_steps // steps))
        if (batch, epochs) == (s.batch_size, s.epochs):
            return s
        if self.rt.dist.main:
            log.info(
                "%s: %d train images: batch %d -> %d, epochs %d -> %d (%s.min_steps %d)",
                self.name, count, s.batch_size, batch, s.epochs, epochs, self.section_name,
                s.min_steps,
            )  # fmt: skip
        warmup = s.warmup_epochs * epochs / s.epochs
        return s.model_copy(update={"batch_size": batch, "epochs": epochs, "warmup_epochs": warmup})

    def freeze(self) -> None:
        """Parameters that do not train get `requires_grad=False` here (none by default)."""

    def wrap(self) -> tuple[torch.nn.Module, Any]:
        """-> (the module the loss runs through, its DDP wrapper or None)."""
        return wrap(self.model, self.rt, self.p.runtime.compile)

    def build_loader(self) -> Loader:
        """The train split's loader (`loader_for`)."""
        raise NotImplementedError

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Over the trainable parameters, at `self.lr`."""
        raise NotImplementedError

    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def prepare(self) -> None:
        """After the loop is built: what else the stage needs (probes, caches, losses)."""

    # ---------------------------------------------------------------- helpers
    def derive_lr(self) -> None:
        """The effective batch (batch x accumulation x ranks) and lr = blr x it / 256."""
        s = self.section
        self.accum_iter = getattr(s, "accum_iter", 1)
        self.effective_batch = s.batch_size * self.accum_iter * self.rt.dist.world_size
        self.lr = absolute_lr(s.blr, self.effective_batch)

    def build_loop(self, batches_per_epoch: int, ddp=None) -> EpochLoop:
        """The epoch loop for `batches_per_epoch` micro-batches, as the section says."""
        s, world = self.section, self.rt.dist.world_size
        steps = batches_per_epoch // self.accum_iter
        if steps < 1:
            raise UserError(
                f"{self.section_name}.batch_size {s.batch_size} x accum_iter "
                f"{self.accum_iter} x {world} rank(s) is larger than the train split"
            )
        if steps * s.epochs < FEW_STEPS and self.rt.dist.main:
            log.warning(
                "%s: %d optimizer steps in all (%d epochs of %d at an effective batch of %d): "
                "too few to learn much; raise %s.epochs (or lower %s.batch_size)",
                self.name,
                steps * s.epochs,
                s.epochs,
                steps,
                self.effective_batch,
                self.section_name,
                self.section_name,
            )
        clip = getattr(s, "clip_grad", None)
        return EpochLoop(
            self.optimizer,
            schedule(s, self.lr),
            steps,
            self.accum_iter,
            clip,
            s.log_every,
            hint=self.hint,
            dist=self.rt.dist,
            ddp=ddp,
            system=tracking.SystemMetrics().sample
            if self.p.tracking.system_metrics and self.rt.dist.main
            else dict,
            graphs=graphs(self.p.runtime.compile),
        )

    def loader_for(
        self, split: str, augmentation: str, batch_size: int, img_size: int, **kw
    ) -> Loader:
        """`split` of the run's shards for `augmentation` ("pretrain", "finetune", "eval") as
        params.yaml says (workers, seed, `data.in_memory`), on this process's device;
        `kw`: more of `build_loader`'s options (`aug`)."""
        p = self.p
        return build_loader(
            shard_store(p.data),
            split,
            augmentation,
            batch_size=batch_size,
            img_size=img_size,
            num_workers=p.runtime.num_workers,
            seed=p.runtime.seed,
            in_memory=p.data.in_memory,
            device=self.rt.device,
            **kw,
        )

    # ---------------------------------------------------------------- the hooks
    def key(self) -> dict:
        """Everything that determines the result, by name: its digest names the checkpoint
        folder, and `key.json` in it holds the parts."""
        raise NotImplementedError

    def run_name(self) -> str:
        raise NotImplementedError

    def run_params(self) -> dict:
        raise NotImplementedError

    def train_epoch(self, epoch: int, run) -> dict:
        """One epoch -> its summary: epoch, loss, img_per_s, seconds, and `val_top1` where
        the stage validates (the best epoch is then kept), `knn_top1` where it probes."""
        raise NotImplementedError

    def begin(self) -> None:
        """Before the first epoch (of this process: after a resume too)."""

    def after_epoch(self, epoch: int, run) -> None:
        """Rank 0, after an epoch and before its checkpoint."""

    def write_outputs(self, run, out: Path, plots: Path) -> dict:
        """Rank 0, at the end: the model files into `out`, curves into `plots` (both empty
        staging folders); -> the metrics."""
        raise NotImplementedError

    def restore(self, meta: dict) -> None:
        """From a checkpoint's JSON part (and its extra tensors, `meta["tensors"]`)."""
        self.history = History(**meta["history"])
        if "best_top1" in meta:
            self.best = {
                "top1": meta["best_top1"],
                "epoch": meta["best_epoch"],
                "state": meta["tensors"],
            }


def run_stage(stage: type[Stage], p: Params) -> str:
    """Build a stage and train it, resumably, then write its outputs; -> the MLflow run id.
    Rank 0 connects to MLflow first, so an unreachable store fails before any work."""
    rt = resolve_runtime(p.runtime)
    experiment_id = tracking.connect(p.tracking) if rt.dist.main else None
    s, d = stage.create(p, rt), rt.dist
    parts = s.key()
    key = params_key(parts)
    checkpoints = Checkpoints(p.paths.checkpoints_dir() / f"{s.name}-{key}")
    with checkpoints.locked(d.main):  # one writer per key folder (two queue workers)
        if d.main:
            checkpoints.note_key(parts, s.name)
        return _train(s, d, p, key, checkpoints, experiment_id)


def _train(s: Stage, d, p: Params, key: str, checkpoints: Checkpoints, experiment_id) -> str:
    """`run_stage`'s training, resumably, with the key folder locked."""
    seed_rank(p.runtime.seed, d)  # a checkpoint's own streams replace these on resume
    meta = checkpoints.resume(d, s.model, s.optimizer, s.generator, s.section.epochs)
    start, run_id = (meta["epoch"] + 1, meta["run_id"]) if meta else (0, None)
    if meta:
        s.restore(meta)
    with tracking.start_run(
        experiment_id,
        stage=s.name,
        digest=s.digest,
        run_name=s.run_name() if d.main else "",
        run_id=run_id,
        parent_id=s.parent_id,
        enabled=d.main,
        key=key,
    ) as run:
        if d.main and not run.resumed:
            run.log_params(s.run_params())
            manifest = shard_store(p.data).manifest_file()
            run.log_dataset(manifest, s.digest, f"{p.data.source}/train", "training")
        s.begin()
        for epoch in range(start, s.section.epochs):
            summary = s.train_epoch(epoch, run)
            s.history.epochs.append(summary)
            run.log_metrics(epoch_metrics(s.name, summary), step=epoch + 1)
            log.info(epoch_line(s.name, s.section.epochs, summary))
            rngs = d.gather(rng_state())  # every rank's, for rank 0's checkpoint
            if d.main:
                _end_epoch(s, epoch, summary, run, checkpoints, rngs)
        if d.main:
            _finish(s, run)
            checkpoints.clear()  # done: a later run with these params starts afresh
    return run.id


def _end_epoch(s: Stage, epoch: int, summary: dict, run, checkpoints, rngs: list) -> None:
    """Rank 0, after an epoch: the best weights yet on validation, the stage's own step,
    then a checkpoint of it all (with every rank's random streams, `rngs`)."""
    if summary.get("val_top1", -1.0) > s.best["top1"]:  # on validation, never test
        state = {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()}
        s.best = {"top1": summary["val_top1"], "epoch": epoch + 1, "state": state}
    s.after_epoch(epoch, run)
    best = {"best_top1": s.best["top1"], "best_epoch": s.best["epoch"]}
    saved = checkpoints.save(
        epoch,
        s.model,
        s.optimizer,
        s.generator,
        {"run_id": run.id, "history": s.history.__dict__, **best},
        extra_tensors=s.best["state"],
        rng_states=rngs,
    )
    log.info("checkpoint saved: %s", saved)


def _finish(s: Stage, run) -> None:
    """The outputs every stage writes: plots, metrics, and its model folder with `run_id`
    (whose presence means "complete"), each put in place whole once all are written: a
    failure leaves the previous outputs as they were."""
    p = s.p
    models, plots = Path(p.paths.models) / s.name, Path(p.paths.plots) / s.name
    metrics_file = Path(p.paths.metrics) / f"{s.name}.json"
    with staged(plots, metrics_file, models) as (plots_tmp, metrics_tmp, out):
        metrics = s.write_outputs(run, out, plots_tmp)
        for path in sorted(out.iterdir()):
            if path.suffix in (".safetensors", ".json"):
                run.log_file(path, "model")
        logged = {k: v for k, v in metrics.items() if k not in s.curves}
        run.log_metrics({f"{s.name}/{k}": v for k, v in logged.items()})
        reports.write_metrics(metrics_tmp, metrics)
        run.log_bytes(json.dumps(flatten(p), indent=2).encode(), "params.json")
        (out / "run_id").write_text(run.id + "\n")
    kept.keep(plots, metrics_file, models)  # what a failure under dvc repro puts back
