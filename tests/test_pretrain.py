"""The pretrain stage with the real MLflow (a temporary SQLite store) on synthetic shards."""

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mae import MaskedAutoencoderViT
from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.stages import run_training
from pipeline.train.loop import Diverged
from tests.factory import MAE_CLI, build_project, cmd_env, project_params, run_cmd


def _runs(folder: Path):
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["test"], output_format="list")


def test_run_logs_params_metrics_artifacts_tags_and_dataset(project):
    run_id = run_training("pretrain", load_params("params.yaml"))
    assert (project / "models/pretrain/run_id").read_text().strip() == run_id
    (run,) = _runs(project)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "pretrain mask=0.75"
    params = run.data.params
    assert params["pretrain.mask_ratio"] == "0.75" and params["model.embed_dim"] == "32"
    assert float(params["pretrain.lr"]) == pytest.approx(1e-3 * 32 / 256)
    assert params["pretrain.effective_batch"] == "32" and params["pretrain.patches_kept"] == "4"
    manifest_digest = run.data.tags["data.manifest_digest"]
    assert run.data.tags["stage"] == "pretrain" and len(manifest_digest) == 64
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["idx/train"]
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(2, 15, 2))  # 180 images / 32: 5 steps an epoch, 15 in all
    artifacts = {
        a.path
        for d in ("", "model", "reconstructions", "plots")
        for a in client.list_artifacts(run_id, d or None)
    }
    assert {
        "params.json",
        "model/model.safetensors",
        "model/config.json",
        "reconstructions/epoch_003.png",
        "plots/loss.png",
    } <= artifacts
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    speed = {"img_per_s", "minutes", "data_wait"}
    assert set(metrics) == {"loss", "knn_top1", "knn_minutes", *speed}
    assert 0 <= metrics["data_wait"] < 1
    assert run.data.params["data.train_in_memory"] == "True"  # data.in_memory: auto
    waits = client.get_metric_history(run_id, "epoch/data_s")
    assert [m.step for m in waits] == [1, 2, 3] and all(m.value >= 0 for m in waits)
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        history = client.get_metric_history(run_id, name)  # with each train/loss point
        assert [m.step for m in history] == steps and all(m.value >= 0 for m in history)
    knn = client.get_metric_history(run_id, "pretrain/knn_top1")
    assert [m.step for m in knn] == [2, 3]  # every probe_every epochs, and at the end
    assert metrics["knn_top1"] == pytest.approx(knn[-1].value, abs=1e-6)
    assert 0 <= metrics["knn_top1"] <= 1
    csv_rows = (project / "plots/pretrain/knn.csv").read_text().splitlines()
    assert csv_rows[0] == "epoch,knn_top1" and len(csv_rows) == 3
    assert (project / "plots/pretrain/loss.csv").read_text().startswith("step,epoch,loss,lr")
    state = load_file(str(project / "models/pretrain/model.safetensors"))
    assert "decoder_pred.weight" in state and "patch_embed.proj.weight" in state
    assert not (project / ".checkpoints").exists() or not any((project / ".checkpoints").iterdir())


def test_same_seed_gives_the_same_losses_and_weights(tmp_path, monkeypatch):
    results = []
    for name in ("a", "b"):
        params = build_project(tmp_path / name)
        monkeypatch.chdir(params.parent)
        run_training("pretrain", load_params("params.yaml"))
        weights = load_file("models/pretrain/model.safetensors")
        curve = (params.parent / "plots/pretrain/loss.csv").read_text()
        results.append((weights, curve))
    (wa, ca), (wb, cb) = results
    assert ca == cb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_knn_probe_and_system_metrics_can_be_turned_off_and_knn_needs_a_val_split(
    tmp_path, monkeypatch
):
    params = build_project(
        tmp_path / "off",
        pretrain={"epochs": 1, "probe_every": 0},
        tracking={"system_metrics": False},
    )
    monkeypatch.chdir(params.parent)
    # MLflow's documented switch starts no second writer (mlflow#9712), here or below
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    run_id = run_training("pretrain", load_params("params.yaml"))
    assert "knn_top1" not in json.loads(Path("metrics/pretrain.json").read_text())
    (run,) = [r for r in _runs(params.parent) if r.info.run_id == run_id]
    assert "train/loss" in run.data.metrics
    assert not [m for m in run.data.metrics if m.startswith("system/")]
    assert Path("plots/pretrain/knn.csv").read_text().strip() == "epoch,knn_top1"
    params = build_project(tmp_path / "noval", data={"val_fraction": 0.0})
    monkeypatch.chdir(params.parent)
    with pytest.raises(UserError, match="the val split is empty: the k-NN probe queries it"):
        run_training("pretrain", load_params("params.yaml"))


def test_the_knn_bank_is_a_fixed_subset_of_the_train_split(project, monkeypatch):
    """`knn_bank: 64`: the first 64 train samples in shard order, the same at every probe."""
    import pipeline.stages.pretrain as stage
    from pipeline.train.runtime import resolve_runtime

    banks = []

    def spy(bank, bank_labels, *args):
        banks.append(bank_labels.tolist())
        return knn_predict(bank, bank_labels, *args)

    knn_predict = stage.knn_predict
    monkeypatch.setattr(stage, "knn_predict", spy)
    p = load_params("params.yaml")
    for size, expected in ((64, 64), (None, 180)):
        params = p.model_copy(update={"pretrain": p.pretrain.model_copy(update={"knn_bank": size})})
        trainer = stage.Pretrainer.create(params, resolve_runtime(p.runtime))
        trainer.probe.run()
        trainer.probe.run()
        assert len(banks[-1]) == expected and banks[-1] == banks[-2]
    assert banks[0] == banks[-1][:64]  # the subset is the split's first samples


def test_bad_params_fail_before_any_work(project):
    (project / "params.yaml").write_text(
        yaml.safe_dump(project_params({"pretrain": {"mask_ratio": 1.2}}))
    )
    with pytest.raises(UserError, match=r"pretrain.mask_ratio: Input should be less than 1"):
        load_params("params.yaml")
    (project / "params.yaml").write_text(
        yaml.safe_dump(project_params({"pretrain": {"epochs": 0}}))
    )
    with pytest.raises(UserError, match=r"pretrain\.epochs: Input should be greater than or"):
        load_params("params.yaml")


def test_non_finite_loss_stops_with_step_epoch_lr_and_keeps_the_last_checkpoint(
    project, monkeypatch
):
    calls = {"n": 0}
    original = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += self.training
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] > 12 else loss  # 3rd step of the 3rd epoch

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    with pytest.raises(Diverged, match=r"loss is nan at step 12 \(epoch 3, lr [0-9.e-]+\)"):
        run_training("pretrain", load_params("params.yaml"))
    kept = sorted(c.name for c in (project / ".checkpoints").glob("pretrain-*/epoch-*"))
    assert kept == ["epoch-0000", "epoch-0001"]  # epochs 1 and 2 are kept, the newest two
    (run,) = _runs(project)
    assert run.info.status == "FAILED"
    assert not (project / "models/pretrain/run_id").exists()


def test_a_resumed_run_logs_each_point_once(project, monkeypatch):
    """mlflow#4248: the epoch a resume re-runs was logged up to the failure. Its loss and
    system points, and its epoch metrics when the failure came after them (here a failed
    checkpoint), are not logged again: the history reads as one run's. `system/*` has one
    writer, at the loss's steps, with MLflow's own monitor switched on (mlflow#9712)."""
    from pipeline.train.checkpoint import Checkpoints

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    original, save = MaskedAutoencoderViT.forward_loss, Checkpoints.save
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += self.training
        return original(self, imgs, pred, mask) * (float("nan") if calls["n"] > 13 else 1)

    def full_disk(self, *args, **kwargs):
        monkeypatch.setattr(Checkpoints, "save", save)  # once
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    with pytest.raises(Diverged):  # in epoch 3, after its point at step 12
        run_training("pretrain", load_params("params.yaml"))
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", original)
    monkeypatch.setattr(Checkpoints, "save", full_disk)
    with pytest.raises(OSError):  # epoch 3 again, up to its epoch metrics and k-NN probe
        run_training("pretrain", load_params("params.yaml"))
    run_id = run_training("pretrain", load_params("params.yaml"))  # epoch 3 a third time
    client = mlflow.MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in metrics}
    assert steps["train/loss"] == [2, 4, 6, 8, 10, 12, 14]
    assert steps["epoch/loss"] == [1, 2, 3] and steps["pretrain/knn_top1"] == [2, 3]
    assert steps["system/cpu_utilization_percentage"] == steps["train/loss"]
    assert {k: sorted(set(v)) for k, v in steps.items()} == {k: sorted(v) for k, v in steps.items()}


def test_a_checkpoint_does_not_leak_into_a_run_with_other_params(project, monkeypatch, caplog):
    """Other params start afresh and say at info which key parts differ from the nearest
    checkpoints (`key.json` beside them); the device's spelling is no such part."""
    original = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += self.training
        return original(self, imgs, pred, mask) * (float("nan") if calls["n"] > 8 else 1)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    with pytest.raises(Diverged):
        run_training("pretrain", load_params("params.yaml"))
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", original)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["mask_ratio"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    (old,) = (project / ".checkpoints").glob("pretrain-*")
    assert json.loads((old / "key.json").read_text())["pretrain"]["mask_ratio"] == 0.75
    with caplog.at_level("INFO", logger="pipeline.train.checkpoint"):
        run_id = run_training("pretrain", load_params("params.yaml"))
    said = [r.getMessage() for r in caplog.records if "under another key" in r.getMessage()]
    assert said == [
        f"pretrain has checkpoints under another key ({old}), not resumed: "
        "pretrain.mask_ratio: 0.75 -> 0.5"
    ]
    runs = {r.info.run_id: r for r in _runs(project)}
    assert len(runs) == 2 and runs[run_id].data.params["pretrain.mask_ratio"] == "0.5"
    steps = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    assert min(m.step for m in steps) == 2  # started from scratch, not from the old epoch


@pytest.mark.slow
def test_killed_run_resumes_the_same_mlflow_run_and_ends_with_the_same_weights(tmp_path):
    overrides = {"pretrain": {"epochs": 6}}
    reference = build_project(tmp_path / "reference", **overrides).parent
    run_cmd(["mae-cli", "pretrain"], reference)
    killed = build_project(tmp_path / "killed", **overrides).parent
    proc = subprocess.Popen(
        [MAE_CLI, "pretrain"],
        env=cmd_env(),
        cwd=killed,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stderr:
        if "checkpoint saved" in line and "epoch-0001" in line:
            proc.send_signal(signal.SIGKILL)  # like a power loss: no clean-up runs
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (interrupted,) = _runs(killed)
    assert interrupted.info.status == "RUNNING"
    assert "resuming from" in run_cmd(["mae-cli", "pretrain"], killed)  # exits 0
    (run,) = _runs(killed)  # the same run, continued and finished
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    assert (killed / "models/pretrain/run_id").read_text().strip() == run.info.run_id
    steps = {
        m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    }
    assert steps == set(range(2, 31, 2))  # 6 epochs x 5 steps, logged every 2
    a = load_file(str(reference / "models/pretrain/model.safetensors"))
    b = load_file(str(killed / "models/pretrain/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_that_fails_writing_its_outputs_leaves_the_previous_ones_whole(
    project, monkeypatch
):
    from pipeline import reports

    run_training("pretrain", load_params("params.yaml"))
    outputs = [*sorted((project / "models/pretrain").iterdir()), project / "metrics/pretrain.json"]
    outputs += sorted((project / "plots/pretrain").iterdir())
    before = {path: path.read_bytes() for path in outputs}
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["pretrain"]["mask_ratio"] = 0.5  # another run, which fails at its very end
    (project / "params.yaml").write_text(yaml.safe_dump(raw))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports, "plot_curve", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_training("pretrain", load_params("params.yaml"))
    assert {path: path.read_bytes() for path in outputs} == before  # the previous run, whole
    assert sorted((project / "models/pretrain").iterdir()) == outputs[:4]
    assert not [p for p in project.rglob("*") if p.name.endswith((".staging", ".old"))]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_per_epoch_and_a_log_does_not(tmp_path, monkeypatch):
    params = build_project(tmp_path, pretrain={"epochs": 1, "probe_every": 1})
    monkeypatch.chdir(params.parent)
    for stderr in (_Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stderr)
        run_training("pretrain", load_params("params.yaml"))
        text = stderr.getvalue()
        if stderr.isatty():  # the epoch's steps with loss and img/s, then the k-NN features
            assert "epoch 1" in text and "loss=" in text and "img_s=" in text
            assert "features" in text
        else:
            assert "epoch 1:" not in text and "it/s" not in text and "batch/s" not in text


def test_a_run_in_a_dvc_temp_workspace_resumes_after_dvc_deletes_it(project, monkeypatch):
    """treeverse/dvc#8612: `dvc exp run --queue/--temp` runs a stage in a copy of the
    project (DVC_ROOT names the project) and deletes the copy when the run fails or is
    stopped. Checkpoints live under the project root, so a second copy resumes the run;
    DVC's own outputs stay in the copy. A second writer of the same key folder (another
    queue worker) is refused in one line naming the folder, before any epoch."""
    import fcntl
    import shutil

    original = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += self.training
        return original(self, imgs, pred, mask) * (float("nan") if calls["n"] > 8 else 1)

    def workspace(name: str) -> Path:  # what DVC copies: the repo, not .checkpoints
        copy = project.parent / name
        shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".checkpoints", "mlflow*"))
        monkeypatch.chdir(copy)
        return copy

    monkeypatch.setenv("DVC_ROOT", str(project))
    first = workspace("exp-tmp-1")
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    with pytest.raises(Diverged):
        run_training("pretrain", load_params("params.yaml"))
    (failed,) = _runs(project)  # the store: under the project root too
    assert not (first / ".checkpoints").exists()
    (folder,) = (project / ".checkpoints").glob("pretrain-*[!k]")  # not the .lock file
    assert sorted(c.name for c in folder.glob("epoch-*")) == ["epoch-0000"]
    shutil.rmtree(first)  # what DVC does with a failed temp workspace

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", original)
    second = workspace("exp-tmp-2")
    with open(folder.with_name(folder.name + ".lock"), "a") as held:  # another worker
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=rf"another process .* is training into {folder}"):
            run_training("pretrain", load_params("params.yaml"))
    run_id = run_training("pretrain", load_params("params.yaml"))
    assert run_id == failed.info.run_id  # resumed, not started afresh
    steps = mlflow.MlflowClient().get_metric_history(run_id, "epoch/loss")
    assert [m.step for m in steps] == [1, 2, 3]  # epoch 1 from the first copy, then resumed
    assert (second / "models/pretrain/run_id").read_text().strip() == run_id
    assert not (project / "models/pretrain").exists()  # DVC's outputs: in the workspace


def test_the_device_as_spelled_is_no_part_of_the_checkpoint_key(project, monkeypatch):
    """torchgeo-bench#401: a knob that cannot change results threw progress away. A run
    stopped under `runtime.device: cpu` resumes under `auto` (which resolves to the CPU
    here): the same MLflow run, its epochs logged once."""
    original = MaskedAutoencoderViT.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += self.training
        return original(self, imgs, pred, mask) * (float("nan") if calls["n"] > 8 else 1)

    params = yaml.safe_load((project / "params.yaml").read_text())
    for device in ("cpu", "auto"):
        params["runtime"]["device"] = device
        (project / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
        if device == "cpu":
            monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
            with pytest.raises(Diverged):
                run_training("pretrain", load_params("params.yaml"))
            (failed,) = _runs(project)
            monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", original)
    run_id = run_training("pretrain", load_params("params.yaml"))
    assert run_id == failed.info.run_id
    steps = mlflow.MlflowClient().get_metric_history(run_id, "epoch/loss")
    assert [m.step for m in steps] == [1, 2, 3]
