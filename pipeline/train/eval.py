"""The evaluation passes: top-1/top-5/confusion of a classifier (validation, the evaluate
stage and `mae-cli evaluate --run-id` all call `evaluate`), and a split's features."""

from __future__ import annotations

from itertools import islice

import torch

from pipeline.errors import UserError
from pipeline.progress import progress
from pipeline.train.distributed import Dist


@torch.no_grad()
def encode_split(
    loader, encode, device: torch.device, dist: Dist = Dist(), max_batches: int | None = None
):
    """A split's features and labels on the host: each rank encodes its share (`encode`: a
    batch of images on `device` -> (n, D)), its first `max_batches` batches (None: all),
    and every rank gets them all. -> (features (N, D) float32, labels (N,) int64)."""
    feats, labels = RowBuffer(), RowBuffer()
    batches = islice(loader, max_batches)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    for batch in progress(batches, total=total, desc="features", enabled=dist.main):
        feats.add(encode(loader.images(batch, device)).float().cpu())
        labels.add(batch["label"].cpu())
    shares = dist.gather((feats.tensor(), labels.tensor()))
    return torch.cat([f for f, _ in shares]), torch.cat([y for _, y in shares])


class RowBuffer:
    """Rows (features, labels) kept batch after batch, in buffers of 64 MiB (virtual: pages
    count once written). A small tensor kept per batch among the encoder's large short-lived ones
    fragments glibc's heap: caching the 54,000 Fashion-MNIST train features that way grew
    the process by ~600 MB (6 MB a batch, with the split); buffers above glibc's largest
    mmap threshold (32 MiB) get mappings of their own."""

    BYTES = 64 << 20

    def __init__(self) -> None:
        self.full: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self.used = 0

    def add(self, rows: torch.Tensor) -> None:
        while len(rows):
            if self.buffer is None or self.used == len(self.buffer):
                if self.buffer is not None:
                    self.full.append(self.buffer)
                row_bytes = max(rows[0].numel() * rows.element_size(), 1)
                shape = (max(self.BYTES // row_bytes, 1), *rows.shape[1:])
                self.buffer, self.used = torch.empty(shape, dtype=rows.dtype), 0
            k = min(len(rows), len(self.buffer) - self.used)
            self.buffer[self.used : self.used + k] = rows[:k]
            self.used, rows = self.used + k, rows[k:]

    def tensor(self) -> torch.Tensor:
        """All rows, in order, as one tensor; empty if none came."""
        if self.buffer is None:
            return torch.empty(0)
        return torch.cat([*self.full, self.buffer[: self.used]])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    num_classes: int,
    autocast=None,
    dist: Dist = Dist(),
    per_image: bool = False,
) -> dict:
    """Top-1, top-5, per-class accuracy and the confusion matrix (rows: true class); with
    `per_image` (one process) also each image's key, label and class probabilities.

    Under several ranks each evaluates its share of the split; the counts are summed."""
    model.eval()
    # counted on the device: the host reads them once, at the end
    counts = torch.zeros(num_classes**2 + 1, dtype=torch.long, device=device)
    images: dict[str, list] = {"key": [], "label": [], "probabilities": []}
    for batch in progress(loader, desc="evaluate", enabled=dist.main):
        imgs = loader.images(batch, device)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(imgs).float()
        if per_image:
            images["key"] += batch["key"]
            images["label"] += labels.tolist()
            images["probabilities"] += logits.softmax(dim=1).tolist()
        k = min(5, num_classes)
        counts[-1] += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        cells = labels * num_classes + logits.argmax(1)  # index_add_: bincount syncs on CUDA
        counts[:-1].index_add_(0, cells, torch.ones_like(cells))
    counts = dist.sum(counts).cpu()
    confusion, top5 = counts[:-1].view(num_classes, num_classes), int(counts[-1])
    total = int(confusion.sum())
    if total == 0:
        raise UserError("the evaluation split is empty")
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "top1": confusion.diag().sum().item() / total,
        "top5": top5 / total,
        "count": total,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        **({"images": images} if per_image else {}),
    }
