"""Content digests of source files, remembered between runs.

A yearly production reads about 6 GB of granules per year; hashing them all on every rerun
would make a rerun with nothing new take minutes. :class:`DigestCache` keeps each file's
sha256 with its size, modification time and inode, and hashes again only a file whose
stat changed (as git's index and DVC do): a touched file with the same bytes still has the
same digest, so stages decide by content, not by time stamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from msmtu_batch.batch.outputs import write_text_durably


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DigestCache:
    """``cache(path)`` is ``file_sha256(path)``, remembered in a JSON file (``save``)."""

    def __init__(self, store: Path | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self.hashed = 0  # files actually read, for run records
        if store is not None and store.is_file():
            try:
                self._entries = json.loads(store.read_text())
            except ValueError:
                self._entries = {}  # a damaged cache only costs time

    def __call__(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        with self._lock:
            entry = self._entries.get(str(path))
            if entry is not None and entry["stat"] == key:
                return entry["sha256"]
        digest = file_sha256(path)
        with self._lock:
            self._entries[str(path)] = {"stat": key, "sha256": digest}
            self.hashed += 1
        return digest

    def save(self) -> None:
        if self.store is not None:
            with self._lock:
                text = json.dumps(self._entries, sort_keys=True)
            self.store.parent.mkdir(parents=True, exist_ok=True)
            write_text_durably(self.store, text)
