"""Throughput figures of the MAE training step: img/s, data wait vs compute, peak memory,
model FLOP utilisation, the asymmetric encoder's speed-up (the data: `bench_data`)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mae import MAEConfig, mae_config
from mae.baseline import MaskTokensInEncoderMAE
from mae.flops import mae_step_flops
from mae.model import MaskedAutoencoderViT
from mae.optim import build_adamw, pretrain_param_groups
from pipeline.train.runtime import Runtime, compiled

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
# piece of `torch.cuda.get_device_name()`; the first match wins. --peak-tflops overrides.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
}


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class StepBench:
    model: str
    device: str
    precision: str
    compile: bool | str  # False, or torch.compile's mode (True: "default")
    data: str  # synthetic (one batch on the device) | shards | memory (the pretrain loader,
    # streaming or over the split held in memory)
    img_size: int
    batch_size: int
    mask_ratio: float
    steps: int
    threads: int
    step_ms: float  # data wait + compute
    data_ms: float  # waiting for the next batch (and its crop/flip on the device)
    compute_ms: float  # forward + backward + optimizer step, synchronised
    img_per_s: float
    peak_memory_gb: float  # CUDA: max allocated; CPU: the process's peak RSS
    step_tflop: float  # analytic, see mae/flops.py
    tflops: float  # achieved: step_tflop / step time
    peak_tflops: float | None  # the device's dense bf16 peak, when known
    mfu: float | None  # tflops / peak_tflops (autocast on CUDA only)
    baseline_compute_ms: float | None  # mask tokens through the encoder, same batch
    speedup: float | None  # baseline_compute_ms / compute_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        lines = [
            f"{self.model} {self.img_size}px on {self.device} ({self.precision}"
            f"{_compiled_label(self.compile)}, {self.threads} threads), batch "
            f"{self.batch_size}, mask {self.mask_ratio}, {self.data} data:",
            f"  {self.img_per_s:,.0f} img/s; step {self.step_ms:.1f} ms = data wait "
            f"{self.data_ms:.1f} ms + compute {self.compute_ms:.1f} ms ({self.steps} steps)",
            f"  {self.step_tflop:.3g} TFLOP/step (analytic) -> {self.tflops:.3g} TFLOP/s"
            + (f", MFU {self.mfu:.1%} of {self.peak_tflops:g} bf16 peak" if self.mfu else ""),
            f"  peak memory {self.peak_memory_gb:.2f} GB",
        ]
        if self.speedup is not None:
            lines.append(
                f"  asymmetric encoder: {self.speedup:.2f}x faster than mask tokens through "
                f"the encoder ({self.baseline_compute_ms:.1f} ms compute/step)"
            )
        return "\n".join(lines)


def _compiled_label(mode: bool | str) -> str:
    if mode is False:
        return ""
    return ", compiled" if mode in (True, "default") else f", compiled {mode}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    return dev


def _synthetic(cfg: MAEConfig, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    imgs = torch.randn(batch_size, cfg.in_chans, *cfg.image_hw, device=device)
    while True:
        yield imgs


def _from_shards(loader, device: torch.device) -> Iterator[torch.Tensor]:
    """The pretrain loader's batches on the device, cropped and flipped there, epoch after
    epoch: what the pretrain stage's step waits for."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield loader.images(batch, device)
        epoch += 1


def shards_loader(
    params: Path, model: str, img_size: int | None, batch_size: int, in_memory: bool, device: str
):
    """The pretrain loader over `params`' shards, as the pretrain stage builds it: streamed,
    or over the train split held in memory on `device` (decoded here, before any timing)."""
    from pipeline.data.loader import build_loader
    from pipeline.data.store import shard_store
    from pipeline.params import load_params

    p = load_params(params)
    loader = build_loader(
        shard_store(p.data),
        "train",
        "pretrain",
        batch_size=batch_size,
        img_size=img_size or mae_config(model).image_hw[0],
        num_workers=p.runtime.num_workers,
        in_memory=in_memory,
        device=resolve_device(device),
    )
    if in_memory:
        next(iter(loader))
    return loader


def _time_steps(
    model: MaskedAutoencoderViT,
    batches: Iterator[torch.Tensor],
    mask_ratio: float,
    steps: int,
    warmup: int,
    autocast: Callable,
    compile: bool | str,
    official: bool = False,
) -> tuple[float, float]:
    """-> (mean data wait, mean compute) in seconds per step, after `warmup` steps. With
    `official`, the official code's step: fp16 loss scaling and the default (foreach) AdamW."""
    device = next(model.parameters()).device
    net = compiled(model, compile)
    groups = pretrain_param_groups(model, 0.05)
    opt = build_adamw(groups, lr=1e-4, fused=False if official else None)
    scaler = torch.amp.GradScaler(device.type, enabled=official)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wait = compute = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        imgs = next(batches)
        sync()
        t1 = time.perf_counter()
        if compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            loss, _, _ = net(imgs, mask_ratio)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        if i >= warmup:
            wait += t1 - t0
            compute += time.perf_counter() - t1
    return wait / steps, compute / steps


def step_precision(precision: str, dev: torch.device) -> tuple[str, torch.dtype | None]:
    """The bench's own precisions: the stages' (fp32, bf16) and the official code's fp16
    step, which the stages do not offer (it gives NaN losses in MAE pretraining)."""
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 (the official code's loss-scaled step) needs a CUDA device")
    return precision, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _peak_memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass(frozen=True)
class StepOptions:
    """What `bench_train_step` measures: a model preset at a batch size, the step's
    settings (`runtime.precision` and `runtime.compile`'s values; "fp16" is the official
    code's loss-scaled step), how many steps, and the baseline with mask tokens."""

    model: str
    batch_size: int
    mask_ratio: float = 0.75
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    precision: str = "auto"
    compile: bool | str = False
    img_size: int | None = None
    baseline: bool = True
    peak_tflops: float | None = None
    seed: int = 0


def bench_train_step(o: StepOptions, loader=None) -> StepBench:
    """Time `o.steps` training steps (forward + backward + AdamW) after `o.warmup` untimed
    ones, on synthetic images or on `loader`'s (a pretrain Loader); with `o.baseline`, the
    same for the model with mask tokens through its encoder. ValueError for a precision
    the device lacks."""
    torch.manual_seed(o.seed)
    dev = resolve_device(o.device)
    overrides = {"img_size": o.img_size} if o.img_size else {}
    if loader is not None:
        overrides["in_chans"] = loader.manifest["channels"]
    cfg = mae_config(o.model, **overrides)
    precision, amp = step_precision(o.precision, dev)
    timing = dict(
        mask_ratio=o.mask_ratio,
        steps=o.steps,
        warmup=o.warmup,
        autocast=Runtime(dev, amp).autocast,
        compile=o.compile,
        official=precision == "fp16",
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    batches = _synthetic(cfg, o.batch_size, dev) if loader is None else _from_shards(loader, dev)
    wait, compute = _time_steps(MaskedAutoencoderViT(cfg).to(dev), batches, **timing)
    peak_gb = _peak_memory_gb(dev)
    base = None
    if o.baseline:  # the same images for both: the data pipeline is not what is compared
        other = MaskTokensInEncoderMAE(cfg).to(dev)
        _, base = _time_steps(other, _synthetic(cfg, o.batch_size, dev), **timing)
    # MFU against the dense bf16 peak (fp16's is the same on these chips)
    peak = o.peak_tflops or (bf16_peak_tflops(dev) if amp is not None else None)
    data = "synthetic" if loader is None else "memory" if loader.in_memory else "shards"
    return _step_bench(o, cfg, dev, precision, data, (wait, compute, base), peak_gb, peak)


def _step_bench(o: StepOptions, cfg, dev, precision: str, data: str, times, peak_gb, peak):
    """The figures of one measurement: `times` = (data wait, compute, baseline compute) s."""
    wait, compute, base = times
    step = wait + compute
    flop = mae_step_flops(cfg, o.batch_size, o.mask_ratio) / 1e12
    return StepBench(
        model=o.model,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        precision=precision,
        compile=o.compile,
        data=data,
        img_size=cfg.image_hw[0],
        batch_size=o.batch_size,
        mask_ratio=o.mask_ratio,
        steps=o.steps,
        threads=torch.get_num_threads(),
        step_ms=step * 1e3,
        data_ms=wait * 1e3,
        compute_ms=compute * 1e3,
        img_per_s=o.batch_size / step,
        peak_memory_gb=peak_gb,
        step_tflop=flop,
        tflops=flop / step,
        peak_tflops=peak,
        mfu=flop / step / peak if peak else None,
        baseline_compute_ms=base * 1e3 if base else None,
        speedup=base / compute if base else None,
    )
