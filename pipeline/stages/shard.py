"""The shard stage: the raw source -> WebDataset shards + manifest.json (`data.shard`),
and its MLflow run (source, counts per split and class, the manifest)."""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.data.manifest import skipped_count
from pipeline.data.shard import run_shard
from pipeline.data.store import shard_store
from pipeline.params import Params, flatten


def run_shard_stage(p: Params) -> dict:
    """Write the shards and log the run; -> the manifest."""
    tracking.connect(p.tracking)  # an unreachable store fails now, before the work
    manifest = run_shard(p.data)
    shards = shard_store(p.data)
    _log_run(p, manifest, shards.manifest_file(), shards.digest())
    return manifest


def _log_run(p: Params, manifest: dict, manifest_path: Path, digest: str) -> str:
    """The shard stage's run: source, counts per split and class, manifest.json."""
    experiment_id = tracking.connect(p.tracking)
    with tracking.start_run(
        experiment_id, stage="shard", digest=digest, run_name=f"shard {p.data.source}"
    ) as run:
        run.log_params({f"data.{k}": v for k, v in flatten(p.data).items()})
        counts, keys = {}, tracking.class_keys(manifest["classes"])
        for split, entry in manifest["splits"].items():
            counts[f"data/{split}/count"] = entry["count"]
            counts[f"data/{split}/shards"] = len(entry["shards"])
            for key, name in zip(keys, manifest["classes"], strict=True):
                counts[f"data/{split}/class/{key}"] = entry["per_class"].get(name, 0)
        counts["data/skipped"] = skipped_count(manifest)
        run.log_metrics(counts)
        run.log_file(manifest_path)
        run.log_dataset(manifest_path, digest, p.data.source, "source")
        return run.id
