"""Which code a run ran: a digest of the code files as they were imported, and whether they
differ from the commit the run is tagged with (mlflow#1912: a run of uncommitted edits
tagged with HEAD's commit reads as that commit's code).

The code is every `*.py` under `mae/` and `pipeline/` of the imported packages (new files
that git does not track yet included) and the project's `dvc.yaml`. Its digest is a
sha256 over each file's path and git blob id, so the digest of a commit's code comes from
`git ls-tree` alone, without reading a file back.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pipeline

CODE_DIRS = ("mae", "pipeline")
STAGES_FILE = "dvc.yaml"


def code_root() -> Path:
    """The folder that holds the imported `mae` and `pipeline` packages (the checkout, for
    the project's editable install; a queued DVC experiment imports from it too)."""
    return Path(pipeline.__file__).resolve().parents[1]


def _blob_id(data: bytes) -> str:
    """git's object id of a file's bytes (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _digest(entries: dict[str, str]) -> str:
    h = hashlib.sha256()
    for path in sorted(entries):
        h.update(f"{path}\0{entries[path]}\n".encode())
    return h.hexdigest()


def _is_code(path: str) -> bool:
    first = path.split("/", 1)[0]
    return path == STAGES_FILE or (first in CODE_DIRS and path.endswith(".py"))


def running_digest(root: Path, stages_file: Path | None = None) -> str:
    """The digest of the code under `root` as it is on disk now; `stages_file`: the
    dvc.yaml the stages run from (default: `root`'s)."""
    entries = {}
    for folder in CODE_DIRS:
        for path in (root / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                entries[path.relative_to(root).as_posix()] = _blob_id(path.read_bytes())
    stages = stages_file or root / STAGES_FILE
    if stages.is_file():
        entries[STAGES_FILE] = _blob_id(stages.read_bytes())
    return _digest(entries)


def committed_digest(root: Path, commit: str) -> str | None:
    """The digest of the same files at `commit` in `root`'s git; None where git cannot tell
    (no git, not a checkout, a commit this clone lacks)."""
    try:
        out = subprocess.run(
            ["git", "ls-tree", "-r", "-z", "--full-tree", commit, "--", *CODE_DIRS, STAGES_FILE],
            cwd=root,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    entries = {}
    for item in out.stdout.decode(errors="surrogateescape").split("\0"):
        meta, _, path = item.partition("\t")
        if path and _is_code(path) and meta.split(" ")[1:2] == ["blob"]:
            entries[path] = meta.split(" ")[2]
    return _digest(entries)


def code_tags(commit: str | None, stages_file: Path | None = None) -> dict[str, str | None]:
    """The run's code tags: `code.digest` (what ran) and `git.dirty` ("true" when it is not
    `commit`'s code, "false" when it is, None when git cannot tell)."""
    root = code_root()
    digest = running_digest(root, stages_file)
    committed = committed_digest(root, commit) if commit else None
    dirty = None if committed is None else str(committed != digest).lower()
    return {"code.digest": digest, "git.dirty": dirty}
