"""The one-call GPU script rehearsed on the CPU with a cut schedule: every stage it runs on a
GPU machine runs here, and its record holds the figures the GPU issue asks for."""

import json
import subprocess
import sys

import pytest

from tests.factory import ROOT, idx_dataset

CUT = {
    "data.source": "idx",
    "model.name": "mae_vit_test",
    "pretrain.epochs": 2,
    "pretrain.warmup_epochs": 1,
    "pretrain.batch_size": 32,
    "pretrain.probe_every": 2,
    "pretrain.recon_every": 1,
    "finetune.epochs": 1,
    "finetune.warmup_epochs": 0,
    "finetune.batch_size": 32,
    "finetune.min_steps": 0,
    "linprobe.min_steps": 0,
    "linprobe.epochs": 2,
    "linprobe.warmup_epochs": 1,
    "linprobe.batch_size": 32,
    "runtime.num_workers": 0,
    "runtime.device": "cpu",
}


@pytest.mark.slow
def test_the_gpu_script_runs_the_recipe_cut_short_and_records_its_figures(tmp_path):
    idx_dataset(tmp_path / "raw", n_train=200, n_test=60, size=16)
    sets = [arg for k, v in CUT.items() for arg in ("--set", f"{k}={v}")]
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "scripts/gpu_record.py", str(out), "--data-root", str(tmp_path / "raw"),
           "--work", str(work), "--bench", "--commit", "abc", *sets]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "record.json").read_text())
    assert record["commit"] == "abc" and "torch" in record["software"] and record["date"]
    assert record["params"]["model.name"] == "mae_vit_test"  # the cut over the recipe
    assert record["params"]["finetune.layer_decay"] == 0.75  # the recipe over params.yaml
    assert [s for s, e in record["stages"].items() if e["exit"] == 0] == [
        "shard", "pretrain", "finetune", "scratch", "linprobe", "pixels", "evaluate"
    ]  # fmt: skip
    results = record["results"]
    for key in ("finetune_top1", "scratch_top1", "linprobe_top1", "pixels_top1"):
        assert 0 < results[key] <= 1
    gain = results["finetune_top1"] - results["scratch_top1"]
    assert results["mae_gain"] == pytest.approx(gain, abs=2e-6)  # rounded in the file
    for stage in ("pretrain", "finetune", "scratch"):
        speed = results[stage]
        assert speed["img_per_s"] > 0 and speed["minutes"] > 0 and 0 <= speed["data_wait"] < 1
    assert 0 <= results["pretrain"]["knn_top1"] <= 1
    assert [b["data"] for b in record["bench"]] == ["shards", "memory"]
    assert all(b["img_per_s"] > 0 for b in record["bench"])
    assert (out / "pretrain.log").is_file() and not (out / "mlflow.db").exists()
    # everything else stays in the work folder, which a GPU run does not send back
    assert (work / "mlflow.db").is_file() and (work / "models/finetune/run_id").is_file()


def test_a_bad_setting_or_work_folder_stops_the_script_with_a_record_saying_why(tmp_path):
    def record(*args):
        cmd = [sys.executable, "scripts/gpu_record.py", str(tmp_path / "out"), *args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        return done.returncode, json.loads((tmp_path / "out/record.json").read_text())

    code, said = record("--work", str(tmp_path / "w"), "--set", "pretrain.epoch=3")
    assert code == 2 and said["error"].startswith("params: pretrain.epoch: unknown key")
    code, said = record("--work", str(ROOT))
    assert code == 2 and said["error"].endswith("not a folder to empty")
    assert (ROOT / "params.yaml").is_file()


def _profile_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "scripts/gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_profile_sorts_kernels_read_off_an_h200_into_their_kinds():
    kind = _profile_script()._kind
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*)": "attention",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT": "gemm",
        "void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6>": "patch-embed conv",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "patch-embed conv",
        # Inductor names a kernel after what it fuses: `_to_copy` is a cast, not a copy
        "triton_per_fused__to_copy_add_native_layer_norm_backward_view_12": "fused triton",
        "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>": (
            "optimizer"
        ),
        "Memcpy HtoD (Pinned -> Device)": "copies",
    }
    for name, expected in names.items():
        assert kind(name).startswith(expected), (name, kind(name))


def test_the_profile_past_its_deadline_skips_each_measurement_and_says_so(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "scripts/gpu_profile.py", str(out), "--model", "mae_vit_test",
           "--batch", "4", "--minutes", "0", "--commit", "abc"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["runs"] == [] and record["commit"] == "abc"
    assert len(record["skipped"]) == 2  # ours compiled and with CUDA graphs; no fp16 on a CPU
    assert all("batch 4" in s for s in record["skipped"])
