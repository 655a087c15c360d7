"""An ImageFolder's listing: a small file that `dvc status` hashes instead of the folder.

With `data.root` a folder, the shard stage's DVC dependency is that folder, and every
`dvc status`, `repro` and `exp run` walks it (treeverse/dvc#7681). Measured on a
100,000-image folder (1.4 GB; `python scripts/make_imagefolder.py`, this 2-core machine,
2026-12-04, DVC 3.67): `dvc status` 2.6 s against 0.45 s without it, 17 s the first
time (nothing cached), and ~20 s added to every `dvc exp run --temp` or queued
experiment, whose new workspace hashes it again (a `dvc add`-ed folder is slower: 5.9 s
and 37 s).

`mae-cli list-images ROOT OUT` writes what the shard stage would list there (every
image with its class, size and mtime, every bad input with its reason) into OUT; with
`data.root: OUT`, DVC hashes that file alone. The trade-off: DVC no longer sees an edit
of the folder. The shard stage checks each listed image's size and mtime and refuses,
in one line naming the file, one that changed or went missing since; an image *added*
to the folder is not seen until the listing is written again. Re-run `mae-cli
list-images` after changing the folder. The shards and manifest are byte for byte those
of the folder itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.imagefolder import list_imagefolder
from pipeline.data.sources import Input, Skipped, SourceListing
from pipeline.errors import UserError
from pipeline.params import workspace_path

FORMAT = "mae-imagefolder-listing/1"


def write_listing(root: Path, out: Path) -> dict[str, int]:
    """List the ImageFolder at `root` into `out` (JSON, written whole by one rename);
    -> images per source split. Bad inputs are recorded, for the shard stage's
    `data.on_bad_input` to fail on or skip."""
    listing = list_imagefolder(root, on_bad_input="skip")
    splits = {
        split: [[x.ref, x.label, *_stamp(Path(x.ref))] for x in inputs]
        for split, inputs in listing.splits.items()
    }
    doc = {
        "format": FORMAT,
        "root": str(root),
        "classes": listing.classes,
        "splits": splits,
        "bad": [[b.split, b.input, b.reason] for b in listing.bad],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=0, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return {split: len(v) for split, v in splits.items()}


def read_listing(path: Path, on_bad_input: str) -> SourceListing:
    """The ImageFolder listed in `path`, as `list_imagefolder` lists the folder. Raises
    UserError for a file that is no listing, and for an image whose size or mtime is not
    the listing's (or that is gone): the listing is stale."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(
            f"data.root: {path} is a file but no listing `mae-cli list-images` wrote ({err})"
        ) from None
    workspace_path(f"data.root ({path}'s folder)", doc["root"])  # under dvc exp --temp
    listing = SourceListing(doc["classes"], {}, description={"root": doc["root"]})
    for split, name, reason in doc["bad"]:
        if on_bad_input == "fail":
            raise UserError(f"{name}: {reason}")
        listing.bad.append(Skipped(split, name, reason))
    for split, rows in doc["splits"].items():
        for ref, _, size, mtime in rows:
            if (stamp := _stamp(Path(ref))) != (size, mtime):
                what = "gone" if stamp == (-1, -1) else "changed (size or mtime)"
                raise UserError(
                    f"{ref}: {what} since {path} was written: "
                    f"re-run `mae-cli list-images {doc['root']} {path}`"
                )
        listing.splits[split] = [
            Input(split, i, label, ref, ref) for i, (ref, label, _, _) in enumerate(rows)
        ]
    return listing


def _stamp(path: Path) -> tuple[int, int]:
    """(size in bytes, mtime in ns); (-1, -1) for a file that is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns
