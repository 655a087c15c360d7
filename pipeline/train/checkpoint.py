"""Resumable checkpoints as safetensors + JSON (never pickles), written atomically: model,
optimizer, every rank's RNG streams."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError, first_line
from pipeline.train.distributed import Dist

log = logging.getLogger(__name__)


def params_key(parts: dict[str, Any]) -> str:
    """A short digest of everything that determines a training run's result."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _flat(parts: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"runtime": {"seed": 0}} -> {"runtime.seed": "0"}: the parts as JSON leaves."""
    out = {}
    for name, value in parts.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = json.dumps(value, sort_keys=True, default=str)
    return out


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
    """The key parts that differ: {"pretrain.mask_ratio": ("0.75", "0.5"), ...}."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, "-"), b.get(k, "-")) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)}  # fmt: skip


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

    def candidates(self, d: Dist = Dist()) -> list[Path]:
        """The complete checkpoints, newest first, as rank 0 sees them (every rank tries
        the same ones)."""
        done = sorted(p for p in self.folder.glob("epoch-*") if not p.name.endswith(".tmp"))
        names = d.broadcast([p.name for p in reversed(done)])
        paths = [self.folder / name for name in names]
        for path in paths:
            if not path.is_dir():
                raise UserError(
                    f"rank {d.rank} cannot see checkpoint {path}: paths.checkpoints must be "
                    "on a filesystem every node shares"
                )
        return paths

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
        shutil.rmtree(final, ignore_errors=True)  # an unreadable one, resumed from before it
        tmp.rename(final)
        # the newest two: if the newest cannot be read later, the one before it can
        keep = sorted(p for p in self.folder.glob("epoch-*") if not p.name.endswith(".tmp"))
        for old in [p for p in self.folder.glob("epoch-*") if p not in keep[-2:]]:
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
        """Load the newest readable checkpoint into every rank, if there is one; -> its JSON
        part (epoch, run_id, history, ...) or None. One that cannot be read (a truncated
        file, a disk error) is reported in one line and the one before it is tried."""
        for path in self.candidates(d):
            try:
                meta = self.load(path, model, optimizer, generator, d.rank)
            except (
                OSError,
                ValueError,
                KeyError,
                IndexError,
                RuntimeError,
                SafetensorError,
            ) as err:
                log.warning("checkpoint %s cannot be read (%s): skipped", path, first_line(err))
                continue
            log.info("resuming from %s (epoch %d of %d)", path, meta["epoch"] + 2, epochs)
            return meta
        if self.folder.is_dir() and any(self.folder.glob("epoch-*")):
            log.warning("no readable checkpoint in %s: starting afresh", self.folder)
        return None

    def note_key(self, parts: dict[str, Any], stage: str) -> None:
        """Write `key.json` (the key's parts) into the folder, and when checkpoints of
        `stage` lie under another key, log at info what differs from the nearest one:
        why this run does not resume them. Never a reason to refuse a run."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "key.json").write_text(json.dumps(parts, indent=1, default=str) + "\n")
        others = []
        for path in self.folder.parent.glob(f"{stage}-*/key.json"):
            if path.parent != self.folder and any(path.parent.glob("epoch-*")):
                try:
                    others.append((key_changes(json.loads(path.read_text()), parts), path.parent))
                except (OSError, ValueError):
                    continue  # a key.json cut short: nothing to say about it
        if others:
            changes, folder = min(others, key=lambda o: len(o[0]))
            said = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())
            log.info("%s has checkpoints under another key (%s), not resumed: %s",
                     stage, folder, said)  # fmt: skip

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def locked(self, writer: bool = True):
        """Hold `<folder>.lock` (an advisory `flock`, released when the process ends, a
        `kill -9` included) while this process trains into the folder: two DVC queue
        workers with the same stage, params and data never write one folder at once. The
        file goes when the lock is let go (a taker checks it locked the file still there).
        UserError naming the folder and the holder's pid when another process holds it.
        `writer=False` (ranks other than 0, which write nothing): no lock."""
        if not writer:
            yield
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        path = self.folder.with_name(self.folder.name + ".lock")
        lock = self._take(path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still held: no one else has it
            lock.close()  # lets go of the lock

    def _take(self, path: Path):
        while True:
            lock = open(path, "a+")  # noqa: SIM115 (held until `locked` ends)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                lock.close()
                raise UserError(
                    f"another process (pid {holder}) is training into {self.folder} (the same "
                    "stage, params and data): wait for it, or stop it and run again to resume "
                    "from its checkpoints"
                ) from None
            if path.exists() and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                lock.truncate(0)
                lock.write(f"{os.getpid()}\n")
                lock.flush()
                return lock
            lock.close()  # its holder removed the file as we took it: take the new one
