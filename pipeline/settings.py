"""What a run changes: its params that differ from the committed params.yaml (the DVC
experiment's baseline under `dvc exp run`, else HEAD's). Run names show them, so that a
sweep's runs read `pretrain mask=0.75 mask_type=block` and `finetune mask=0.75
trainable_blocks=1` in the MLflow runs table, not all `pretrain mask=0.75`."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from pipeline.params import project_root
from pipeline.params_yaml import load_yaml

# Params that do not change what a run computes, or that others derive.
NOT_A_SETTING = (
    "pretrain.patches_kept",
    "model.parameters",  # the model's size, which its keys set
    "pretrain.log_every",
    "pretrain.recon_every",
    "pretrain.probe_every",
    "finetune.log_every",
    "finetune.trainable_parameters",
    "linprobe.log_every",
    # what the stages derive from the params and the label subset (a label sweep would
    # otherwise split into a series per point): the lr and batch run, the pair the grid chose
    "finetune.lr",
    "finetune.effective_batch",
    "finetune.run_",
    "linprobe.lr",
    "linprobe.run_",
    "linprobe.chosen_",
    "linprobe.cached_features",
    "labels.",
    "data.workers",
    "data.cache",  # and data.cache_max_gb: where remote shards are kept, not what they hold
    "data.in_memory",  # and data.train_in_memory: held or streamed, the same batches
    "data.train_in_memory",
    "runtime.num_workers",
    "runtime.nproc",
    "tracking.",
    "paths.",
)


def baseline() -> dict[str, Any] | None:
    """The committed params.yaml as {"section.key": value}; None outside a git checkout or
    where the commit has no params.yaml."""
    import yaml

    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    try:
        shown = subprocess.run(
            ["git", "show", f"{rev}:./params.yaml"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
        raw = load_yaml(shown.stdout) if shown.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    return {
        f"{section}.{k}": v
        for section, keys in raw.items()
        if isinstance(keys, dict)
        for k, v in keys.items()
    }


def changed(now: dict[str, Any]) -> dict[str, Any]:
    """The keys of `now` ({"section.key": value}, a run's params) whose value differs from
    the baseline's, settings only (not `NOT_A_SETTING`); keys the baseline lacks (added
    since) are left out: their default is what the baseline ran."""
    base = baseline() or {}
    return {
        k: v
        for k, v in now.items()
        if k in base and base[k] != v and not k.startswith(NOT_A_SETTING)
    }


def run_name(head: str, now: dict[str, Any], own: str) -> str:
    """`head` (which says the mask ratio) and each key of `now` ({"section.key": value}, a
    run's params) that `changed`, as `key=value`, those of section `own` first and without
    its name: `run_name("finetune mask=0.75", {"model.decoder_depth": 1, "finetune.epochs":
    3}, "finetune")` -> "finetune mask=0.75 epochs=3 model.decoder_depth=1" (when both
    changed)."""
    changes = changed(now)
    changes.pop("pretrain.mask_ratio", None)  # the head says it
    mine = {k.removeprefix(f"{own}."): v for k, v in changes.items() if k.startswith(f"{own}.")}
    others = {k: v for k, v in changes.items() if not k.startswith(f"{own}.")}
    shown = (f"{k}={'null' if v is None else v}" for k, v in (mine | others).items())
    return " ".join([head, *shown])
