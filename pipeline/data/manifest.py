"""The shard set's manifest.json: read it, and its digest, which names the exact data a
run saw."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import UserError


def manifest_digest(shards: Path | str) -> str:
    """sha256 of manifest.json: names the exact data a run saw."""
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shards} (run `mae-cli shard` or `dvc repro shard`)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no shards at {folder}: {path} is missing (run `mae-cli shard`)") from None
