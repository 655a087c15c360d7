"""What every training stage shares: device and precision, seeding, and resumable
checkpoints as safetensors + JSON (never pickles), written atomically."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mae.optim import lr_at, set_lr
from pipeline import distributed
from pipeline.distributed import Dist
from pipeline.errors import UserError
from pipeline.params import RuntimeParams

log = logging.getLogger(__name__)


class Diverged(UserError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    # this process's rank in a torchrun launch (one process: rank 0 of 1)
    dist: Dist = field(default_factory=Dist)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve_runtime(p: RuntimeParams) -> Runtime:
    """The device and precision of this process; under torchrun, joins the process group
    (each rank on the GPU of its LOCAL_RANK)."""
    cuda = torch.cuda.is_available()
    if p.device == "cuda" and not cuda:
        raise UserError("runtime.device is cuda but no CUDA device is available")
    kind = "cuda" if p.device == "cuda" or (p.device == "auto" and cuda) else "cpu"
    d = distributed.init(kind)
    device = torch.device(kind, d.local_rank) if kind == "cuda" else torch.device("cpu")
    if p.precision == "bf16" and device.type == "cpu":
        log.warning("runtime.precision bf16 on the CPU is slow; use fp32 or auto there")
    bf16 = p.precision == "bf16" or (p.precision == "auto" and device.type == "cuda")
    # fp16 is not offered: it gives NaN losses in MAE pretraining; bf16 needs no scaler.
    return Runtime(device, torch.bfloat16 if bf16 else None, d)


def wrap(model: torch.nn.Module, rt: Runtime, compile: bool):
    """-> (the module the training step calls, the DDP wrapper or None).

    Under several ranks the model goes into DistributedDataParallel (gradients averaged
    over ranks in backward); `compile` then compiles the wrapper, as PyTorch recommends.
    """
    net, ddp = model, None
    if rt.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=ids)
    return (torch.compile(net) if compile else net), ddp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed: int, d: Dist) -> None:
    """Once the model is built (the same weights on every rank), give each rank its own
    global streams, seed + rank as the official code: drop path, Mixup/CutMix lambdas and
    boxes then differ between ranks, as they would between the samples of one big batch.
    Masks and crops come from the stages' own generators, drawn for the global batch, so
    they stay the same whatever the number of ranks."""
    seed_everything(seed + d.rank)


def params_key(*parts: Any) -> str:
    """A short digest of everything that determines a training run's result."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------ checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, per_param in state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.contiguous()
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch, CUDA, Python and NumPy RNG states: (tensors, JSON-able)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class Checkpoints:
    """`<folder>/epoch-NNNN/{state.safetensors,state.json}`; the newest complete one wins.

    A checkpoint directory appears by an atomic rename, so a kill mid-write leaves only
    a `.tmp` folder behind, never a half checkpoint.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def latest(self, d: Dist = Dist()) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (every rank loads that one)."""
        done = sorted(p for p in self.folder.glob("epoch-*") if not p.name.endswith(".tmp"))
        name = d.broadcast(done[-1].name if done else None)
        if name is None:
            return None
        path = self.folder / name
        if not path.is_dir():
            raise UserError(
                f"rank {d.rank} cannot see checkpoint {path}: paths.checkpoints must be on "
                "a filesystem every node shares"
            )
        return path

    def save(
        self,
        epoch: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        extra: dict,
        extra_tensors: dict[str, torch.Tensor] | None = None,
        rng_states: list[tuple[dict, dict]] | None = None,
    ) -> Path:
        """`extra` goes to JSON, `extra_tensors` (e.g. the best weights so far) beside the
        model's; `load` returns both. `rng_states`: every rank's `rng_state()` (default:
        this process's), so that each rank resumes its own random streams."""
        model_state = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        }
        model_state |= {
            f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()
        }
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        states = rng_states or [rng_state()]
        tensors = {
            **model_state,
            **{k: v.cpu() for k, v in opt_tensors.items()},
            **{f"rng.{r}.{k}": v for r, (t, _) in enumerate(states) for k, v in t.items()},
            "rng.masking": generator.get_state(),
        }
        rng_meta = [m for _, m in states]
        meta = {"epoch": epoch, "optimizer": opt_meta, "rng": rng_meta, **extra}
        final = self.folder / f"epoch-{epoch:04d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))
        tmp.rename(final)
        for old in self.folder.glob("epoch-*"):  # keep only the newest
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        rank: int = 0,
    ) -> dict:
        """Restore model, optimizer and RNG states (those of `rank`) in place; -> the JSON
        part."""
        tensors = load_file(str(path / "state.safetensors"))
        meta = json.loads((path / "state.json").read_text())
        model.load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        )
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        prefix = f"rng.{rank}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        _set_rng_state(own, meta["rng"][rank])
        generator.set_state(tensors["rng.masking"])
        meta["tensors"] = {
            k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")
        }
        return meta

    def resume(
        self,
        d: Dist,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        epochs: int,
    ) -> dict | None:
        """Load the newest checkpoint into every rank, if there is one; -> its JSON part
        (epoch, run_id, history, ...) or None."""
        latest = self.latest(d)
        if latest is None:
            return None
        meta = self.load(latest, model, optimizer, generator, d.rank)
        log.info("resuming from %s (epoch %d of %d)", latest, meta["epoch"] + 2, epochs)
        return meta

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------ the epoch loop
def schedule(section: Any, lr: float):
    """A stage section's warm-up + cosine schedule: fractional epoch -> lr."""
    return functools.partial(
        lr_at,
        lr=lr,
        epochs=section.epochs,
        warmup_epochs=section.warmup_epochs,
        min_lr=section.min_lr,
    )


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

    def run(self, epoch: int, batches, forward, run, history: list[dict]) -> dict:
        micro_steps = self.steps_per_epoch * self.accum_iter
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        losses, images, start = [], 0, time.perf_counter()  # losses stay on the device
        step, lr = epoch * self.steps_per_epoch, self.lr_fn(epoch)
        for it, batch in enumerate(batches):
            if it >= micro_steps:
                break  # a partial accumulation at the end of an epoch is not applied
            if it % self.accum_iter == 0:
                lr = self.lr_fn(epoch + it / micro_steps)
                set_lr(optimizer, lr)
            last = (it + 1) % self.accum_iter == 0
            with self._sync(last):
                loss = forward(batch)
                (loss / self.accum_iter).backward()
            losses.append(loss.detach().float())
            images += len(batch["label"])
            if last:
                if self.clip_grad is not None:
                    params = [p for g in optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % self.log_every == 0:
                    value = self._mean(losses[-1])
                    self._check(value, epoch, losses)
                    history.append(
                        {"step": step, "epoch": epoch + it / micro_steps, "loss": value, "lr": lr}
                    )
                    run.log_metrics({"train/loss": value, "train/lr": lr}, step=step)
        mean = self._mean(torch.stack(losses).mean()) if losses else 0.0
        self._check(mean, epoch, losses)
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "loss": mean,
            "img_per_s": images * self.dist.world_size / seconds,
            "seconds": seconds,
        }

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
