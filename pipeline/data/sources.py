"""Raw image sources for the shard stage: IDX files (Fashion-MNIST) and ImageFolder trees.

A source lists its inputs per source split ("train", and "val"/"test" where it has them)
without reading any image; the shard stage decodes them in worker processes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# MD5 of each file's content once decompressed: the same for the upstream .gz files and for
# Debian's dataset-fashion-mnist (which recompressed them, so its .gz MD5s differ).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_HELP = (
    "install Debian's dataset-fashion-mnist (`make dataset`), or download the four .gz files "
    "from https://github.com/zalandoresearch/fashion-mnist (data/fashion; their .gz MD5s are "
    "in its README) into a folder and set data.root to it"
)
IDX_SPLITS = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Input:
    """One raw sample: `ref` is a file path (imagefolder) or a record number (idx)."""

    source: str  # the source split it comes from ("train", "val" or "test")
    index: int  # position in its source split: the sample's key
    label: int
    ref: str | int
    name: str  # how errors and the manifest name it


@dataclass(frozen=True)
class Skipped:
    split: str
    input: str
    reason: str
    count: int = 1  # a range of records (a file shorter than its header says) is one entry


@dataclass
class SourceListing:
    classes: list[str]
    splits: dict[str, list[Input]]  # source split -> inputs, in a fixed order
    bad: list[Skipped] = field(default_factory=list)  # found while listing
    description: dict = field(default_factory=dict)  # for the manifest
    idx_images: dict[str, tuple[str, int, int, int, int]] = field(default_factory=dict)
    # split -> (decompressed images file, header bytes, complete images, rows, cols); idx only


def _decompress(path: Path, dest: Path) -> str:
    """Copy `path` (gzip or raw) to `dest` decompressed; -> the md5 of the content. A stream
    that ends early keeps what was read (the file sizes then tell how much is missing)."""
    md5 = hashlib.md5()
    inflate = zlib.decompressobj(wbits=31) if path.suffix == ".gz" else None  # gzip framing
    with open(path, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            while inflate is not None and chunk:
                try:
                    data = inflate.decompress(chunk)
                except zlib.error as err:  # a bad header or CRC
                    raise UserError(f"{path}: not a valid gzip file ({err})") from None
                md5.update(data)
                out.write(data)
                chunk = inflate.unused_data  # a next gzip member, if any
                if chunk:
                    inflate = zlib.decompressobj(wbits=31)
            if inflate is None:
                md5.update(chunk)
                out.write(chunk)
    return md5.hexdigest()


def _find(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _idx_header(path: Path, raw: Path, expect_magic: int) -> tuple[int, tuple[int, ...], int]:
    """-> (count in header, per-record dims, header size) of a decompressed IDX file."""
    with open(raw, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or struct.unpack(">I", head)[0] != expect_magic:
            got = head.hex() if head else "an empty file"
            raise UserError(
                f"{path}: not an IDX file of the expected kind "
                f"(magic {expect_magic:#010x}, got {got})"
            )
        ndim = expect_magic & 0xFF
        raw_dims = f.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise UserError(f"{path}: IDX header cut short")
        dims = struct.unpack(f">{ndim}I", raw_dims)
        if 0 in dims[1:]:
            raise UserError(f"{path}: IDX header gives a record size of 0 ({dims[1:]})")
    return dims[0], tuple(dims[1:]), 4 + 4 * ndim


def list_idx(
    root: Path,
    workdir: Path,
    *,
    classes: list[str],
    checksums: dict[str, str] | None,
    on_bad_input: str,
) -> SourceListing:
    """IDX image/label pairs (train-*, t10k-*) in `root`, decompressed into `workdir`."""
    stems = [
        f"{p}-{k}-idx{n}-ubyte"
        for p in IDX_SPLITS.values()
        for k, n in (("images", 3), ("labels", 1))
    ]
    found = {stem: _find(root, stem) for stem in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        what = "Fashion-MNIST" if checksums else "IDX files"
        raise UserError(
            f"{what} not found in {root}: missing {', '.join(missing)}(.gz); "
            + (FASHION_MNIST_HELP if checksums else "set data.root")
        )
    listing = SourceListing(classes, {}, description={"root": str(root), "files": {}})
    for split, prefix in IDX_SPLITS.items():
        images, labels = found[f"{prefix}-images-idx3-ubyte"], found[f"{prefix}-labels-idx1-ubyte"]
        raw_images, raw_labels = workdir / f"{prefix}-images.raw", workdir / f"{prefix}-labels.raw"
        for path, raw in ((images, raw_images), (labels, raw_labels)):
            listing.description["files"][path.name] = _checked_copy(path, raw, checksums)
        _list_idx_split(listing, split, (images, raw_images), (labels, raw_labels), on_bad_input)
    return listing


def _checked_copy(path: Path, raw: Path, checksums: dict[str, str] | None) -> dict:
    """`path` decompressed to `raw`, its content checked against `checksums` if given."""
    md5 = _decompress(path, raw)
    stem = path.name.removesuffix(".gz")
    if checksums and md5 != checksums[stem]:
        raise UserError(
            f"{path}: checksum mismatch: content MD5 {md5}, expected "
            f"{checksums[stem]} (Fashion-MNIST); {FASHION_MNIST_HELP}"
        )
    return {"md5_content": md5}


def _list_idx_split(
    listing: SourceListing, split: str, image_files, label_files, on_bad_input: str
) -> None:
    """One split's records: an input each, or a skip record saying why not."""
    (images, raw_images), (labels, raw_labels) = image_files, label_files
    n_img, (rows, cols), img_head = _idx_header(images, raw_images, 0x00000803)
    n_lab, _, lab_head = _idx_header(labels, raw_labels, 0x00000801)
    have_img = (raw_images.stat().st_size - img_head) // (rows * cols)
    have_lab = raw_labels.stat().st_size - lab_head
    problems = []
    if have_img < n_img:
        problems.append(
            f"{images}: truncated: header says {n_img} images, "
            f"the file holds {have_img} complete ones"
        )
    if have_lab < n_lab:
        problems.append(
            f"{labels}: truncated: header says {n_lab} labels, the file holds {have_lab}"
        )
    if n_img != n_lab:
        problems.append(f"{images}: {n_img} images but {labels.name} has {n_lab} labels")
    if problems and on_bad_input == "fail":
        raise UserError(problems[0])
    label_bytes = raw_labels.read_bytes()[lab_head : lab_head + min(have_lab, n_lab)]
    classes, inputs = listing.classes, []
    whole = min(have_img, n_img, len(label_bytes))  # records both files hold
    for i in range(whole):
        if label_bytes[i] >= len(classes):
            reason = f"label {label_bytes[i]} out of range (0-{len(classes) - 1})"
            if on_bad_input == "fail":
                raise UserError(f"{labels}: record {i}: {reason}")
            listing.bad.append(Skipped(split, f"{images.name}#{i}", reason))
        else:
            inputs.append(Input(split, i, label_bytes[i], i, f"{images.name}#{i}"))
    # the rest as ranges, whatever a header claims: no per-record objects for a lying count
    both = min(n_img, n_lab)
    gaps = [(whole, both, "missing: file truncated")]
    gaps += [(both, n_img, "no matching label"), (both, n_lab, "no matching image")]
    for start, end, reason in gaps:
        if end > start:
            name = f"{images.name}#{start}" + (f"-{end - 1}" if end - start > 1 else "")
            listing.bad.append(Skipped(split, name, reason, end - start))
    listing.splits[split] = inputs
    listing.idx_images[split] = (str(raw_images), img_head, have_img, rows, cols)
