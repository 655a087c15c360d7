"""Where a shard set lives: a local folder, or a URL whose files are fetched whole into a
local cache before they are read.

`data.shards` is a folder or a URL: `http(s)://`, `s3://`, `gs://` and whatever else
fsspec opens (`s3fs`, `gcsfs` are the `s3`, `gcs` extras), or `pipe:CMD` with `{name}`
where each file's name goes (`pipe:aws s3 cp s3://bucket/fmnist/{name} -`), as WebDataset
users write. A remote file is stored in `data.cache` under its manifest sha256 (two URLs
of one shard share it), hashed while it streams in and renamed into place only when size
and sha256 match: a reader never sees a partial or wrong file, and a cut connection is
retried, never read short. The ranks and workers of a machine share the cache: a lock per
file lets one fetch while the others wait. The least recently used files go when the
cache passes `data.cache_max_gb`; a reader keeps what it has open, so that never cuts a
read short.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import fetch
from pipeline.data.manifest import parse_manifest
from pipeline.data.tarindex import ShardIndex, read_index
from pipeline.errors import UserError
from pipeline.params import DataParams, project_root

log = logging.getLogger(__name__)
STALE_PART_S = 600  # a partial download untouched this long was left by a killed process
_MANIFESTS: dict[str, bytes] = {}  # remote manifest.json per location, once per process
_VERIFIED: dict[tuple[str, int, int], str] = {}  # local (path, size, mtime_ns) -> its sha256


def is_url(location: str) -> bool:
    return location.startswith("pipe:") or "://" in location


@dataclass(frozen=True)
class ShardStore:
    location: str  # a folder, a URL or a pipe: command
    cache: Path | None = None  # where remote files are kept (data.cache); None: local only
    cache_bytes: float = float("inf")

    def __post_init__(self) -> None:
        if self.location.startswith("pipe:") and "{name}" not in self.location:
            raise UserError(
                f"data.shards: a pipe: command needs {{name}} where each file's name goes, "
                f"e.g. 'pipe:aws s3 cp s3://bucket/shards/{{name}} -' (got {self.location!r})"
            )

    @property
    def remote(self) -> bool:
        return is_url(self.location)

    def url(self, name: str) -> str:
        if self.location.startswith("pipe:"):
            return self.location.replace("{name}", shlex.quote(name))
        return f"{self.location.rstrip('/')}/{name}"

    # -------------------------------------------------------------- the manifest
    def manifest_bytes(self) -> bytes:
        if not self.remote:
            path = Path(self.location) / "manifest.json"
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise UserError(
                    f"no shards at {self.location}: {path} is missing "
                    "(run `mae-cli shard` or `dvc repro shard`)"
                ) from None
        if self.location not in _MANIFESTS:
            _MANIFESTS[self.location] = fetch.with_retries(
                self.url("manifest.json"), fetch.read_all
            )
        return _MANIFESTS[self.location]

    def manifest(self) -> dict:
        return parse_manifest(self.manifest_bytes(), self.url("manifest.json"))

    def digest(self) -> str:
        """sha256 of manifest.json: names the exact data a run saw."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()

    def manifest_file(self) -> Path:
        """manifest.json as a local file (for MLflow): a copy in the cache when remote."""
        if not self.remote:
            return Path(self.location) / "manifest.json"
        path = self.cache / "manifests" / f"{self.digest()}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.part")
            tmp.write_bytes(self.manifest_bytes())
            tmp.replace(path)
        return path

    # -------------------------------------------------------------- files
    def path(self, entry: dict) -> Path:
        """The local file of a manifest entry (a shard or its index): fetched into the cache
        and checked first when the store is remote; present and of its size when local."""
        if self.remote:
            return self._fetch(entry)
        path = Path(self.location) / entry["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"shard listed in the manifest is missing: {path}") from None
        if "bytes" in entry and size != entry["bytes"]:
            raise UserError(
                f"{path}: {size:,} bytes, the manifest says {entry['bytes']:,}: not the "
                "file the shard stage wrote (run `dvc repro shard` or `dvc checkout`)"
            )
        return path

    def open(self, entry: dict) -> int:
        """A read-only descriptor of an entry's local file; once open, the file outlives
        its removal from the cache."""
        try:
            return os.open(self.path(entry), os.O_RDONLY)
        except FileNotFoundError:  # removed by another process between fetch and open
            if not self.remote:
                raise
            return os.open(self.path(entry), os.O_RDONLY)

    def verify(self, entries: list[dict]) -> None:
        """Local files against their sha256 (once per file and modification time in this
        process); remote ones are checked as they are fetched. A swapped, altered or cut
        shard fails here, named, before any sample of it is read."""
        if self.remote:
            return
        for entry in entries:
            path = self.path(entry)
            st = path.stat()
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

    def index(self, entries: list[dict]) -> ShardIndex:
        """A split's index from its shards' .idx files (fetched 8 at a time when remote)."""
        missing = [e["name"] for e in entries if "index" not in e]
        if missing:
            raise UserError(
                f"{self.url(missing[0])}: no index in the manifest (run the shard stage again)"
            )
        indexes = [e["index"] for e in entries]
        self.verify(indexes)
        with ThreadPoolExecutor(8 if self.remote else 1) as pool:
            files = list(pool.map(self.path, indexes))
        return read_index(files, [e["count"] for e in entries])

    # -------------------------------------------------------------- the cache
    def _fetch(self, entry: dict) -> Path:
        if self.cache is None:
            raise ValueError(f"a ShardStore for {self.location} needs a cache folder")
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
            raise UserError(f"{self.url('manifest.json')}: {entry['name']} has no valid sha256")
        dest = self.cache / f"{entry['sha256']}{Path(entry['name']).suffix}"
        if _touch(dest):
            return dest
        self.cache.mkdir(parents=True, exist_ok=True)
        with _locked(self.cache / f".{dest.name}.lock"):
            if _touch(dest):  # fetched by another rank or worker while this one waited
                return dest
            url = self.url(entry["name"])
            fetch.with_retries(url, lambda u: fetch.download(u, dest, entry))
        self._evict(keep=dest)
        return dest

    def _evict(self, keep: Path) -> None:
        """Least recently used files first, until the cache fits its bound again."""
        files, total, now = [], 0, time.time()
        for path in self.cache.iterdir():
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                if path.name.endswith(".part") and now - st.st_mtime > STALE_PART_S:
                    path.unlink(missing_ok=True)
                    continue
                if path.name.endswith(".part") or path == keep:  # being fetched, or just was
                    total += st.st_size
                elif path.suffix in (".tar", ".idx"):
                    files.append((st.st_mtime, st.st_size, path))
                    total += st.st_size
        for _, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            log.debug("shard cache: removed %s", path.name)


def shard_store(data: DataParams) -> ShardStore:
    """The store of `data.shards`, its cache where params.yaml says."""
    cache = Path(data.cache)
    cache = cache if cache.is_absolute() else project_root() / cache
    return ShardStore(data.shards, cache, data.cache_max_gb * 1e9)


def as_store(shards: ShardStore | Path | str) -> ShardStore:
    return shards if isinstance(shards, ShardStore) else ShardStore(str(shards))


def _touch(path: Path) -> bool:
    """Mark `path` as used now (the cache removes the least recently used); False if absent."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
