"""What `dvc repro` removes before a stage runs, kept for a stage that then fails.

DVC deletes a stage's outputs before its command starts (they stay in its cache, and
`dvc checkout <stage>` brings them back), so a stage that failed under `dvc repro` or
`dvc exp run`, even on a params mistake found before any work, used to leave none. Under
DVC (which names the stage in `DVC_STAGE`), each stage's outputs, once in place whole,
are also linked (hard links: no copy) into `.dvc/tmp/mae-kept/<stage>/`; when the stage
fails, `put_back` links back those of them that are missing: the previous outputs, whole.
A stage killed outright (`kill -9`) cannot put them back: `dvc checkout <stage>` then.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

KEPT = Path(".dvc/tmp/mae-kept")  # in the workspace DVC runs the stage in


def _folder() -> Path | None:
    stage = os.environ.get("DVC_STAGE")
    if not stage or not Path(".dvc").is_dir():
        return None
    return KEPT / stage.replace("/", "_").replace(":", "_")


def keep(*outputs: Path) -> None:
    """After a stage put `outputs` (files or folders, relative to the workspace) in place."""
    folder = _folder()
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    for i, path in enumerate(outputs):
        if path.exists():
            _link(path, folder / str(i))
    (folder / "outputs.json").write_text(json.dumps([str(p) for p in outputs]))


def put_back() -> list[str] | None:
    """The kept outputs of the stage DVC runs that are missing now, put back; -> them
    (None: none kept, e.g. before the stage's first success under DVC)."""
    folder = _folder()
    if folder is None or not (folder / "outputs.json").is_file():
        return None
    back = []
    for i, name in enumerate(json.loads((folder / "outputs.json").read_text())):
        kept, path = folder / str(i), Path(name)
        files = [f for f in kept.rglob("*") if f.is_file()] if kept.is_dir() else [kept]
        missing = [(f, path / f.relative_to(kept)) for f in files if f.exists()]
        missing = [(f, to) for f, to in missing if not to.exists()]  # DVC removes files of
        for f, to in missing:  # a folder it lists, or the files it lists in a folder
            _link(f, to)
        if missing:
            back.append(name)
    return back


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
