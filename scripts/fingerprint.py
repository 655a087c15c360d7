"""A fingerprint of what the stages write, to show that a refactor keeps outputs bitwise:
shards, every weight tensor, metrics and curves of a short shard -> pretrain -> finetune
-> scratch -> linprobe -> evaluate on synthetic data (CPU, fixed seed), through the CLI.

    python scripts/fingerprint.py > before.json   # on the old code
    python scripts/fingerprint.py | diff before.json -   # on the new: no output

Timings (minutes, img/s) are left out: they differ from run to run.
"""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.factory import idx_dataset, project_params

PARAMS = {
    "data": {"source": "idx", "root": "raw", "shard_max_count": 100, "workers": 0},
    "model": {"name": "mae_vit_test"},
    "pretrain": {"epochs": 2, "batch_size": 32, "log_every": 2, "probe_every": 1},
    "finetune": {"epochs": 2, "batch_size": 32, "log_every": 2, "drop_path": 0.1},
    "linprobe": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "log_every": 2},
    "runtime": {"num_workers": 0, "device": "cpu"},
    "tracking": {"experiment": "fingerprint", "uri": "sqlite:///mlflow.db"},
}
STAGES = ["shard", "pretrain", "finetune", "scratch", "linprobe", "evaluate"]
TIMINGS = {"minutes", "img_per_s", "knn_minutes", "seconds", "model_log_seconds", "data_wait"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(folder: Path) -> dict:
    out: dict = {"shards": {}, "weights": {}, "metrics": {}, "curves": {}}
    for f in sorted((folder / "data/shards").iterdir()):
        out["shards"][f.name] = sha(f.read_bytes())
    for f in sorted((folder / "models").glob("*/*.safetensors")):
        tensors = load_file(str(f))
        key = str(f.relative_to(folder / "models"))
        out["weights"][key] = {k: sha(v.numpy().tobytes()) for k, v in sorted(tensors.items())}
    for f in sorted((folder / "metrics").glob("*.json")):
        values = json.loads(f.read_text())
        out["metrics"][f.stem] = {k: v for k, v in values.items() if k not in TIMINGS}
    for f in sorted((folder / "plots").glob("*/*.csv")):
        out["curves"][str(f.relative_to(folder / "plots"))] = sha(f.read_bytes())
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        idx_dataset(folder / "raw", n_train=200, n_test=40, size=16)
        (folder / "params.yaml").write_text(yaml.safe_dump(project_params(PARAMS)))
        for stage in STAGES:
            cmd = [sys.executable, "-m", "pipeline.cli", stage]
            done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{stage} failed:\n{done.stderr[-2000:]}")
        print(json.dumps(fingerprint(folder), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
