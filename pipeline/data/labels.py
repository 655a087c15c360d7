"""Few labels (`data.labels`): the class-balanced subset of the train and val splits that
finetune, scratch, linprobe and the pixels control train and choose their epoch on.

A pure function of the shards' labels (the manifest's tar indexes), the key and
`data.labels_seed`, which is neither the shard stage's seed nor read by pretraining: a
label sweep re-runs neither. What it keeps:

- `data.labels: null`: every label;
- an integer n: n train images per class (a class with fewer is refused, named); val
  keeps the same fraction of each class (n / that class's train count), at least one;
- a float f in (0, 1): f of each class, at least one, in train and val alike
  (class-stratified, as solo-learn's `data.fraction` and VISSL's balanced `DATA_LIMIT`).

Each class's images are drawn by a permutation seeded by (seed, split, class), and the
first ones kept: a smaller subset of one seed lies inside a larger one (10 per class in
60 per class), as SimCLR's 1 % list lies in its 10 % one. The test split is never cut.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

SPLITS = ("train", "val")  # what the key cuts; test stays whole
SPLIT_NUMBER = {"train": 0, "val": 1}


@dataclass(frozen=True)
class LabelSubset:
    """The kept sample ids (positions in a split's shards, sorted) per split."""

    spec: int | float
    seed: int
    ids: dict[str, np.ndarray]
    per_class: dict[str, list[int]]  # split -> kept images per class, in class order

    @property
    def digest(self) -> str:
        """sha256 of the key, the seed and every kept id: part of each stage's checkpoint
        key, so another subset never resumes this one's checkpoints."""
        h = hashlib.sha256(json.dumps([self.spec, self.seed]).encode())
        for split in SPLITS:
            h.update(split.encode() + self.ids[split].astype("<i8").tobytes())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        """Kept images per split: `labels/train_count`, `labels/val_count` in MLflow."""
        return {split: len(self.ids[split]) for split in SPLITS}

    def write(self, path: Path, classes: list[str], keys: dict[str, list[str]]) -> None:
        """`labels.json`: the key, the seed, the digest, per-class counts and the kept
        samples' keys per split (what a stage's output folder and its MLflow run hold)."""
        doc = {
            "labels": self.spec,
            "seed": self.seed,
            "digest": self.digest,
            "per_class": {s: dict(zip(classes, self.per_class[s], strict=True)) for s in SPLITS},
            "keys": keys,
        }
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def label_subset(
    labels: dict[str, np.ndarray], classes: list[str], spec: int | float | None, seed: int
) -> LabelSubset | None:
    """`labels`: split -> (N,) class index of each sample, in id order; -> the subset that
    `spec` (`data.labels`) keeps, or None for every label. Raises UserError for an integer
    key above a class's train count, naming the class."""
    if spec is None:
        return None
    train = np.bincount(labels["train"], minlength=len(classes))
    if isinstance(spec, int):
        short = [(c, int(n)) for c, n in zip(classes, train, strict=True) if n < spec]
        if short:
            name, n = short[0]
            raise UserError(
                f"data.labels: {spec} per class, but class {name!r} has {n} train images "
                "(lower data.labels, or give a fraction such as 0.01)"
            )
    ids, per_class = {}, {}
    for split in SPLITS:
        kept = []
        for c in range(len(classes)):
            members = np.flatnonzero(labels[split] == c)
            if not len(members):
                continue
            fraction = spec / train[c] if isinstance(spec, int) else spec
            n = spec if split == "train" and isinstance(spec, int) else _share(fraction, members)
            rng = np.random.default_rng([seed, SPLIT_NUMBER[split], c])
            kept.append(rng.permutation(members)[:n])
        ids[split] = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
        per_class[split] = np.bincount(labels[split][ids[split]], minlength=len(classes)).tolist()
    return LabelSubset(spec, seed, ids, per_class)


def _share(fraction: float, members: np.ndarray) -> int:
    """Images kept of a class of `members`: `fraction` of them, rounded, at least one."""
    return min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
