"""The process's runtime: device, precision, its rank among the ranks, the DDP/compile
wrap, and seeding."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.params import RuntimeParams, flatten
from pipeline.train import distributed
from pipeline.train.distributed import Dist

log = logging.getLogger(__name__)


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


# Runtime params proven not to change results: in no checkpoint key and no stage's DVC
# params. num_workers: every batch's per-image augmentation is seeded by (seed, epoch,
# rank, batch) whichever worker reads it (tests/test_loader.py, 0, 1 and 3 workers).
RESULTS_NEUTRAL = ("num_workers",)


def runtime_key(p: RuntimeParams, rt: Runtime) -> dict:
    """The runtime params a checkpoint key holds: the device as resolved (`auto`, `cuda`
    and `cuda:0` on one GPU train alike), not as spelled; none of `RESULTS_NEUTRAL`; the
    rest (nproc: the effective batch and lr; precision; compile) as given."""
    kept = {k: v for k, v in flatten(p).items() if k not in RESULTS_NEUTRAL}
    return kept | {"device": rt.device.type}


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


def wrap(model: torch.nn.Module, rt: Runtime, compile: bool | str):
    """-> (the module the training step calls, the DDP wrapper or None).

    Under several ranks the model goes into DistributedDataParallel (gradients averaged
    over ranks in backward); `compile` (`runtime.compile`) then compiles the wrapper, as
    PyTorch recommends.
    """
    net, ddp = model, None
    if rt.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=ids)
    return compiled(net, compile), ddp


def compiled(module: torch.nn.Module, compile: bool | str):
    """`module` as `runtime.compile` says: itself (false), or `torch.compile`d in the mode
    it names (true: "default"). "reduce-overhead" replays CUDA graphs: a training loop
    must then call `torch.compiler.cudagraph_mark_step_begin()` before each step, and
    clone what it keeps of a step's outputs (the next replay overwrites them)."""
    if compile is False:
        return module
    return torch.compile(module, mode=None if compile in (True, "default") else compile)


def graphs(compile: bool | str) -> bool:
    """Whether `runtime.compile` replays CUDA graphs (see `compiled`)."""
    return compile == "reduce-overhead"


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
