"""What each shard-writing process does (the shard stage runs `data.workers` of them):
decode and check its chunk's images, write them as one tar (more past the size limit)
with fixed metadata, and sum the training pixels for the mean/std."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mae.images import WIDE_GRAY_MODES, to_mode
from pipeline.data.sources import Input, Skipped
from pipeline.data.tarindex import write_index

GRAY_MODES = {"1", "L", "LA", "La", "F"} | WIDE_GRAY_MODES


@dataclass
class Chunk:
    """One shard's worth of work, written by one worker process."""

    split: str
    number: int
    items: list[Input]


@dataclass
class ChunkResult:
    split: str
    number: int
    parts: list[dict] = field(default_factory=list)  # {"tmp", "count", "bytes", "sha256", "index"}
    per_class: dict[int, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)  # per source split
    skipped: list[Skipped] = field(default_factory=list)
    stats: np.ndarray = field(default_factory=lambda: np.zeros(9))
    color: bool = False
    sizes: set = field(default_factory=set)  # (height, width) of the images written
    error: str | None = None  # under on_bad_input=fail: the first bad input


@dataclass(frozen=True)
class Context:
    folder: str
    idx_images: dict[str, tuple[str, int, int, int]]
    max_bytes: float
    fail: bool


_CTX: list[Context] = []
_MEMMAPS: dict[str, np.ndarray] = {}


def init_worker(ctx: Context) -> None:
    _CTX[:] = [ctx]
    _MEMMAPS.clear()


def _idx_pixels(split: str, record: int) -> np.ndarray:
    path, head, complete, rows, cols = _CTX[0].idx_images[split]  # complete: no truncated tail
    if split not in _MEMMAPS:
        _MEMMAPS[split] = np.memmap(path, np.uint8, "r", offset=head, shape=(complete, rows, cols))
    return np.asarray(_MEMMAPS[split][record])


def _stats(rgb: np.ndarray | None, gray: np.ndarray) -> np.ndarray:
    """[gray sum, gray sum sq, rgb sums (3), rgb sums sq (3), pixel count] in [0, 1] units."""
    g = gray.reshape(-1).astype(np.float64) / 255
    if rgb is None:  # a grayscale source: its RGB view repeats the gray channel
        s1, s2 = g.sum(), np.square(g).sum()
        return np.array([s1, s2, s1, s1, s1, s2, s2, s2, g.size])
    c = rgb.reshape(-1, 3).astype(np.float64) / 255
    return np.concatenate([[g.sum(), np.square(g).sum()], c.sum(0), np.square(c).sum(0), [g.size]])


def _encode(item: Input, want_stats: bool):
    """-> (extension, bytes to store, is colour, stats, (h, w)); raises _BadInput."""
    if _CTX[0].idx_images:
        pixels = _idx_pixels(item.source, int(item.ref))
        rows, cols = pixels.shape
        data = b"P5\n%d %d\n255\n" % (cols, rows) + pixels.tobytes()  # binary PGM
        return "pgm", data, False, _stats(None, pixels) if want_stats else None, (rows, cols)
    try:
        data = Path(str(item.ref)).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise _BadInput(f"unsupported image format {img.format} (expected JPEG or PNG)")
            img.load()  # decodes: catches truncated and corrupt files
            if img.mode in WIDE_GRAY_MODES:
                return _as_8_bit_png(img, want_stats)
            stats = None
            if want_stats:  # the pixels every reader decodes (`mae.images`)
                stats = _stats(np.asarray(to_mode(img, "RGB")), np.asarray(to_mode(img, "L")))
            return (
                ("jpg" if img.format == "JPEG" else "png"),
                data,
                img.mode not in GRAY_MODES,
                stats,
                (img.height, img.width),
            )
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # PIL names the in-memory file by its address: dropped, so the manifest (and
        # DVC's hash of it) is the same on every run
        reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))
        raise _BadInput(f"cannot decode image: {reason}") from None


def _as_8_bit_png(img: Image.Image, want_stats: bool):
    """A 16-bit grayscale PNG, stored as the 8-bit PNG every reader makes of it
    (`mae.images.to_mode`: its top 8 bits), since the loader reads 8-bit images."""
    pixels = np.asarray(to_mode(img, "L"))
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    stats = _stats(None, pixels) if want_stats else None
    return "png", buf.getvalue(), False, stats, pixels.shape


class _BadInput(Exception):
    pass


class _Tar:
    """A WebDataset shard, written as webdataset's TarWriter(encoder=False, mtime=0,
    user="mae", group="mae", mode=0o444) writes it, byte for byte: members `<key>.<ext>` in
    ext order, fixed metadata. Without webdataset, a worker does not import torch
    (~600 MB of memory per shard-writing process)."""

    def __init__(self, path: Path) -> None:
        # both closed by close()
        self.file = open(path, "wb")  # noqa: SIM115
        self.tar = tarfile.open(fileobj=self.file, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
            info.uname = info.gname = "mae"
            self.tar.addfile(info, io.BytesIO(members[ext]))

    def close(self) -> None:
        self.tar.close()
        self.file.close()


def write_chunk(chunk: Chunk) -> ChunkResult:
    """Write one chunk as one tar (more if it passes the size limit), fixed metadata."""
    ctx = _CTX[0]
    out = ChunkResult(chunk.split, chunk.number)
    writer = None
    for item in chunk.items:
        try:
            ext, data, color, stats, size = _encode(item, chunk.split == "train")
        except _BadInput as err:
            if ctx.fail:
                out.error = f"{item.name}: {err}"
                break
            out.skipped.append(Skipped(item.source, item.name, str(err)))
            continue
        if writer is None or out.parts[-1]["bytes"] >= ctx.max_bytes:
            if writer is not None:
                writer.close()
            tmp = f".{chunk.split}-{chunk.number:06d}-{len(out.parts):03d}.tar"
            writer = _Tar(Path(ctx.folder) / tmp)
            out.parts.append({"tmp": tmp, "count": 0, "bytes": 0})
        writer.write(f"{item.index:08d}", {ext: data, "cls": b"%d" % item.label})
        out.parts[-1]["count"] += 1
        out.parts[-1]["bytes"] += len(data)
        out.per_class[item.label] = out.per_class.get(item.label, 0) + 1
        out.written[item.source] = out.written.get(item.source, 0) + 1
        out.color |= color
        if len(out.sizes) < 2:  # one size, or mixed: no more is needed
            out.sizes.add(size)
        if stats is not None:
            out.stats += stats
    if writer is not None:
        writer.close()
    for part in out.parts:
        path = Path(ctx.folder) / part["tmp"]
        part["bytes"] = path.stat().st_size
        with path.open("rb") as f:  # in pieces: a shard can be hundreds of MB
            part["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        part["index"] = write_index(path, part["count"])
    return out
