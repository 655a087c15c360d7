"""Several processes, one training run: torch.distributed set up from the environment.

Launched by `torchrun` (or by `launch` below for `runtime.nproc` > 1 on one machine), a
process finds RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in its environment;
`init` joins the process group (NCCL on CUDA, gloo on the CPU). Without those variables
everything here is a no-op for a single process, so the stages call it unconditionally.

Rank 0 alone talks to MLflow and writes outputs and checkpoints; every rank trains.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UserError

log = logging.getLogger(__name__)
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank r of `world_size`, `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> slice:
        """This rank's rows of a global batch of `world_size` x `n` rows."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place; returns `tensor`)."""
        if self.enabled:
            if dist.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL: GPU tensors only
                on_gpu = tensor.cuda()
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                tensor.copy_(on_gpu)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def launched() -> bool:
    """True inside a process started by torchrun or `launch` (with more than one rank)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> Dist:
    """Join the process group described by the environment (once); -> this process's place."""
    if not launched():
        return Dist()
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )
        if rank != 0:  # one voice: the other ranks log warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
    return Dist(rank, world, local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ the one-machine launcher
def resolve_nproc(nproc: int | str, device: str) -> int:
    """`runtime.nproc`: a count, or "auto": every visible GPU (1 on the CPU)."""
    if nproc != "auto":
        return int(nproc)
    if device == "cpu" or not torch.cuda.is_available():
        return 1
    return max(torch.cuda.device_count(), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m pipeline.cli *argv` as `nproc` ranks on this machine; -> exit status.

    What `torchrun --standalone` does, kept for what a pipeline stage needs and torchrun
    lacks: the failing rank's own one-line error and exit status become the stage's (torchrun
    ends with its elastic agent's multi-page ChildFailedError report instead), the others
    are stopped at once, a Ctrl-C or DVC's stop takes every rank down, and the ranks share
    the cores (OMP_NUM_THREADS). Multi-node runs use torchrun itself (README).
    """
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        env.setdefault("OMP_NUM_THREADS", str(threads))  # ranks share the cores
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], env=env))
    log.info("launched %d ranks: %s", nproc, " ".join(argv))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except BaseException:  # Ctrl-C, or dvc stopping the stage: take the ranks down too
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
