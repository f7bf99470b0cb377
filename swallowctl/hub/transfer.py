"""The transfer: each file streamed with an HTTP Range from a kept partial, verified, renamed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from swallowctl.core.errors import RuntimeFailure

if TYPE_CHECKING:
    from swallowctl.hub import DownloadPlan, ProgressFn, RemoteFile
    from swallowctl.hub.layout import Layout

logger = logging.getLogger(__name__)

DISK_MARGIN = 64 * 2**20  # headroom for refs, locks and filesystem overhead
_RETRIES = 3  # attempts in a row that bring no new byte before a file is given up for this run
_RETRY_WAIT_S = 2.0
_REPORT_EVERY = 2**20  # progress callbacks at most once per MiB
_HASH_BLOCK = 8 * 2**20


def fetch(
    plan: DownloadPlan, f: RemoteFile, layout: Layout, on_progress: ProgressFn | None
) -> tuple[int, int]:
    """Bring one file into place; return (bytes fetched now, bytes kept from an earlier run)."""
    import httpx2
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    partial, final = layout.partial(f), layout.final(f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    layout.lock(f).parent.mkdir(parents=True, exist_ok=True)
    url = f"{plan.endpoint}/{plan.repo_id}/resolve/{quote(plan.commit, safe='')}/{quote(f.path)}"
    # Identity encoding: a Range must count bytes of the file, not of a gzip stream.
    headers = {**build_hf_headers(library_name="swallowctl"), "Accept-Encoding": "identity"}
    with WeakFileLock(layout.lock(f)):  # one writer per partial file, across processes
        kept = layout.partial_size(f)
        if kept > f.size:
            partial.unlink()
            kept = 0
        start, stalls, received = kept, 0, 0
        logger.info("fetching %s (%s of %s bytes to go)", f.path, f.size - start, f.size)
        while start < f.size:
            try:
                start, got = _stream(url, headers, partial, start, f, on_progress)
                received, stalls = received + got, 0
            except httpx2.TransportError as e:
                end = layout.partial_size(f)
                received += max(end - start, 0)
                stalls = 0 if end > start else stalls + 1
                if stalls > _RETRIES:
                    raise
                logger.warning("connection lost in %s at byte %d (%s); resuming", f.path, end, e)
                time.sleep(_RETRY_WAIT_S)
                start = end
        _verify(partial, f)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
    # Bytes not received now were kept from an earlier run (0 when the server ignored Range).
    return received, max(f.size - received, 0)


def _stream(
    url: str,
    headers: dict[str, str],
    partial: Path,
    start: int,
    f: RemoteFile,
    on_progress: ProgressFn | None,
) -> tuple[int, int]:
    """Append bytes [start, size) of the file to `partial`; return (bytes on disk, received)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    request = {**headers, "Range": f"bytes={start}-"} if start else headers
    session = get_session()
    with session.stream(
        "GET", url, headers=request, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    ) as r:
        if r.status_code == 416:  # the partial is no prefix of this file: start over
            partial.unlink(missing_ok=True)
            return 0, 0
        hf_raise_for_status(r)
        if r.status_code == 200:  # no Range sent, or the server ignored it
            start = 0
        with partial.open("r+b" if partial.exists() else "wb") as out:
            out.seek(start)
            out.truncate()
            done = last = start
            if on_progress:
                on_progress(f.path, done, f.size)
            for chunk in r.iter_bytes():
                out.write(chunk)
                done += len(chunk)
                if done > f.size:
                    raise RuntimeFailure(f"the Hub sent more than {f.size} bytes for {f.path}")
                if on_progress and (done - last >= _REPORT_EVERY or done == f.size):
                    on_progress(f.path, done, f.size)
                    last = done
    return done, done - start


def _verify(partial: Path, f: RemoteFile) -> None:
    """Size, then sha256 (LFS) or the git blob id; a bad file is deleted, never published."""
    size = partial.stat().st_size
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % size)
    with partial.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    if size != f.size or h.hexdigest() != f.etag:
        partial.unlink()
        raise RuntimeFailure(
            f"{f.path} arrived corrupted (size {size} of {f.size}, or its hash differs)",
            hint="the broken copy was removed; run the same command again",
        )


def check_disk(target: Path, remaining: int) -> None:
    need = remaining + DISK_MARGIN if remaining else 0
    free = free_bytes(target)
    if need > free:
        raise RuntimeFailure(
            f"not enough disk space at {nearest_existing(target)}: the download needs "
            f"{human(need)} (with a {human(DISK_MARGIN)} margin), {human(free)} free",
            hint="free some space, or point HF_HUB_CACHE / --local-dir at a larger disk",
        )


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    return next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor or "/"))


def human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
