"""The ImageFolder source of the shard stage: `root/<class>/<image>` (or
`root/{train,val,test}/<class>/<image>`), JPEG or PNG, listed without reading any image;
stray files, empty class folders and links that cannot be followed safely are bad input
(`data.on_bad_input`)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.sources import IMAGE_EXTENSIONS, Input, Skipped, SourceListing
from pipeline.errors import UserError


def list_imagefolder(root: Path, *, on_bad_input: str) -> SourceListing:
    """`root/<class>/<image>`, or `root/{train,val,test}/<class>/<image>`."""
    if not root.is_dir():
        raise UserError(f"ImageFolder root not found: {root}")
    subtrees = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if subtrees and "train" not in subtrees:
        raise UserError(f"{root}: has {', '.join(subtrees)} but no train/ folder")
    trees = subtrees or {"train": root}
    listing = SourceListing([], {}, description={"root": str(root)})
    policy = on_bad_input
    dirs = {split: _class_dirs(tree, root, listing, policy, split) for split, tree in trees.items()}
    classes = listing.classes = [p.name for p in dirs["train"]]
    if not classes:
        raise UserError(f"{trees['train']}: no class folders (expected <class>/<image> inside)")
    for split in trees:
        inputs: list[Input] = []
        for class_dir in dirs[split]:
            if class_dir.name not in classes:
                raise UserError(f"{class_dir}: class {class_dir.name!r} is not in train/")
            files = _class_files(class_dir, root, listing, policy, split)
            if not files:
                _bad(listing, policy, split, str(class_dir), "empty class folder")
            for path in files:
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    _bad(
                        listing,
                        policy,
                        split,
                        str(path),
                        f"unsupported file type (expected {', '.join(IMAGE_EXTENSIONS)})",
                    )
                    continue
                label, name = classes.index(class_dir.name), str(path)  # one str: ref and name
                inputs.append(Input(split, len(inputs), label, name, name))
        listing.splits[split] = inputs
    return listing


def _class_dirs(tree: Path, root: Path, listing: SourceListing, policy: str, split: str):
    """The class folders of `tree`, in name order; a link that does not lead to a folder
    of its own inside the root (to the root itself, an ancestor, outside, nowhere) is a
    bad input, not a class."""
    out = []
    for path in sorted(tree.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or not (path.is_dir() or path.is_symlink()):
            continue
        if not utf8(path.name):  # a class name: in the manifest, plots and the served model
            raise UserError(
                f"{printable(path)}: a class folder whose name is not UTF-8 (bytes "
                f"{os.fsencode(path.name)!r}, e.g. Latin-1 from a Windows zip): rename it, "
                f"e.g. `convmv -f latin1 -t utf8 -r --notest {printable(tree)}`"
            )
        reason = _link_problem(path, root)
        if reason is None and path.is_symlink() and path.resolve().parent == tree.resolve():
            reason = "symlink to another class folder (its images would get two labels)"
        if reason is None and path.is_dir():
            out.append(path)
        elif reason is not None:
            _bad(listing, policy, split, str(path), reason)
    return out


def _link_problem(path: Path, root: Path, within: Path | None = None) -> str | None:
    """Why `path` (a symlink) cannot be read as an input: None if it can (or is no link).
    A link must resolve inside the root, not to a folder that holds it, and, `within` a
    class folder, inside that folder: else its images would get a second label."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):  # RuntimeError: a loop, Python < 3.13
        return "broken or looping symlink"
    inside = lambda folder: target == folder or folder in target.parents  # noqa: E731
    holder = path.parent.resolve()
    if not inside(root.resolve()):
        return f"symlink leads outside the root ({target})"
    if target.is_dir() and (target == holder or target in holder.parents):
        return "symlink loop (leads back to a folder that holds it)"
    if within is not None and not inside(within):
        return f"symlink leads out of its class folder ({target})"
    return None


def _class_files(class_dir: Path, root: Path, listing: SourceListing, policy: str, split: str):
    """Every file under `class_dir`, links followed once each and inside the root; each
    link that cannot be followed is recorded, never dropped."""
    files, seen, own = [], set(), class_dir.resolve()
    for folder, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = Path(folder).resolve()
        if real in seen:  # reached twice through links: read once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()  # walk in name order: the listing (and the manifest) is stable
        for name in list(dirnames):
            path = Path(folder) / name
            reason = _link_problem(path, root, own)
            if reason is not None:
                dirnames.remove(name)
                _bad(listing, policy, split, str(path), reason)
        for name in sorted(filenames):
            path = Path(folder) / name
            reason = _link_problem(path, root, own) or (None if path.is_file() else "not a file")
            if reason is None and not utf8(str(path.relative_to(class_dir))):
                reason = f"a name that is not UTF-8 (bytes {os.fsencode(name)!r}): rename it"
            if reason is not None:
                _bad(listing, policy, split, printable(path), reason)
            else:
                files.append(path)
    return sorted(files)


def utf8(name: str) -> bool:
    """Whether a name read from the file system was valid UTF-8 (Python keeps the bytes
    it cannot decode as lone surrogates, which no JSON, YAML or MLflow field can hold)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: Path) -> str:
    """`path` for a message or the manifest: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _bad(listing: SourceListing, policy: str, split: str, name: str, reason: str) -> None:
    if policy == "fail":
        raise UserError(f"{name}: {reason}")
    listing.bad.append(Skipped(split, name, reason))
