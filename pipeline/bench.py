"""Throughput figures: img/s of the data loader and of the MAE training step."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from mae import create_mae
from mae.optim import build_adamw, pretrain_param_groups


@dataclass(frozen=True)
class StepBench:
    model: str
    device: str
    batch_size: int
    mask_ratio: float
    steps: int
    threads: int
    step_ms: float
    img_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.model} on {self.device} ({self.threads} threads), batch "
            f"{self.batch_size}, mask {self.mask_ratio}: {self.img_per_s:,.0f} img/s "
            f"({self.step_ms:.1f} ms/step over {self.steps} steps)"
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bench_train_step(
    model_name: str,
    batch_size: int,
    mask_ratio: float = 0.75,
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    seed: int = 0,
) -> StepBench:
    """Time `steps` full training steps on synthetic images after `warmup` untimed ones."""
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model = create_mae(model_name).to(dev)
    opt = build_adamw(pretrain_param_groups(model, 0.05), lr=1e-4)
    imgs = torch.randn(batch_size, model.cfg.in_chans, *model.cfg.image_hw, device=dev)

    def step() -> None:
        loss, _, _ = model(imgs, mask_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - start) / steps
    return StepBench(
        model_name,
        str(dev),
        batch_size,
        mask_ratio,
        steps,
        torch.get_num_threads(),
        seconds * 1e3,
        batch_size / seconds,
    )


@dataclass(frozen=True)
class DataBench:
    shards: str
    purpose: str
    workers: int
    batch_size: int
    images: int
    seconds: float
    img_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"loader {self.purpose} on {self.shards}, {self.workers} workers, batch "
            f"{self.batch_size}: {self.img_per_s:,.0f} img/s "
            f"({self.images:,} images in {self.seconds:.1f} s)"
        )


def bench_loader(
    shards: str,
    img_size: int,
    workers: int,
    batch_size: int = 256,
    purpose: str = "pretrain",
    max_images: int = 20_000,
) -> DataBench:
    """img/s of the train-split loader with its full augmentation (the device-side crop and
    flip too, here on the CPU), worker start-up included (as every epoch pays it)."""
    from pipeline.loader import build_loader

    loader = build_loader(
        shards, "train", purpose, batch_size=batch_size, img_size=img_size, num_workers=workers
    )
    start, n = time.perf_counter(), 0
    for batch in loader:
        if loader.device_augment is not None:
            loader.device_augment(batch["image"])
        n += len(batch["label"])
        if n >= max_images:
            break
    seconds = time.perf_counter() - start
    return DataBench(shards, purpose, workers, batch_size, n, seconds, n / seconds)
