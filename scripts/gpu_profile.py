"""Where a compiled bf16 MAE step's time goes, on a GPU leased for minutes (no installs):
`torch.profiler` over compiled steps of a model preset at each batch size, its CUDA time
sorted into kinds (GEMMs, attention, fused norm/GELU/elementwise kernels, the masking
gather, the optimizer, copies), the GPU's idle share of the step and the host syncs; then
the step timed as the official code runs it (fp16 + loss scaling, foreach AdamW, eager),
ours compiled, and ours compiled with CUDA graphs (`reduce-overhead`), side by side.

    python scripts/gpu_profile.py OUT.json [--model mae_vit_base_patch16]
                                  [--batch 256 --batch 1024] [--large 2048] [--minutes 3.6]

OUT.json is rewritten after every measurement, so a run cut short keeps what it measured;
a measurement that would start past `--minutes` is skipped and said so. On a CPU (a
rehearsal: `--model mae_vit_tiny_patch7_28 --batch 8`) the same runs in fp32, without the
official fp16 step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mae import mae_config  # noqa: E402
from mae.flops import mae_step_flops  # noqa: E402
from mae.model import MaskedAutoencoderViT  # noqa: E402
from mae.optim import build_adamw, pretrain_param_groups  # noqa: E402
from pipeline.tools.bench import bf16_peak_tflops  # noqa: E402

# Kernel kinds by pieces of their names, the first match wins: cuDNN's SDPA kernels and
# their pre/post passes, cuBLAS's GEMMs (nvjet on Hopper), the patch embedding's cuDNN
# convolution and its layout transforms, Inductor's Triton kernels (named after what they
# fuse: a `_to_copy` in one is a cast, not a copy), PyTorch's own kernels. The names were
# read off an H200 profile (results/gpu-h200-2026-12-04/profile.json).
KINDS = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "convert_dq", "compute_dot_do_o")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "unscale")),
    ("patch-embed conv", ("convolve", "fprop", "wgrad", "dgrad", "nchwtonhwc", "nhwctonchw")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("fused triton (norms, GELU, casts, permutes, loss)", ("triton",)),
    ("masking gather", ("gather", "index", "scatter", "sort", "topk")),
    ("copies", ("memcpy", "memset", "copy", "cat", "fill")),
    ("norms", ("layer_norm", "layernorm")),
    ("reductions", ("reduce", "sum", "mean")),
)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def main() -> int:
    a = _args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.minutes * 60
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        "what": "scripts/gpu_profile.py: where a compiled MAE step's time goes",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python", "scripts/gpu_profile.py", *sys.argv[1:]]),
        "commit": a.commit,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
        "software": f"python {platform.python_version()}, torch {torch.__version__}",
        "model": a.model,
        "mask_ratio": 0.75,
        "peak_tflops": bf16_peak_tflops(dev),
        "runs": [],
        "skipped": [],
    }
    plan = []  # (what, batch, precision, compile mode, profile)
    for b in a.batch:
        plan += [("ours", b, "bf16", "default", True), ("official", b, "fp16", None, False),
                 ("ours", b, "bf16", "reduce-overhead", False)]  # fmt: skip
    plan += [("ours", b, "bf16", "default", False) for b in a.large]
    for what, batch, precision, mode, prof in plan:
        if dev.type != "cuda":
            precision = "fp32"
            if what == "official":
                continue
        left = deadline - time.monotonic()
        if left < a.need:
            record["skipped"].append(f"{what} {precision} {mode} batch {batch}: {left:.0f} s left")
            _save(out, record)
            continue
        try:
            peak = record["peak_tflops"]
            run = measure(a.model, batch, precision, mode, dev, a.steps, prof, peak)
        except Exception as err:  # an OOM or a compile failure: recorded, the rest goes on
            run = {"batch": batch, "precision": precision, "compile": mode,
                   "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}  # fmt: skip
        run["what"] = what
        record["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "kernels"}), flush=True)
        _save(out, record)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return 0


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="mae_vit_base_patch16")
    ap.add_argument("--batch", type=int, action="append", help="default: 256 and 1024")
    ap.add_argument("--large", type=int, action="append", default=[], help="timed only")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--minutes", type=float, default=3.6, help="start nothing past this")
    ap.add_argument("--need", type=float, default=25.0, help="seconds a measurement needs")
    ap.add_argument("--commit")
    a = ap.parse_args()
    a.batch = a.batch or [256, 1024]
    return a


def measure(model_name, batch, precision, mode, dev, steps, prof, peak) -> dict:
    """One model at one batch: compile (mode None: eager), warm up, time `steps` steps with
    CUDA events; with `prof`, profile 3 more. -> its figures as a dict."""
    torch.manual_seed(0)
    cfg = mae_config(model_name)
    model = MaskedAutoencoderViT(cfg).to(dev)
    net = model if mode is None else torch.compile(model, mode=None if mode == "default" else mode)
    official = precision == "fp16"
    groups = pretrain_param_groups(model, 0.05)
    opt = build_adamw(groups, lr=1e-4, fused=False if official else None)
    scaler = torch.amp.GradScaler(dev.type, enabled=official)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    imgs = torch.randn(batch, cfg.in_chans, *cfg.image_hw, device=dev)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss, _, _ = net(imgs, 0.75)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(3):  # the first compiles
        step()
    _sync(dev)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    step_s = (time.perf_counter() - t0) / steps
    flop = mae_step_flops(cfg, batch, 0.75)
    run = {
        "batch": batch, "precision": precision, "compile": mode,
        "compile_and_warmup_s": round(warm_s, 1), "steps": steps,
        "step_ms": round(step_s * 1e3, 2), "img_per_s": round(batch / step_s),
        "step_tflop": round(flop / 1e12, 3), "tflops": round(flop / step_s / 1e12, 1),
        "mfu": round(flop / step_s / 1e12 / peak, 4) if peak and amp is not None else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if dev.type == "cuda" else None,
    }  # fmt: skip
    if prof:
        run |= profile(step, dev, step_s)
    return run


def profile(step, dev, step_s: float, n: int = 3) -> dict:
    """CUDA time per kind of kernel over `n` profiled steps, the GPU's idle share (1 - the
    kernels' time / the steps' wall time) and the host syncs per step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as p:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync(dev)
        wall = time.perf_counter() - t0
    kernels, kinds, syncs, busy = {}, {}, 0, 0.0
    for e in p.events():
        if e.name in SYNC_EVENTS:
            syncs += 1
        dt = e.device_time if hasattr(e, "device_time") else e.cuda_time
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or not dt:
            continue
        busy += dt
        kernels[e.name] = kernels.get(e.name, 0.0) + dt
        kinds[_kind(e.name)] = kinds.get(_kind(e.name), 0.0) + dt
    if dev.type != "cuda":  # the CPU rehearsal: self CPU time per op instead
        for e in p.key_averages():
            kernels[e.key] = e.self_cpu_time_total
            kinds[_kind(e.key)] = kinds.get(_kind(e.key), 0.0) + e.self_cpu_time_total
        busy = sum(kinds.values())
    total = sum(kinds.values()) or 1.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {
        "profiled_steps": n,
        "profiled_step_ms": round(wall / n * 1e3, 2),
        "kernel_ms_per_step": round(busy / n / 1e3, 2),
        "gpu_idle_share": round(max(0.0, 1 - busy / 1e6 / wall), 4),
        "host_syncs_per_step": syncs / n,
        "by_kind": {
            k: {"ms_per_step": round(v / n / 1e3, 3), "share": round(v / total, 4)}
            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
        "kernels": [{"name": k[:160], "ms_per_step": round(v / n / 1e3, 3)} for k, v in top],
    }


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _save(out: Path, record: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
