"""The paper's ablations as params of the existing stages, end to end on the tiny project:
block masking, a deeper decoder, partial fine-tuning; each run named by what it changes
from the committed params.yaml, so a sweep's runs tell themselves apart in MLflow."""

import subprocess

import mlflow
import yaml
from safetensors.torch import load_file

from pipeline import settings
from pipeline.params import load_params
from pipeline.stages import run_training


def _commit(folder):
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "p",
         "--allow-empty"],
        ["git", "add", "params.yaml"],
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "p"],
    ):  # fmt: skip
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True)


def test_ablation_runs_are_named_by_what_they_change(project, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    _commit(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["pretrain"].update(epochs=1, mask_type="block")
    raw["model"]["decoder_depth"] = 1
    raw["finetune"].update(epochs=1, batch_size=32, trainable_blocks=1)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    assert settings.changed({"finetune.trainable_blocks": 1, "finetune.log_every": 3}) == {
        "finetune.trainable_blocks": 1  # log_every is no setting
    }

    p = load_params("params.yaml")
    pretrain = mlflow.get_run(run_training("pretrain", p))
    assert pretrain.info.run_name == (
        "pretrain mask=0.75 epochs=1 mask_type=block model.decoder_depth=1"
    )
    assert pretrain.data.params["model.decoder_depth"] == "1"
    weights = load_file("models/pretrain/model.safetensors")
    assert not any(k.startswith("decoder_blocks.1.") for k in weights)  # one decoder block
    finetune = mlflow.get_run(run_training("finetune", p))
    assert finetune.info.run_name == (
        "finetune mask=0.75 epochs=1 batch_size=32 trainable_blocks=1 "
        "model.decoder_depth=1 pretrain.epochs=1 pretrain.mask_type=block"
    )
    assert int(finetune.data.params["finetune.trainable_parameters"]) < sum(
        v.numel() for k, v in load_file("models/finetune/model.safetensors").items()
    )
    scratch = mlflow.get_run(run_training("scratch", p))  # every block: no trainable_blocks
    assert scratch.info.run_name == "scratch (random init) epochs=1 batch_size=32"


def test_outside_git_a_run_is_named_by_its_mask_ratio_alone(project):
    assert settings.baseline() is None and settings.changed({"pretrain.epochs": 9}) == {}
    run = mlflow.get_run(run_training("pretrain", load_params("params.yaml")))
    assert run.info.run_name == "pretrain mask=0.75"
