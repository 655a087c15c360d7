"""The `mae-cli` command as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from mae import mae_config
from mae.flops import mae_step_flops
from pipeline.cli import app
from tests.factory import imagefolder, project_params, shard_set

runner = CliRunner()


def _console_script() -> str:
    script = Path(sys.executable).with_name("mae-cli")
    return str(script) if script.exists() else shutil.which("mae-cli")


def test_installed_console_script_shows_help_quickly():
    """--help must not pay for torch/timm/mlflow imports."""
    result = subprocess.run(
        [_console_script(), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Usage: mae-cli" in result.stdout and "bench" in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False"


def test_models_lists_the_presets_with_official_counts():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "mae_vit_base_patch16" in result.output and "111,907,840" in result.output
    assert "mae_vit_test" in result.output


def test_bench_prints_json_figures():
    result = runner.invoke(
        app,
        [
            "bench",
            "step",
            "--model",
            "mae_vit_test",
            "--batch-size",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["model"] == "mae_vit_test" and figures["batch_size"] == 4
    assert figures["img_per_s"] > 0 and figures["step_ms"] > 0
    assert figures["step_ms"] == pytest.approx(figures["data_ms"] + figures["compute_ms"])
    assert figures["step_tflop"] == mae_step_flops(mae_config("mae_vit_test"), 4, 0.75) / 1e12
    assert figures["speedup"] > 0 and figures["baseline_compute_ms"] > 0
    assert figures["mfu"] is None and figures["precision"] == "fp32"  # no bf16 peak on a CPU
    assert figures["peak_memory_gb"] > 0


def test_bench_step_reads_the_shards_and_prints_its_figures(tmp_path):
    shards = shard_set(tmp_path / "shards", [20, 20], size=16)
    params = project_params({"data": {"shards": str(shards)}, "runtime": {"num_workers": 0}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    args = ["--model", "mae_vit_test", "--batch-size", "8", "--steps", "6", "--warmup", "0"]
    result = runner.invoke(
        app,
        ["bench", "step", *args, "--data", "shards", "--params", str(tmp_path / "p.yaml")],
    )
    assert result.exit_code == 0, result.output
    assert "mae_vit_test 16px on cpu (fp32" in result.output and "shards data" in result.output
    assert "data wait" in result.output and "asymmetric encoder" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "mae_vit_test", "--mask-ratio", "1.0"], "mask_ratio must be in [0, 1)"),
        (["--model", "mae_vit_test", "--device", "cpu", "--precision", "fp16"], "needs a CUDA"),
        (["--precision", "fp64"], "--precision must be one of auto, fp32, bf16, fp16"),
        (["--compile", "--compile-mode", "fast"], "must be one of default, reduce-overhead"),
        (["--data", "disk"], "--data must be one of synthetic, shards, memory"),
    ],
)
def test_bench_bad_input_is_a_one_line_error(args, message):
    result = runner.invoke(app, ["bench", "step", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_console_script(), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_console_script_reports_a_mistake_in_one_line_and_starts_nothing(tmp_path):
    """The installed `mae-cli` on a user's mistake: one line naming it, exit 1, no traceback
    and no MLflow run started; a bad option is click's usage error, exit 2. Every other
    mistake goes through the same entry point in tests/test_bad_input.py."""
    from tests.factory import build_project

    folder = build_project(tmp_path / "p").parent
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["pretrain"]["mask_ratio"] = 0.99
    (folder / "mask.yaml").write_text(yaml.safe_dump(raw))
    result = _cli(["pretrain", "--params", "mask.yaml"], folder)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "leaves no visible" in lines[-1], result.stderr
    assert lines[-1].startswith("mae-cli: error: ") and "Traceback" not in result.stderr
    assert not (folder / "mlruns").exists()
    runs = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_runs(["0", "1"])
    assert not [r for r in runs if r.data.tags.get("stage") == "pretrain"]
    result = _cli(["ui", "--port", "99999"], folder)
    assert result.returncode == 2 and "Invalid value for '--port'" in result.stderr


def test_bench_shard_measures_the_stage_and_its_memory(tmp_path):
    root = imagefolder(tmp_path / "raw", {"a": 6, "b": 6})
    params = project_params({"data": {"source": "imagefolder", "root": str(root)}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    args = ["bench", "shard", "--params", str(tmp_path / "p.yaml"), "--workers", "1,2", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["workers"] for r in rows] == [1, 2] and {r["images"] for r in rows} == {12}
    assert all(r["img_per_s"] > 0 and r["peak_total_rss_mb"] >= r["peak_rss_mb"] > 0 for r in rows)
    assert not (tmp_path / "data").exists()  # measured in a temporary folder


def test_bench_data_measures_this_loader_beside_plain_webdataset(tmp_path):
    shards = shard_set(tmp_path / "shards", [20, 20], size=16)
    params = project_params({"data": {"shards": str(shards)}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    args = ["bench", "data", "--params", str(tmp_path / "p.yaml"), "--workers", "0"]
    args += ["--reader", "both", "--batch-size", "8", "--images", "40", "--img-size", "12"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["reader"] for r in rows] == ["mae", "webdataset"]
    assert all(r["images"] == 40 and r["img_size"] == 12 and r["img_per_s"] > 0 for r in rows)
