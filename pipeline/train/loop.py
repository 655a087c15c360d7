"""The optimisation loop every training stage runs an epoch with, its lr schedule and the
history it keeps."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mae.optim import lr_at, set_lr
from pipeline.errors import UserError
from pipeline.progress import progress
from pipeline.train.distributed import Dist


class Diverged(UserError):
    """The loss became NaN or infinite."""


def schedule(section: Any, lr: float):
    """A stage section's warm-up + cosine schedule: fractional epoch -> lr."""
    return functools.partial(
        lr_at,
        lr=lr,
        epochs=section.epochs,
        warmup_epochs=section.warmup_epochs,
        min_lr=section.min_lr,
    )


@contextlib.contextmanager
def log_point():
    """Where the loop waits for the device on purpose (a logged loss, the epoch's end).
    Anywhere else, a host sync on the training path is a bug: under
    `torch.cuda.set_sync_debug_mode("error")` (the GPU test) it raises, here it does not."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class Waited:
    """An iterator's items, and the seconds the host spent waiting for them (`seconds`): a
    loader that keeps up costs next to nothing here."""

    def __init__(self, items) -> None:
        self.items, self.seconds = iter(items), 0.0

    def __iter__(self) -> Waited:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class History:
    """What a stage plots and resumes: per logged step and per epoch."""

    steps: list[dict] = field(default_factory=list)  # step, epoch, loss, lr
    epochs: list[dict] = field(default_factory=list)  # epoch, loss, img_per_s, seconds, ...


@dataclass
class EpochLoop:
    """One optimisation loop shared by the training stages.

    `forward(batch) -> loss` computes a micro-batch's loss; the loop sets the lr every
    optimizer step from `lr_fn(fractional epoch)`, accumulates `accum_iter` micro-batches
    (without a DDP gradient sync but on the last), clips, steps, and logs `train/loss` (the
    mean over ranks) and `train/lr` every `log_every` steps. Losses stay on the device
    between log points, so a GPU never waits for the host; a non-finite loss stops the run
    at the next log point or the end of the epoch, before any checkpoint of it is written.
    """

    optimizer: torch.optim.Optimizer
    lr_fn: Any  # fractional epoch -> lr
    steps_per_epoch: int  # optimizer steps
    accum_iter: int = 1
    clip_grad: float | None = None
    log_every: int = 10
    hint: str = ""  # appended to the divergence message: what to change
    dist: Dist = field(default_factory=Dist)
    ddp: Any = None  # the DistributedDataParallel module, for `no_sync` while accumulating
    system: Any = dict  # () -> system metrics logged with each train/loss point ({}: none)
    graphs: bool = False  # the step replays CUDA graphs (runtime.compile: reduce-overhead)

    def run(self, epoch: int, batches, forward, run, history: list[dict]) -> dict:
        """One epoch over `batches` -> its summary: epoch, loss (the mean), img_per_s,
        seconds, data_s (of them, waiting for batches)."""
        micro_steps = self.steps_per_epoch * self.accum_iter
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        losses, images, start = [], 0, time.perf_counter()  # losses stay on the device
        step, lr = epoch * self.steps_per_epoch, self.lr_fn(epoch)
        bar = progress(total=micro_steps, desc=f"epoch {epoch + 1}", enabled=self.dist.main)
        batches = Waited(batches)
        for it, batch in enumerate(batches):
            if it >= micro_steps:
                break  # a partial accumulation at the end of an epoch is not applied
            if it % self.accum_iter == 0:
                lr = self.lr_fn(epoch + it / micro_steps)
                set_lr(optimizer, lr)
            last = (it + 1) % self.accum_iter == 0
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with self._sync(last):
                loss = forward(batch)
                (loss / self.accum_iter).backward()
            # a copy: a CUDA graph's next replay overwrites its outputs
            losses.append(loss.detach().float().clone() if self.graphs else loss.detach().float())
            images += len(batch["label"])
            bar.update()
            if last:
                self._step()
                step += 1
                if step % self.log_every == 0:
                    point = {"step": step, "epoch": epoch + it / micro_steps, "lr": lr}
                    value = self._log_point(point, losses, history, run)
                    rate = images * self.dist.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:,.0f}")
        bar.close()
        with log_point():
            mean = self._mean(torch.stack(losses).mean()) if losses else 0.0
            self._check(mean, epoch, losses)
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "loss": mean,
            "img_per_s": images * self.dist.world_size / seconds,
            "seconds": seconds,
            "data_s": batches.seconds,
        }

    def _step(self) -> None:
        """The optimizer step of an accumulated batch: clip, step, clear the gradients."""
        optimizer = self.optimizer
        if self.clip_grad is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _log_point(self, point: dict, losses: list, history: list[dict], run) -> float:
        """The one place a step waits for the device: the last loss, checked, into the
        history and MLflow with the lr and the machine's load; -> the loss."""
        with log_point():
            value = self._mean(losses[-1])
            self._check(value, int(point["epoch"]), losses)
            history.append({"step": point["step"], "epoch": point["epoch"], "loss": value,
                            "lr": point["lr"]})  # fmt: skip
            logged = {"train/loss": value, "train/lr": point["lr"], **self.system()}
            run.log_metrics(logged, step=point["step"])
        return value

    def _sync(self, last: bool):
        if last or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _mean(self, loss: torch.Tensor) -> float:
        """The mean over ranks (every rank calls this at the same step)."""
        return self.dist.sum(loss.clone()).item() / self.dist.world_size

    def _check(self, value: float, epoch: int, losses: list[torch.Tensor]) -> None:
        """Stop on a non-finite mean loss, naming this rank's first bad micro-step."""
        if math.isfinite(value):
            return
        bad = (~torch.isfinite(torch.stack(losses))).nonzero()
        it = int(bad[0]) if len(bad) else -1
        if it < 0:  # another rank's loss went bad; this rank's stayed finite
            where = f"in epoch {epoch + 1}"
        else:
            micro_steps = self.steps_per_epoch * self.accum_iter
            lr = self.lr_fn(epoch + (it - it % self.accum_iter) / micro_steps)
            step = epoch * self.steps_per_epoch + it // self.accum_iter
            where = f"at step {step} (epoch {epoch + 1}, lr {lr:.3g})"
        raise Diverged(
            f"loss is {value} {where}; the last good checkpoint is kept. {self.hint}".rstrip()
        )


def epoch_metrics(stage: str, summary: dict) -> dict:
    """An epoch's summary as the MLflow metrics logged at its end (step: the epoch)."""
    metrics = {f"epoch/{k}": summary[k] for k in ("loss", "img_per_s", "seconds", "data_s")}
    if "val_top1" in summary:
        metrics["val/top1"] = summary["val_top1"]
    if "knn_top1" in summary:
        metrics |= {f"{stage}/knn_top1": summary["knn_top1"], "knn/seconds": summary["knn_s"]}
    return metrics


def epoch_line(stage: str, epochs: int, e: dict) -> str:
    """An epoch's summary as the log line a person reads."""
    scores = "".join(
        f", {label} {e[key]:.4f}"
        for key, label in (("val_top1", "val top-1"), ("knn_top1", "k-NN top-1"))
        if key in e
    )
    return (
        f"{stage} epoch {e['epoch']}/{epochs}: loss {e['loss']:.4f}{scores}, "
        f"{e['img_per_s']:.0f} img/s, {e['seconds']:.1f} s ({e['data_s']:.1f} s waiting for data)"
    )


def speed(epochs: list[dict]) -> dict:
    """The metrics every training stage reports of its speed: mean img/s, minutes of
    training, and the fraction of them spent waiting for data."""
    seconds = sum(e["seconds"] for e in epochs)
    return {
        "img_per_s": sum(e["img_per_s"] for e in epochs) / len(epochs),
        "minutes": seconds / 60,  # training alone
        "data_wait": sum(e.get("data_s", 0.0) for e in epochs) / seconds,
    }
