"""The shard set's manifest.json: what the shard stage wrote (splits, shards with their
sizes, sha256 and index files, classes, mean/std, what was skipped and why)."""

from __future__ import annotations

import json

from pipeline.errors import UserError

REQUIRED = ("splits", "classes", "channels", "mean", "std")
FORMAT = 2  # 2: each shard has an index (<shard>.idx) listed in the manifest


def parse_manifest(data: bytes, where: str) -> dict:
    """manifest.json's bytes (read from `where`) -> the manifest, checked."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: not a manifest the shard stage wrote ({err})") from None
    missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{where}: not a manifest the shard stage wrote (no {missing[0]!r})")
    if manifest.get("format", FORMAT) < FORMAT:
        raise UserError(
            f"{where}: written by an older shard stage (format {manifest['format']}, no "
            "shard indexes): run `dvc repro shard` or `mae-cli shard` again"
        )
    return manifest


def skipped_count(manifest: dict) -> int:
    """Inputs the shard stage skipped (an entry may stand for a range of records)."""
    return sum(s.get("count", 1) for s in manifest["skipped"])
