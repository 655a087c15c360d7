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


REQUIRED = ("splits", "classes", "channels", "mean", "std")


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no shards at {folder}: {path} is missing (run `mae-cli shard`)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a manifest the shard stage wrote ({err})") from None
    missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise UserError(f"{path}: not a manifest the shard stage wrote (no {missing[0]!r})")
    return manifest


def skipped_count(manifest: dict) -> int:
    """Inputs the shard stage skipped (an entry may stand for a range of records)."""
    return sum(s.get("count", 1) for s in manifest["skipped"])


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> its checked sha256


def verify_shards(folder: Path | str, entries: list[dict]) -> None:
    """Each shard against its manifest entry: present, its size, then its sha256 (read once
    per file and modification time in this process). A swapped, altered or cut shard fails
    here, named, before any sample of it is read."""
    for entry in entries:
        path = Path(folder) / entry["name"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UserError(f"shard listed in the manifest is missing: {path}") from None
        if "bytes" in entry and st.st_size != entry["bytes"]:
            raise UserError(
                f"{path}: {st.st_size:,} bytes, the manifest says {entry['bytes']:,}: not "
                "the shard the shard stage wrote (run `dvc repro shard` or `dvc checkout`)"
            )
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if "sha256" not in entry or _VERIFIED.get(key) == entry["sha256"]:
            continue
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise UserError(
                f"{path}: its sha256 ({digest[:12]}...) is not the manifest's "
                f"({entry['sha256'][:12]}...): not the shard the shard stage wrote "
                "(run `dvc repro shard` or `dvc checkout`)"
            )
        _VERIFIED[key] = digest
