"""Where downloaded files go: the Hugging Face cache layout of one repo, or a `--local-dir`."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swallowctl.hub import RemoteFile

COMMIT = re.compile(r"[0-9a-f]{40}")


class Layout:
    """The HF cache layout of one repo (blobs/, snapshots/, refs/), or a `--local-dir`.

    A cache partial is `blobs/<etag>.incomplete`, the name huggingface_hub <= 1.17 resumed from
    (2.x adds a random suffix, so the two never write the same file). A local dir keeps partials
    and `hf download`-format metadata under `<local_dir>/.cache/huggingface/download/`.
    """

    def __init__(self, repo_id: str, local_dir: Path | None) -> None:
        self.local_dir = local_dir.expanduser().absolute() if local_dir else None
        self.folder = "models--" + repo_id.replace("/", "--")
        self.storage = hub_cache() / self.folder

    @property
    def root(self) -> Path:
        return self.local_dir or self.storage

    def destination(self, commit: str) -> Path:
        return self.local_dir or self.storage / "snapshots" / commit

    def final(self, f: RemoteFile) -> Path:
        return self.local_dir / f.path if self.local_dir else self.storage / "blobs" / f.etag

    def partial(self, f: RemoteFile) -> Path:
        if self.local_dir is None:
            return self.storage / "blobs" / f"{f.etag}.incomplete"
        return self._meta(f.path).with_name(f"{Path(f.path).name}.{f.etag}.incomplete")

    def lock(self, f: RemoteFile) -> Path:
        if self.local_dir is None:  # the lock huggingface_hub takes for the same blob
            return hub_cache() / ".locks" / self.folder / f"{f.etag}.lock"
        return self.partial(f).with_suffix(".lock")

    def partial_size(self, f: RemoteFile) -> int:
        p = self.partial(f)
        return p.stat().st_size if p.is_file() else 0

    def is_complete(self, f: RemoteFile) -> bool:
        final = self.final(f)
        if not (final.is_file() and final.stat().st_size == f.size):
            return False
        # A local dir file counts only with metadata naming this etag (the `hf download` format).
        return self.local_dir is None or self._read_meta(f.path) == f.etag

    def publish(self, f: RemoteFile, commit: str) -> None:
        """Make a complete file visible: the snapshot link, or the local dir's metadata."""
        if self.local_dir is not None:
            if self._read_meta(f.path) != f.etag:
                self._meta(f.path).parent.mkdir(parents=True, exist_ok=True)
                self._meta(f.path).write_text(f"{commit}\n{f.etag}\n{time.time()}\n")
            return
        blob, link = self.final(f), self.storage / "snapshots" / commit / f.path
        if link.is_symlink() and link.resolve() == blob.resolve():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:  # no symlinks here (Windows without developer mode): copy, as hf does
            shutil.copyfile(blob, link)

    def write_ref(self, revision: str, commit: str) -> None:
        if self.local_dir is None and revision != commit:
            ref = self.storage / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)  # readers never see a half-written ref

    def read_ref(self, revision: str) -> str | None:
        if COMMIT.fullmatch(revision) and (self.storage / "snapshots" / revision).is_dir():
            return revision
        try:
            commit = (self.storage / "refs" / revision).read_text().strip()
        except OSError:
            return None
        return commit if COMMIT.fullmatch(commit) else None

    def _meta(self, path: str) -> Path:
        assert self.local_dir is not None
        return self.local_dir / ".cache" / "huggingface" / "download" / f"{path}.metadata"

    def _read_meta(self, path: str) -> str | None:
        try:
            return self._meta(path).read_text().splitlines()[1].strip()
        except (OSError, IndexError):
            return None


def hub_cache() -> Path:
    # Read at call time, not at huggingface_hub's import: a later HF_HOME/HF_HUB_CACHE counts.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
