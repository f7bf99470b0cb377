"""`swallowctl download`: fetch a model from the Hugging Face Hub, resumably, into its usual cache.

Three plain functions for cli.py and doctor.py: `plan_download` (the file list, sizes and commit;
what a `--dry-run` shows), `download` (fetch what is missing) and `cache_status` (offline: is a
repo's snapshot complete?).

Why the transfer is ours: huggingface_hub >= 1.18 (2.4 installed here) writes each download to a
process-unique `<etag>.<uuid>.incomplete` and deletes it when the transfer fails, so a rerun after a
dropped connection starts every file from byte 0 (huggingface/huggingface_hub#4196, open). A
16 GB model on a flaky line needs better, so each file is streamed with an HTTP Range from a kept
`<etag>.incomplete`, checked (size, then sha256 or git blob id) and renamed into place. What the
library offers is reused: its HTTP session (proxies, offline guard), auth headers, error types, and
the standard cache layout (blobs/, snapshots/<commit>/, refs/), so transformers and `hf` find the
files afterwards. Xet transfers are not used (plain HTTP, which the Hub serves to every client).

Modules: this one plans (names, patterns, the file list) and holds the public API; layout.py is
the cache and local-dir layout, transfer.py the resumable, verified fetch, errors.py the one-line
Hub errors. Nothing heavy is imported at module level; huggingface_hub only inside functions.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swallowctl.core import models
from swallowctl.core.errors import RuntimeFailure, UsageError
from swallowctl.hub.errors import hub_errors, one_line
from swallowctl.hub.layout import Layout, hub_cache
from swallowctl.hub.transfer import check_disk, fetch

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (path in repo, bytes on disk, file size)

_DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the planned commit."""

    path: str
    size: int
    sha256: str | None  # LFS files: their content hash, also the cache's blob name
    blob_id: str | None  # the git blob id (sha1 of "blob <size>\\0" + content)
    present_bytes: int = 0  # already on disk: `size` when complete, else a kept partial's size

    @property
    def etag(self) -> str:
        """The name the Hub cache stores the file under (sha256 for LFS, else the git blob id)."""
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class SkippedFile:
    """A repo file left out, and why."""

    path: str
    size: int
    reason: str


@dataclass(frozen=True)
class DownloadPlan:
    """What `download` will fetch; everything a `--dry-run` shows."""

    repo_id: str
    revision: str  # as asked ("main" by default)
    commit: str  # the revision resolved to a commit; every file is fetched at it
    files: tuple[RemoteFile, ...]
    skipped: tuple[SkippedFile, ...]
    total_bytes: int
    present_bytes: int  # already on disk (complete files and kept partials)
    remaining_bytes: int
    destination: Path  # the snapshot folder in the HF cache, or the local dir
    local_dir: Path | None
    endpoint: str
    offline: bool  # planned from the cache alone (HF_HUB_OFFLINE)


@dataclass(frozen=True)
class DownloadResult:
    """What `download` did."""

    repo_id: str
    revision: str
    commit: str
    path: Path  # snapshot folder (from_pretrained-ready) or the local dir
    files: tuple[str, ...]  # every planned file, now under `path`
    fetched_bytes: int  # received over the network in this run
    resumed_bytes: int  # bytes of partial files from an earlier run, kept and not fetched again
    reused_files: tuple[str, ...]  # complete before this run: not requested at all


@dataclass(frozen=True)
class CacheStatus:
    """Whether a repo's snapshot in the HF cache holds what loading the model needs."""

    repo_id: str
    revision: str
    cache_dir: Path
    commit: str | None  # None when the revision was never fetched
    snapshot: Path | None
    files: tuple[str, ...]  # present in the snapshot
    missing: tuple[str, ...]  # config.json, tokenizer files, safetensors shards not there
    size_bytes: int  # of the snapshot's files (blobs counted once)
    partial_bytes: int  # kept partial downloads of this repo
    complete: bool


# ---- public API ---------------------------------------------------------------------------


def plan_download(
    model: str | None = None,
    *,
    mlx: bool = False,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    local_dir: Path | None = None,
) -> DownloadPlan:
    """Resolve `model` (alias, Hub id, MLX twin; default Swallow 8B) and list what to fetch.

    Asks the Hub for the file list with sizes at `revision` (one API call, no file bytes), drops
    duplicate weight copies (`original/`, `*.pth`, `.bin` beside `.safetensors`) unless an
    `include` pattern names them, then applies `include`/`exclude` (fnmatch, as huggingface_hub's
    allow/ignore patterns). Under HF_HUB_OFFLINE the plan comes from the cache, which must hold a
    complete snapshot. Raises UsageError (exit 2) for a wrong name, revision or pattern set and
    RuntimeFailure (exit 1) for gated, offline, network failures.
    """
    repo_id = _repo_for(model, mlx)
    rev = revision or _DEFAULT_REVISION
    endpoint = _endpoint()
    _check_patterns(include or [], exclude or [])
    if _offline():
        return _plan_offline(repo_id, rev, endpoint, include or [], exclude or [], local_dir)
    from huggingface_hub import HfApi

    with hub_errors(repo_id, rev, endpoint):
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=rev, files_metadata=True)
    if not info.sha:
        raise RuntimeFailure(f"the Hub named no commit for {repo_id}@{rev}", hint="retry later")
    commit = info.sha
    listed = [
        RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in info.siblings or []
    ]
    layout = Layout(repo_id, local_dir)
    files, skipped = _select(listed, include or [], exclude or [], f"{repo_id}@{rev}")
    files = [_with_present(f, layout) for f in files]
    return _plan(repo_id, rev, commit, files, skipped, layout, endpoint, offline=False)


def download(
    plan: DownloadPlan, *, local_dir: Path | None = None, on_progress: ProgressFn | None = None
) -> DownloadResult:
    """Fetch the plan's missing files into the HF cache (or `local_dir`, default the plan's).

    Complete files are not requested again; a partial file left by an interrupted run is
    continued with an HTTP Range. Free disk is checked first against the remaining bytes. Each
    file is verified (size, sha256 or git blob id) before it is renamed into place. Progress goes
    to `on_progress(path, bytes_on_disk, size)`. Errors as for `plan_download`; partial files are
    kept for the next run.
    """
    layout = Layout(plan.repo_id, local_dir or plan.local_dir)
    if plan.offline:
        return _download_offline(plan, layout)
    todo = {f.path: f for f in plan.files if not layout.is_complete(f)}
    remaining = sum(f.size - layout.partial_size(f) for f in todo.values())
    check_disk(layout.root, remaining)
    fetched = resumed = 0
    with hub_errors(plan.repo_id, plan.revision, plan.endpoint):
        # The ref first: an interrupted run then shows in cache_status as "missing files".
        layout.write_ref(plan.revision, plan.commit)
        for f in plan.files:
            if f.path in todo:
                got, kept = fetch(plan, f, layout, on_progress)
                fetched, resumed = fetched + got, resumed + kept
            layout.publish(f, plan.commit)  # at once: a later failure keeps this file usable
    logger.info("%s@%s is at %s", plan.repo_id, plan.commit, layout.destination(plan.commit))
    return DownloadResult(
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit=plan.commit,
        path=layout.destination(plan.commit),
        files=tuple(f.path for f in plan.files),
        fetched_bytes=fetched,
        resumed_bytes=resumed,
        reused_files=tuple(f.path for f in plan.files if f.path not in todo),
    )


def cache_status(repo_id: str, revision: str | None = None) -> CacheStatus:
    """Offline look at the HF cache: is `repo_id` at `revision` (default main) complete?

    Complete means config.json, tokenizer_config.json plus tokenizer.json (or tokenizer.model),
    and every shard model.safetensors.index.json lists (else model.safetensors) are present.
    """
    rev = revision or _DEFAULT_REVISION
    layout = Layout(repo_id, None)
    commit = layout.read_ref(rev)
    snapshot = layout.storage / "snapshots" / commit if commit else None
    present: list[str] = []
    size, seen = 0, set()
    if snapshot is not None and snapshot.is_dir():
        for p in sorted(snapshot.rglob("*")):
            if p.is_file():  # follows the symlink: a dangling link is not present
                present.append(p.relative_to(snapshot).as_posix())
                real = p.resolve()
                size += 0 if real in seen else real.stat().st_size
                seen.add(real)
    missing = _missing(snapshot, set(present))
    partial = sum(p.stat().st_size for p in (layout.storage / "blobs").glob("*.incomplete"))
    return CacheStatus(
        repo_id=repo_id,
        revision=rev,
        cache_dir=hub_cache(),
        commit=commit,
        snapshot=snapshot if snapshot is not None and snapshot.is_dir() else None,
        files=tuple(present),
        missing=missing,
        size_bytes=size,
        partial_bytes=partial,
        complete=bool(present) and not missing,
    )


# ---- names, patterns, plans ----------------------------------------------------------------


def _repo_for(model: str | None, mlx: bool) -> str:
    raw = (model or models.DEFAULT_MODEL).strip()
    info = models.lookup(raw)
    if raw.lower().startswith("builtin:") or (info and info.hub_id.startswith("builtin:")):
        raise UsageError(f"'{raw}' is built into swallowctl: nothing to download")
    if (Path(raw).expanduser() / "config.json").is_file():  # models.resolve's rule
        raise UsageError(f"'{raw}' is a local folder: nothing to download")
    if info is not None:
        if mlx and not info.mlx_id:
            raise UsageError(f"no MLX twin is known for '{raw}'", hint="give the MLX repo id")
        if mlx or (info.mlx_id and raw.lower() == info.mlx_id.lower()):
            return info.mlx_id or info.hub_id
        return info.hub_id
    if mlx:
        raise UsageError(
            f"--mlx needs a known model, and '{raw}' is not one",
            hint="give the MLX repo itself, e.g. mlx-community/<name>-4bit",
        )
    if raw.count("/") != 1 or raw.startswith((".", "/", "~")):
        matches = models.close_matches(raw)
        maybe = f"did you mean {' or '.join(map(repr, matches))}? " if matches else ""
        raise UsageError(f"unknown model '{raw}'", hint=maybe + "or give a Hub id (org/name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(raw)
    except HFValidationError as e:
        raise UsageError(f"'{raw}' is not a valid Hub model id ({one_line(e)})") from None
    return raw


def _check_patterns(include: list[str], exclude: list[str]) -> None:
    if any(not p.strip() for p in (*include, *exclude)):
        raise UsageError("empty --include/--exclude pattern")
    both = sorted(set(include) & set(exclude))
    if both:
        raise UsageError(f"pattern {both[0]!r} is given to both --include and --exclude")


def _matches(path: str, patterns: list[str]) -> bool:
    # huggingface_hub's rule: "folder/" means everything under it.
    return any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns)


def _duplicate(path: str, safetensors_dirs: set[str]) -> str | None:
    """Why a file is a duplicate weight copy (skipped by default), or None."""
    if path.startswith("original/"):
        return "duplicate weights: the original/ (Meta format) checkpoint"
    if path.endswith((".pth", ".pt")):
        return "duplicate weights: PyTorch pickle (.pth)"
    if path.endswith((".bin", ".msgpack", ".h5")) and posixpath.dirname(path) in safetensors_dirs:
        return "duplicate weights: .safetensors of the same model are downloaded"
    return None


def _select(
    listed: list[RemoteFile], include: list[str], exclude: list[str], at: str
) -> tuple[list[RemoteFile], list[SkippedFile]]:
    st_dirs = {posixpath.dirname(f.path) for f in listed if f.path.endswith(".safetensors")}
    files: list[RemoteFile] = []
    skipped: list[SkippedFile] = []
    for f in sorted(listed, key=lambda f: f.path):
        # An explicit --include is taken literally: it overrides the duplicate-weight defaults.
        if include and not _matches(f.path, include):
            reason: str | None = "not matched by --include"
        elif _matches(f.path, exclude):
            reason = "matched by --exclude"
        else:
            reason = None if include else _duplicate(f.path, st_dirs)
        if reason:
            skipped.append(SkippedFile(f.path, f.size, reason))
        else:
            files.append(f)
    for p in include:
        if not any(fnmatch.fnmatch(f.path, p + "*" if p.endswith("/") else p) for f in listed):
            logger.warning("--include %r matches no file of %s", p, at)
    if not files:
        raise UsageError(
            f"nothing to download: the patterns leave none of the {len(listed)} files of {at}",
            hint="check --include/--exclude ('*.json', 'subdir/'); --dry-run lists the files",
        )
    return files, skipped


def _with_present(f: RemoteFile, layout: Layout) -> RemoteFile:
    _safe_name(f.path)
    if not f.etag:
        raise RuntimeFailure(f"the Hub gave no blob id for {f.path}", hint="retry later")
    present = f.size if layout.is_complete(f) else min(layout.partial_size(f), f.size)
    return RemoteFile(f.path, f.size, f.sha256, f.blob_id, present)


def _plan(
    repo_id: str,
    rev: str,
    commit: str,
    files: list[RemoteFile],
    skipped: list[SkippedFile],
    layout: Layout,
    endpoint: str,
    *,
    offline: bool,
) -> DownloadPlan:
    total = sum(f.size for f in files)
    present = sum(f.present_bytes for f in files)
    return DownloadPlan(
        repo_id=repo_id,
        revision=rev,
        commit=commit,
        files=tuple(files),
        skipped=tuple(skipped),
        total_bytes=total,
        present_bytes=present,
        remaining_bytes=total - present,
        destination=layout.destination(commit),
        local_dir=layout.local_dir,
        endpoint=endpoint,
        offline=offline,
    )


def _plan_offline(
    repo_id: str,
    rev: str,
    endpoint: str,
    include: list[str],
    exclude: list[str],
    local_dir: Path | None,
) -> DownloadPlan:
    status = cache_status(repo_id, rev)
    if not status.complete or status.snapshot is None or status.commit is None:
        what = f"missing {', '.join(status.missing)}" if status.commit else "never downloaded"
        raise RuntimeFailure(
            f"offline (HF_HUB_OFFLINE), and {repo_id}@{rev} is not complete in the cache "
            f"{status.cache_dir}: {what}",
            hint="unset HF_HUB_OFFLINE and run the same command again (partial files are kept)",
        )
    listed = []
    for name in status.files:
        real = (status.snapshot / name).resolve()
        lfs = real.name if len(real.name) == 64 else None
        listed.append(RemoteFile(name, real.stat().st_size, lfs, None if lfs else real.name))
    files, skipped = _select(listed, include, exclude, f"{repo_id}@{rev}")
    files = [RemoteFile(f.path, f.size, f.sha256, f.blob_id, f.size) for f in files]
    layout = Layout(repo_id, local_dir)
    return _plan(repo_id, rev, status.commit, files, skipped, layout, endpoint, offline=True)


def _download_offline(plan: DownloadPlan, layout: Layout) -> DownloadResult:
    snapshot = Layout(plan.repo_id, None).destination(plan.commit)
    if layout.local_dir is not None:  # copy out of the cache: there is no network to use
        for f in plan.files:
            dst = layout.local_dir / f.path
            if not (dst.is_file() and dst.stat().st_size == f.size):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(snapshot / f.path, dst)
    return DownloadResult(
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit=plan.commit,
        path=layout.destination(plan.commit),
        files=tuple(f.path for f in plan.files),
        fetched_bytes=0,
        resumed_bytes=0,
        reused_files=tuple(f.path for f in plan.files),
    )


def _missing(snapshot: Path | None, present: set[str]) -> tuple[str, ...]:
    need = ["config.json", "tokenizer_config.json"]
    if "tokenizer.model" not in present:
        need.append("tokenizer.json")
    index = "model.safetensors.index.json"
    if index in present and snapshot is not None:
        try:
            weight_map = json.loads((snapshot / index).read_text(encoding="utf-8"))["weight_map"]
            need += sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            need.append(f"{index} (unreadable)")
    else:
        need.append("model.safetensors")
    return tuple(n for n in need if n not in present)


# ---- small helpers ---------------------------------------------------------------------------


def _safe_name(path: str) -> None:
    # A repo file name joined onto the cache or local dir must stay inside it.
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", path):
        raise RuntimeFailure(f"the repo lists an unsafe file name {path!r}; refusing to fetch it")


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (
        os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return bool(constants.HF_HUB_OFFLINE) or any(v in {"1", "ON", "YES", "TRUE"} for v in flags)
