"""The stages' model files, written and read here alone: the pretrained MAE
(models/pretrain: model.safetensors + config.json) and the saved classifiers
(models/<finetune|scratch|linprobe>), each checked against the shards it is used with."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mae import MAEConfig, classifier_from_config
from pipeline.data.store import ShardStore
from pipeline.errors import UserError, first_line


@contextlib.contextmanager
def staged(*targets: Path) -> Iterator[list[Path]]:
    """Write `targets` (folders; a name with a suffix is a file) at staging paths beside
    them, then put them in place, in the order given, each by one rename: a failure while
    writing leaves every target as it was. -> the staging paths."""
    staging = [t.with_name(f".{t.name}.staging") for t in targets]
    for tmp, target in zip(staging, targets, strict=True):
        _remove(tmp)
        (tmp.parent if target.suffix else tmp).mkdir(parents=True, exist_ok=True)
    try:
        yield staging
    except BaseException:
        for tmp in staging:
            _remove(tmp)
        raise
    for tmp, target in zip(staging, targets, strict=True):
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class Pretrained:
    cfg: MAEConfig
    state: dict[str, torch.Tensor]
    run_id: str
    manifest_digest: str


def load_pretrained(folder: Path, shards: ShardStore) -> Pretrained:
    """The pretrain stage's output, checked against the shards it will be used with."""
    files = [folder / n for n in ("config.json", "model.safetensors", "run_id")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"no pretrained model: {missing[0]} is missing (run `dvc repro pretrain`)")
    with _readable(folder):
        config = json.loads(files[0].read_text())
        digest = check_shards(config, shards, str(folder))
        return Pretrained(
            MAEConfig.from_dict(config["model"]),
            load_file(str(files[1])),
            files[2].read_text().strip(),
            digest,
        )


@contextlib.contextmanager
def _readable(folder: Path) -> Iterator[None]:
    """A model folder that cannot be read (not JSON, a key missing, garbage weights, the
    wrong shapes) as one line naming it."""
    try:
        yield
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise UserError(
            f"{folder}: not a model this pipeline wrote ({first_line(err)}); run its stage again"
        ) from None


def check_shards(config: dict, shards: ShardStore, what: str) -> str:
    """The shards' manifest digest; UserError naming `what` unless the saved model's
    `config` says it was trained on these very shards."""
    digest = shards.digest()
    if config["manifest_digest"] != digest:
        raise UserError(
            f"{what} was trained on other shards (manifest digest "
            f"{config['manifest_digest'][:12]}; {shards.location} has {digest[:12]})"
        )
    return digest


def save_pretrained(
    folder: Path, model, preset: str, mask_ratio: float, digest: str, run_id: str
) -> None:
    """The pretrain stage's model.safetensors (encoder + decoder; the run id in its
    metadata) and config.json, as `load_pretrained` reads them."""
    config = {
        "model": model.cfg.to_dict(),
        "preset": preset,
        "mask_ratio": mask_ratio,
        "manifest_digest": digest,
    }
    _save(folder, model.state_dict(), config, metadata={"run_id": run_id})


def classifier_config(
    kind: str, cfg: MAEConfig, manifest: dict, digest: str, global_pool: str
) -> dict:
    """What rebuilds the classifier (`mae.classifier_from_config`) and prepares its input
    (the channels, mean and std of the shards it learned from), saved as config.json."""
    return {
        "kind": kind,
        "model": cfg.to_dict(),
        "num_classes": len(manifest["classes"]),
        "classes": manifest["classes"],
        "global_pool": global_pool,
        "channels": manifest["channels"],
        "mean": manifest["mean"],
        "std": manifest["std"],
        "manifest_digest": digest,
    }


def save_classifier(
    folder: Path, model: torch.nn.Module, config: dict, state: dict[str, torch.Tensor] | None = None
) -> list[Path]:
    """Write model.safetensors (the given `state`, else the model's) and config.json."""
    return _save(folder, state if state is not None else model.state_dict(), config)


def _save(folder: Path, state: dict, config: dict, metadata: dict | None = None) -> list[Path]:
    """A model folder as every stage writes it: model.safetensors + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [folder / "model.safetensors", folder / "config.json"]


def load_classifier(folder: Path) -> tuple[torch.nn.Module, dict]:
    with _readable(folder):
        config = json.loads((folder / "config.json").read_text())
        model = classifier_from_config(config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model.eval(), config
