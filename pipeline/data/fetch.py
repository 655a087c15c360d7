"""Fetching one file of a remote shard store: an `http(s)://` or fsspec URL, or a `pipe:`
command's output, retried when a try fails in a way another may not (a cut connection, a
timeout), hashed while it streams in and put in place only when whole and right."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)
TRIES = int(os.environ.get("MAE_FETCH_TRIES", "3"))  # per file, 1 s then 2 s apart


class _Retry(Exception):
    """A fetch that failed in a way another try may not (a cut connection, a timeout)."""


def with_retries(url: str, fetch):
    for attempt in range(TRIES):
        try:
            return fetch(url)
        except _Retry as err:
            last = err
            if attempt + 1 < TRIES:
                log.warning("fetching %s failed (%s); trying again", url, err)
                time.sleep(2**attempt)
    raise UserError(f"cannot fetch {url} ({TRIES} tries): {last}")


@contextlib.contextmanager
def _open(url: str) -> Iterator:
    """A stream of `url`'s bytes; any failure to open or read it raises _Retry."""
    if url.startswith("pipe:"):
        with tempfile.TemporaryFile() as stderr:  # a file: a chatty command never blocks on it
            proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=stderr)
            whole = False
            try:
                yield proc.stdout
                whole = True
            finally:
                if not whole:  # the reader stopped early: the command must not outlive it
                    proc.kill()
                proc.stdout.close()
                code = proc.wait()
            if code != 0:
                stderr.seek(0)
                said = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                raise _Retry(f"`{url[5:]}` exited {code}: {said[0] if said else 'no message'}")
        return
    import fsspec

    kw = {}
    if url.startswith(("http://", "https://")):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        kw = {"block_size": 0, "client_kwargs": {"timeout": timeout}}  # stream, no ranges
    try:
        with fsspec.open(url, "rb", **kw) as f:
            yield f
    except Exception as err:  # aiohttp and cloud SDK errors share no base class
        raise _Retry(_reason(err, url)) from None


def _reason(err: BaseException, url: str) -> str:
    """Why a fetch failed, in one line: fsspec wraps a refused connection or an HTTP 404 in
    a FileNotFoundError that only names the URL; its cause says what happened."""
    while str(err) in ("", url) and (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {first_line(err)}"


def read_all(url: str) -> bytes:
    with _open(url) as f:
        return f.read()


def download(url: str, dest: Path, entry: dict) -> None:
    """`url` -> `dest`, hashed as it streams in; renamed into place only when its size and
    sha256 are the manifest's."""
    part = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    sha, size = hashlib.sha256(), 0
    try:
        with _open(url) as src, open(part, "wb") as out:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if size != entry["bytes"]:
            raise _Retry(f"got {size:,} bytes, the manifest says {entry['bytes']:,}")
        if sha.hexdigest() != entry["sha256"]:  # all of another file: a retry cannot help
            raise UserError(
                f"{url}: its sha256 ({sha.hexdigest()[:12]}...) is not the manifest's "
                f"({entry['sha256'][:12]}...): the store holds another file than its manifest lists"
            )
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)
