"""On CUDA: bf16 autocast, torch.compile, pinned memory, the benchmark's MFU, and DDP over
NCCL. Skipped without CUDA (`make test-gpu` on a GPU runner runs them)."""

import json
import math
from pathlib import Path

import pytest
import torch

from mae.optim import build_adamw
from pipeline.params import load_params
from pipeline.stages import run_training
from pipeline.tools.bench import StepOptions, bench_train_step
from pipeline.train.runtime import resolve_runtime
from tests.factory import ROOT, build_project
from tests.test_distributed import check_same_training, run_one_and_two_ranks

pytestmark = pytest.mark.gpu


def test_auto_runtime_is_cuda_in_bf16():
    rt = resolve_runtime(load_params(ROOT / "params.yaml").runtime)
    assert rt.device.type == "cuda" and rt.amp_dtype == torch.bfloat16


def test_pretrain_on_cuda_in_bf16_compiled(tmp_path, monkeypatch):
    params = build_project(
        tmp_path / "p",
        pretrain={"epochs": 2},
        runtime={"device": "auto", "compile": True, "num_workers": 2},
    )
    monkeypatch.chdir(params.parent)
    run_training("pretrain", load_params("params.yaml"))
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert math.isfinite(metrics["loss"]) and metrics["img_per_s"] > 0


def test_bench_on_cuda_reports_bf16_mfu_and_the_speedup():
    result = bench_train_step(StepOptions("mae_vit_test", 64, steps=3, warmup=2, peak_tflops=100.0))
    assert result.precision == "bf16" and result.device != "cpu"
    assert 0 < result.mfu < 1 and result.peak_memory_gb > 0 and result.speedup > 0


def test_the_official_fp16_step_runs_beside_ours_and_adamw_is_fused():
    official = bench_train_step(
        StepOptions("mae_vit_test", 64, steps=2, warmup=1, precision="fp16")
    )
    assert official.precision == "fp16" and official.img_per_s > 0 and official.mfu > 0
    w = torch.nn.Linear(4, 4, device="cuda")
    assert build_adamw([{"params": list(w.parameters())}], lr=1e-3).defaults["fused"]
    assert not build_adamw([{"params": list(w.cpu().parameters())}], lr=1e-3).defaults["fused"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_follow_one_gpu(tmp_path):
    # bf16 rounds differently when the batch is split: a looser tolerance than on the CPU
    check_same_training(run_one_and_two_ranks(tmp_path, device="cuda"), rtol=5e-2, atol=5e-3)


class _NoRun:
    """A tracking run that keeps nothing: the loop's log points still run."""

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass


@pytest.mark.parametrize("compile", [False, "reduce-overhead"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_steps_never_wait_for_the_host_between_log_points(
    tmp_path, monkeypatch, stage, compile
):
    """The split held on the GPU, masks and crops drawn on the host and copied through
    pinned memory, losses kept on the device: under sync debug mode "error" any host sync
    on the training path raises (the loop's log points allow theirs)."""
    from pipeline.stages.finetune import Finetuner
    from pipeline.stages.pretrain import Pretrainer

    params = build_project(
        tmp_path / "p",
        data={"in_memory": True},
        pretrain={"epochs": 3, "log_every": 3, "probe_every": 0},
        finetune={"epochs": 3, "batch_size": 32, "log_every": 3, "warmup_epochs": 1},
        runtime={"device": "cuda", "compile": compile},
        tracking={"system_metrics": False},
    )
    monkeypatch.chdir(params.parent)
    p = load_params("params.yaml")
    if stage == "finetune":
        run_training("pretrain", p)
    s = (Pretrainer if stage == "pretrain" else Finetuner).create(p, resolve_runtime(p.runtime))
    assert s.loader.in_memory and s.loop.graphs == (compile == "reduce-overhead")
    forward = s._loss
    s.net.train()
    s.loader.set_epoch(0)
    s.loop.run(0, s.loader, forward, _NoRun(), [])  # compiles, records the graphs
    torch.cuda.synchronize()
    s.loader.set_epoch(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        summary = s.loop.run(1, s.loader, forward, _NoRun(), [])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(summary["loss"]) and summary["img_per_s"] > 0
