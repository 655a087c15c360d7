"""Several ranks in a real process group (gloo, CPU): the loaders split the data as the
plan says, and data-parallel pretraining follows the single-process loss curve."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pipeline.train.distributed import Dist, resolve_nproc
from tests.factory import free_port, project_params, shard_set

UNEVEN = [5, 17, 3, 11, 8, 13, 2]


def _loader_rank(rank: int, world: int, folder: str, out: str, port: int) -> None:
    import torch.distributed as dist

    from pipeline.data.loader import build_loader

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        seen = {}
        for augmentation, split in (("pretrain", "train"), ("eval", "test")):
            # no rank arguments: the loader takes them from the process group
            loader = build_loader(
                folder, split, augmentation, batch_size=4, img_size=8, num_workers=2
            )
            loader.set_epoch(1)
            seen[augmentation] = [b["key"] for b in loader]
            assert len(seen[augmentation]) == len(loader)
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def _drop_path_rank(rank: int, world: int, out: str, port: int) -> None:
    import torch.distributed as dist

    from mae import build_classifier, mae_config
    from pipeline.train.runtime import seed_everything, seed_rank

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        d = Dist(rank=rank, world_size=world)
        seed_everything(0)  # as the stages: the same initial weights on every rank
        model = build_classifier(mae_config("mae_vit_test"), 10, drop_path_rate=0.5).train()
        seed_rank(0, d)  # then each rank its own global streams
        masking = torch.Generator().manual_seed(0)  # the stages' masks and crops
        imgs = torch.ones(4, 1, 16, 16)
        drawn = {
            "weights": model.patch_embed.proj.weight.sum().item(),
            "logits": model.forward_features(imgs).flatten().tolist(),
            "masking": torch.rand(4, 16, generator=masking).flatten().tolist(),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(drawn))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_each_rank_draws_its_own_drop_path_while_masks_stay_shared(tmp_path):
    """Drop path (and Mixup) use the global streams, seeded seed + rank once the model is
    built: two ranks drop different paths of the same weights, while the generator that
    draws masks and crops for the global batch gives both ranks the same numbers."""
    mp.spawn(_drop_path_rank, args=(2, str(tmp_path), free_port()), nprocs=2)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert a["weights"] == b["weights"] and a["masking"] == b["masking"]
    assert a["logits"] != b["logits"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loaders_under_two_ranks_in_a_process_group(tmp_path):
    folder = shard_set(tmp_path / "shards", UNEVEN)
    mp.spawn(_loader_rank, args=(2, str(folder), str(tmp_path), free_port()), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = [ranks[r]["pretrain"] for r in range(2)]
    assert len(train[0]) == len(train[1]) == sum(UNEVEN) // 8  # equal steps: no hang
    keys = [k for r in train for b in r for k in b]
    assert len(keys) == len(set(keys)) and sum(UNEVEN) - len(keys) < 8
    # the two ranks' batches of a step are one global batch of the single-rank plan
    from pipeline.data.loader import build_loader

    single = build_loader(folder, "train", "pretrain", batch_size=8, img_size=8)
    single.set_epoch(1)
    for step, batch in enumerate(single):
        assert batch["key"] == train[0][step] + train[1][step]
    evaluated = [k for r in range(2) for b in ranks[r]["eval"] for k in b]
    assert sorted(evaluated) == [f"{i:08d}" for i in range(sum(UNEVEN), 2 * sum(UNEVEN))]


def test_single_process_defaults():
    d = Dist()
    assert d.main and not d.enabled and d.share(4) == slice(0, 4)
    assert d.gather("x") == ["x"] and d.broadcast(3) == 3
    assert resolve_nproc("auto", "cpu") == 1 and resolve_nproc(3, "auto") == 3
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"


def _curve(path: Path) -> list[float]:
    import csv

    with path.open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def run_one_and_two_ranks(tmp_path: Path, **runtime) -> dict:
    """Pretrain, finetune and linprobe through the CLI with 1 rank at batch 16 and with
    `runtime.nproc: 2` at batch 8; -> per nproc: curves, weights and the MLflow runs."""
    import mlflow
    from safetensors.torch import load_file

    from tests.factory import build_project, run_cmd

    results = {}
    for nproc, batch in ((1, 16), (2, 8)):
        folder = tmp_path / f"nproc{nproc}"
        build_project(
            folder,
            pretrain={"epochs": 2, "batch_size": batch, "log_every": 1},
            finetune={"epochs": 1, "batch_size": batch, "log_every": 1, "drop_path": 0.0},
            linprobe={"epochs": 2, "warmup_epochs": 1, "batch_size": batch},
            runtime={"nproc": nproc, **runtime},
        )
        for stage in ("pretrain", "finetune", "linprobe"):
            run_cmd(["mae-cli", stage], folder)
        client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        results[nproc] = {
            "pretrain": _curve(folder / "plots/pretrain/loss.csv"),
            "finetune": _curve(folder / "plots/finetune/curve.csv"),
            "weights": load_file(folder / "models/pretrain/model.safetensors"),
            "runs": {r.data.tags["stage"]: r for r in runs},
            "count": len(runs),
        }
    return results


def check_same_training(results: dict, rtol: float, atol: float) -> None:
    import numpy as np

    one, two = results[1], results[2]
    assert len(one["pretrain"]) == len(two["pretrain"]) == 2 * (180 // 16)
    np.testing.assert_allclose(two["pretrain"], one["pretrain"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(two["finetune"], one["finetune"], rtol=rtol, atol=atol)
    assert two["count"] == 3 and set(two["runs"]) == {"pretrain", "finetune", "linprobe"}
    for stage in ("pretrain", "finetune"):  # the lr follows the global batch
        a, b = one["runs"][stage].data.params, two["runs"][stage].data.params
        assert a[f"{stage}.effective_batch"] == b[f"{stage}.effective_batch"] == "16"
        assert a[f"{stage}.lr"] == b[f"{stage}.lr"]


@pytest.mark.slow
def test_two_ranks_follow_one_rank_with_the_same_global_batch(tmp_path):
    """`runtime.nproc: 2` (gloo) at batch 8 per rank vs 1 process at batch 16, same seed: the
    same pretrain and finetune loss curves, one MLflow run per stage (rank 0's)."""
    results = run_one_and_two_ranks(tmp_path)
    check_same_training(results, rtol=1e-4, atol=1e-5)
    one, two = results[1], results[2]
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-3, atol=1e-4)
    assert two["runs"]["finetune"].data.metrics["val/top1"] == pytest.approx(
        one["runs"]["finetune"].data.metrics["val/top1"]
    )


def test_a_failing_rank_stops_the_launch_with_one_line_and_a_non_zero_exit(tmp_path):
    import subprocess
    import sys

    params = {
        "data": {"shards": "nowhere"},
        "runtime": {"nproc": 2, "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(project_params(params)))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "pretrain"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors and all(
        "mae-cli: error" in line and "no shards at nowhere" in line for line in errors
    )
    assert "Traceback" not in result.stderr


def test_a_checkpoint_keeps_the_random_streams_of_every_rank(tmp_path):
    import random

    import numpy as np

    from pipeline.train.checkpoint import Checkpoints, rng_state

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    states, draws = [], []
    for seed in (1, 2):  # what ranks 0 and 1 hold when rank 0 writes the checkpoint
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        states.append(rng_state())
        draws.append((torch.rand(3).tolist(), np.random.rand(), random.random()))
    path = Checkpoints(tmp_path).save(0, model, optimizer, generator, {}, rng_states=states)
    for rank in (1, 0):
        Checkpoints(tmp_path).load(path, model, optimizer, generator, rank)
        assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == draws[rank]
