"""finetune, linprobe and evaluate with the real MLflow on synthetic shards."""

import json

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.data.shard import run_shard
from pipeline.errors import UserError
from pipeline.params import load_params, parse_params
from pipeline.stages import run_training
from pipeline.stages.evaluate import evaluate_run, evaluate_stage
from tests.factory import bands_dataset, build_project, idx_dataset, project_params

# finetune and linprobe of the tiny project (tests.factory.TINY), its pretraining cut to 1 epoch
DOWNSTREAM = {
    "pretrain": {"epochs": 1},
    "finetune": {"epochs": 2, "batch_size": 32, "log_every": 2},
    "linprobe": {"epochs": 3, "batch_size": 32, "log_every": 2, "warmup_epochs": 1},
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A project with shards and a pretrain run, shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("project")
    build_project(folder, stages=("shard", "pretrain"), **DOWNSTREAM)
    return folder


@pytest.fixture
def project(pretrained, monkeypatch):
    monkeypatch.chdir(pretrained)
    return pretrained


def _run(run_id):
    return mlflow.get_run(run_id)


def test_finetune_is_a_child_run_that_inherits_pretrain_params_and_keeps_the_best(project):
    run_id = run_training("finetune", load_params("params.yaml"))
    run, parent_id = _run(run_id), (project / "models/pretrain/run_id").read_text().strip()
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["stage"] == "finetune"
    assert run.data.params["pretrain.mask_ratio"] == "0.75"  # inherited: a column here too
    assert run.data.params["finetune.layer_decay"] == str(
        load_params("params.yaml").finetune.layer_decay
    )
    history = mlflow.MlflowClient().get_metric_history(run_id, "val/top1")
    metrics = json.loads((project / "metrics/finetune.json").read_text())
    assert metrics["val_top1"] == pytest.approx(max(m.value for m in history), abs=1e-6)
    assert (project / "models/finetune/run_id").read_text().strip() == run_id
    config = json.loads((project / "models/finetune/config.json").read_text())
    assert config["kind"] == "finetune" and config["num_classes"] == 10


def test_linprobe_trains_only_the_head_on_cached_features(project):
    run_id = run_training("linprobe", load_params("params.yaml"))
    assert _run(run_id).data.params["linprobe.cached_features"] == "True"
    probe = load_file(str(project / "models/linprobe/model.safetensors"))
    mae = load_file(str(project / "models/pretrain/model.safetensors"))
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed"):
        assert torch.equal(probe[key], mae[key])  # the encoder is frozen
    assert "head.0.running_mean" in probe and "head.1.weight" in probe


def test_scratch_is_finetune_from_the_pretrain_stages_initial_weights(project):
    """The control differs from finetune in the encoder's starting weights alone: the
    pretrain stage's own initialisation, the same params, recipe and budget."""
    from pipeline.stages.finetune import Finetuner
    from pipeline.stages.pretrain import Pretrainer
    from pipeline.stages.scratch import ScratchFinetuner
    from pipeline.train.runtime import resolve_runtime

    p = load_params("params.yaml")
    rt = resolve_runtime(p.runtime)
    start, control, tuned = (c.create(p, rt) for c in (Pretrainer, ScratchFinetuner, Finetuner))
    initial = start.model.state_dict()
    assert control.pre.state.keys() == initial.keys()
    assert all(torch.equal(control.pre.state[k], initial[k]) for k in initial)
    assert control.pre.run_id is None and control.section == tuned.section == p.finetune
    assert control.loop.steps_per_epoch == tuned.loop.steps_per_epoch
    # AdamW betas: (0.9, 0.999) to fine-tune, as the paper's Table 9; (0.9, 0.95) to pretrain
    assert tuned.optimizer.defaults["betas"] == control.optimizer.defaults["betas"] == (0.9, 0.999)
    assert start.optimizer.defaults["betas"] == (0.9, 0.95)

    run_id = run_training("scratch", p)
    run = _run(run_id)
    assert run.data.tags["stage"] == "scratch" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.params["pretrain.run_id"] == "none (random init)"
    assert (
        run.data.params["model.embed_dim"] == "32" and run.info.run_name == "scratch (random init)"
    )
    assert (project / "models/scratch/run_id").read_text().strip() == run_id
    assert json.loads((project / "models/scratch/config.json").read_text())["kind"] == "scratch"


def test_evaluate_logs_to_the_run_and_its_parent(project):
    run_training("finetune", load_params("params.yaml"))
    run_training("linprobe", load_params("params.yaml"))
    scratch_id = run_training("scratch", load_params("params.yaml"))
    pixels_id = run_training("pixels", load_params("params.yaml"))
    results = evaluate_stage(load_params("params.yaml"))
    stages = ("finetune", "linprobe", "scratch", "pixels")
    assert [r["stage"] for r in results] == list(stages)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    gains = {"mae_gain", "probe_gain"}
    assert set(metrics) == {f"{s}_{k}" for s in stages for k in ("top1", "top5")} | gains
    finetune, linprobe, scratch, pixels = results
    assert metrics["mae_gain"] == pytest.approx(finetune["top1"] - scratch["top1"], abs=1e-6)
    assert metrics["probe_gain"] == pytest.approx(linprobe["top1"] - pixels["top1"], abs=1e-6)
    assert _run(pixels_id).data.params["pixels.features"] == str(16 * 16)  # 1 x 16 x 16 px
    assert "pixels.pool" not in _run(pixels_id).data.params
    for stage in ("linprobe", "pixels"):  # one grid for the probe and its control
        grid = json.loads((project / "models" / stage / "grid.json").read_text())
        assert [(g["blr"], g["weight_decay"]) for g in grid] == [
            (1.0, 0.0), (1.0, 1e-4), (3.0, 0.0), (3.0, 1e-4)
        ]  # fmt: skip
        best = max(grid, key=lambda g: g["val_top1"])
        chosen = json.loads((project / "metrics" / f"{stage}.json").read_text())
        assert (chosen["blr"], chosen["weight_decay"]) == (best["blr"], best["weight_decay"])
    assert finetune["count"] == 40 and sum(map(sum, finetune["confusion"])) == 40
    run, parent = _run(finetune["run_id"]), _run(finetune["parent_run_id"])
    assert run.data.metrics["test/top1"] == pytest.approx(finetune["top1"])
    assert "test/acc/0_0" in run.data.metrics  # class 0, named "0"
    assert parent.data.metrics["finetune/test_top1"] == pytest.approx(finetune["top1"])
    assert parent.data.metrics["scratch/test_top1"] == pytest.approx(scratch["top1"])
    assert parent.data.metrics["mae_gain"] == pytest.approx(finetune["mae_gain"])
    assert parent.data.tags["scratch.run_id"] == scratch_id == scratch["run_id"]
    assert parent.data.metrics["probe_gain"] == pytest.approx(linprobe["probe_gain"])
    assert parent.data.tags["pixels.run_id"] == pixels_id
    # a pretrain run's id evaluates its children and the control it names, gain included
    again_all = evaluate_run(load_params("params.yaml"), finetune["parent_run_id"])
    assert {r["stage"] for r in again_all} == set(stages)
    assert next(r for r in again_all if r["stage"] == "finetune")["mae_gain"] == pytest.approx(
        finetune["mae_gain"]
    )
    artifacts = [
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")
    ]
    assert artifacts == ["evaluation/confusion_matrix.png"]
    again = evaluate_run(load_params("params.yaml"), finetune["run_id"])
    assert again[0]["top1"] == finetune["top1"]  # the same code path, the same numbers


def test_evaluate_bad_run_ids_are_one_line_errors(project):
    p = load_params("params.yaml")
    with pytest.raises(UserError, match="no MLflow run 0123456789abcdef in sqlite:///"):
        evaluate_run(p, "0123456789abcdef")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("test").experiment_id
    empty = client.create_run(experiment, tags={"stage": "finetune"}).info.run_id
    with pytest.raises(UserError, match=f"run {empty} has no model"):
        evaluate_run(p, empty)
    lonely = client.create_run(experiment, tags={"stage": "pretrain"}).info.run_id
    with pytest.raises(UserError, match=f"pretrain run {lonely} has no finetune or linprobe"):
        evaluate_run(p, lonely)


def test_evaluate_refuses_shards_of_another_dataset(project, tmp_path):
    run_id = run_training("finetune", load_params("params.yaml"))
    idx_dataset(tmp_path / "raw", n_train=100, n_test=20, size=16, seed=7)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(root=str(tmp_path / "raw"), shards=str(tmp_path / "shards"))
    other = tmp_path / "params.yaml"
    other.write_text(yaml.safe_dump(project_params(params)))
    run_shard(load_params(other).data)
    with pytest.raises(UserError, match=f"run {run_id} was trained on other shards"):
        evaluate_run(load_params(other), run_id)


def test_downstream_needs_the_pretrained_model(tmp_path, monkeypatch):
    build_project(tmp_path, **DOWNSTREAM)  # shards, and no pretrain run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no pretrained model: models/pretrain/config.json"):
        run_training("finetune", load_params("params.yaml"))


def _cut_power_in_epoch(p, monkeypatch, epoch: int) -> None:
    """Run finetune, failing at validation in `epoch` (after the previous checkpoints)."""
    from pipeline.stages.finetune import Finetuner

    calls = {"n": 0}
    validate = Finetuner.validate

    def power_cut(self):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise RuntimeError("power cut")
        return validate(self)

    monkeypatch.setattr(Finetuner, "validate", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        run_training("finetune", p)
    monkeypatch.setattr(Finetuner, "validate", validate)


def test_an_interrupted_finetune_resumes_its_run_and_ends_as_if_uninterrupted(project, monkeypatch):

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["finetune"] = {**raw["finetune"], "epochs": 3}
    (project / "params-3.yaml").write_text(yaml.safe_dump(project_params(raw)))
    p = load_params("params-3.yaml")
    reference = run_training("finetune", p)
    expected = load_file(str(project / "models/finetune/model.safetensors"))
    expected_curve = [
        m.value for m in mlflow.MlflowClient().get_metric_history(reference, "epoch/loss")
    ]

    _cut_power_in_epoch(p, monkeypatch, 2)  # after epoch 1's checkpoint
    (checkpoint,) = (project / ".checkpoints").glob("finetune-*/epoch-*")
    assert checkpoint.name == "epoch-0000"
    client = mlflow.MlflowClient()
    (interrupted,) = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id],
        "attributes.status = 'FAILED' and tags.stage = 'finetune'",
    )
    resumed = run_training("finetune", p)
    assert resumed == interrupted.info.run_id and _run(resumed).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed, "epoch/loss")
    assert [m.step for m in history] == [1, 2, 3]  # epoch 2 logged once, by the resumed run
    assert [m.value for m in history] == expected_curve
    got = load_file(str(project / "models/finetune/model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not list((project / ".checkpoints").glob("finetune-*/epoch-*"))


def test_fine_tuning_learns_what_is_learnable(tmp_path, monkeypatch):
    """On images whose class is where a bright square lies (4 classes), a few fine-tuning
    epochs from a random encoder reach a test top-1 far above chance (25 %): the stage,
    its loader and its evaluation do learn. Uniform noise could not show this."""
    build_project(
        tmp_path,
        dataset=lambda raw: bands_dataset(raw, n_train=640, n_test=200),
        data={"class_names": ["0", "1", "2", "3"]},
        finetune={"epochs": 8, "batch_size": 32, "blr": 2e-2, "scale_min": 1.0, "drop_path": 0},
    )
    monkeypatch.chdir(tmp_path)
    (result,) = evaluate_run(
        load_params("params.yaml"), run_training("scratch", load_params("params.yaml"))
    )
    assert result["count"] == 200
    assert result["top1"] >= 0.6, result["confusion"]  # 0.745 when written


def test_the_pixels_control_learns_what_pixels_show_and_nothing_from_noise(tmp_path, monkeypatch):
    """The probe's head on raw pixels: where a bright square's place is the class, it
    learns it; on the same images with labels drawn at random, it stays near chance (25 %):
    a control that cannot fail would say nothing about the probe beside it."""
    results = {}
    for name, shuffled in (("bands", False), ("noise", True)):
        folder = tmp_path / name
        build_project(
            folder,
            dataset=lambda raw, s=shuffled: bands_dataset(raw, n_train=640, n_test=200, shuffled=s),
            data={"class_names": ["0", "1", "2", "3"]},
            linprobe={
                "epochs": 10,
                "batch_size": 64,
                "warmup_epochs": 1,
                "min_steps": 0,
                "grid_blr": [1e-5, 3.0],
                "grid_weight_decay": [0.0],
            },
        )
        monkeypatch.chdir(folder)
        p = load_params("params.yaml")
        run_id = run_training("pixels", p)
        (results[name],) = evaluate_run(p, run_id)
    assert results["bands"]["top1"] >= 0.8, results["bands"]["confusion"]
    assert results["noise"]["top1"] <= 0.4, results["noise"]["confusion"]
    # the grid on val: an lr that learns nothing loses to one that does, and is reported
    grid = json.loads((folder.parent / "bands/models/pixels/grid.json").read_text())
    assert [g["blr"] for g in grid] == [1e-5, 3.0] and grid[0]["val_top1"] < grid[1]["val_top1"]
    bands = mlflow.get_run((folder.parent / "bands/models/pixels/run_id").read_text().strip())
    assert bands.data.params["pixels.chosen_blr"] == "3.0"


def test_an_unreadable_checkpoint_is_skipped_for_the_one_before_it(project, monkeypatch, caplog):

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["finetune"] = {**raw["finetune"], "epochs": 3}
    (project / "params-3.yaml").write_text(yaml.safe_dump(project_params(raw)))
    p = load_params("params-3.yaml")
    run_training("finetune", p)
    expected = load_file(str(project / "models/finetune/model.safetensors"))

    _cut_power_in_epoch(p, monkeypatch, 3)  # after the checkpoints of epochs 1 and 2
    kept = sorted((project / ".checkpoints").glob("finetune-*/epoch-*"))
    assert [c.name for c in kept] == ["epoch-0000", "epoch-0001"]
    state = kept[-1] / "state.json"
    state.write_text(state.read_text()[:100])  # the newest cut short, as by a full disk
    run_training("finetune", p)
    assert f"{kept[-1].parent.name}/epoch-0001 cannot be read (Unterminated" in caplog.text
    got = load_file(str(project / "models/finetune/model.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # as if uninterrupted


def test_cached_features_keep_every_row_in_order_across_buffers(monkeypatch):
    from pipeline.train.eval import RowBuffer

    monkeypatch.setattr(RowBuffer, "BYTES", 3 * 2 * 4)  # three rows of two float32 per buffer
    rows, parts = RowBuffer(), [torch.randn(n, 2) for n in (2, 5, 0, 1)]
    for part in parts:
        rows.add(part)
    assert torch.equal(rows.tensor(), torch.cat(parts)) and len(rows.full) == 2
    assert RowBuffer().tensor().numel() == 0


def test_a_schedule_too_short_to_learn_is_named_before_the_work_starts(
    tmp_path, monkeypatch, caplog
):
    """The defaults, sized for Fashion-MNIST's 54,000 images, on ~1,300 images: fine-tuning
    was a handful of optimizer steps and ended at chance, without a word. Now its epochs
    are raised to `finetune.min_steps` (said at info); with that rule off, a warning."""
    from pipeline.data.shard import run_shard
    from pipeline.params import parse_params
    from pipeline.stages.pretrain import Pretrainer
    from pipeline.stages.scratch import ScratchFinetuner
    from pipeline.train.runtime import resolve_runtime
    from tests.factory import idx_dataset, project_params

    idx_dataset(tmp_path / "raw", n_train=1_300, n_test=100, size=28)
    monkeypatch.chdir(tmp_path)
    raw = project_params({"data": {"source": "idx", "root": "raw", "workers": 0},
                          "runtime": {"device": "cpu", "num_workers": 0}})  # fmt: skip
    p = parse_params(raw)
    run_shard(p.data)
    with caplog.at_level("INFO", logger="pipeline.train.stage"):
        raised = ScratchFinetuner.create(p, resolve_runtime(p.runtime))
    assert (
        "scratch: 1170 train images: batch 256 -> 256, epochs 2 -> 50 (finetune.min_steps 200)"
        in caplog.text
    )
    assert (raised.section.epochs, raised.section.warmup_epochs) == (50, 12.5)
    assert raised.given.epochs == 2 and "optimizer steps in all" not in caplog.text
    big = parse_params(project_params({**raw, "finetune": {"batch_size": 4096, "mixup": 0.8}}))
    capped = ScratchFinetuner.create(big, resolve_runtime(big.runtime))  # mixup: even
    assert (capped.section.batch_size, capped.section.epochs) == (1170, 200)
    assert capped.lr == pytest.approx(big.finetune.blr * 1170 / 256)
    caplog.clear()
    raw = project_params({**raw, "finetune": {"min_steps": 0}})
    p = parse_params(raw)
    with caplog.at_level("WARNING", logger="pipeline.train.stage"):
        ScratchFinetuner.create(p, resolve_runtime(p.runtime))
        Pretrainer.create(p, resolve_runtime(p.runtime))
    assert (
        "scratch: 8 optimizer steps in all (2 epochs of 4 at an effective batch of 256): "
        "too few to learn much; raise finetune.epochs (or lower finetune.batch_size)"
    ) in caplog.text
    assert "pretrain: 28 optimizer steps in all" in caplog.text
    caplog.clear()
    enough = project_params({**raw, "finetune": {"batch_size": 16, "epochs": 3}})
    p = parse_params(enough)
    with caplog.at_level("WARNING", logger="pipeline.train.stage"):
        ScratchFinetuner.create(p, resolve_runtime(p.runtime))  # 73 steps x 3 = 219
    assert "optimizer steps in all" not in caplog.text


@pytest.mark.parametrize("k", [0, 1])
def test_partial_fine_tuning_trains_the_last_blocks_norm_and_head_alone(project, k):
    """`finetune.trainable_blocks` k (the paper's Figure 9): after an epoch of steps the
    frozen weights are bitwise unchanged, got no gradient and hold no optimizer state;
    the last k blocks, the final norm and the head moved. Scratch trains every block."""
    from pipeline.stages.finetune import Finetuner
    from pipeline.stages.scratch import ScratchFinetuner
    from pipeline.tracking import NullRun
    from pipeline.train.runtime import resolve_runtime

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["finetune"]["trainable_blocks"] = k
    p = parse_params(raw)
    s = Finetuner.create(p, resolve_runtime(p.runtime))
    before = {n: x.detach().clone() for n, x in s.model.named_parameters()}
    s.fit(0, NullRun())  # an epoch: 5 optimizer steps
    depth = len(s.model.blocks)
    trains = (*(f"blocks.{i}." for i in range(depth - k, depth)), "fc_norm.", "head.")
    for name, x in s.model.named_parameters():
        if name.startswith(trains):
            assert x.requires_grad and x in s.optimizer.state, name
        else:
            assert x.grad is None and x not in s.optimizer.state, name
            assert torch.equal(x, before[name]), name
    assert not torch.equal(s.model.head.weight, before["head.weight"])
    assert all(not b.training for b in s.model.blocks[: depth - k])  # no drop path there
    control = ScratchFinetuner.create(p, resolve_runtime(p.runtime))
    assert all(x.requires_grad for x in control.model.parameters())
    assert control.section.trainable_blocks is None
