"""Content digests of source files, remembered between runs.

A yearly production reads about 6 GB of granules per year; hashing them all on every rerun
would make a rerun with nothing new take minutes. :class:`DigestCache` keeps each file's
digest with its size, modification time and inode, and hashes again only a file whose
stat changed (as git's index and DVC do): a touched file with the same bytes still has the
same digest, so stages decide by content, not by time stamps.

The digest is BLAKE3, a cryptographic hash like sha256 but 14x its speed on CPUs without SHA
extensions (2.4 GB/s against 0.17 GB/s on the benchmark VM): sha256 of a year of Andalusia's
granules (1.9 GB) was a quarter of the ingest's CPU time.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from blake3 import blake3

from msmtu_batch.runtime.outputs import write_text_durably

if TYPE_CHECKING:
    import torch


def lower_thread_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: nice 19 for this thread only),
    so that hashing beside the ingest's workers takes only the CPU they leave idle rather than
    a share of theirs; elsewhere a no-op."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def file_blake3(path: str | os.PathLike) -> str:
    """The BLAKE3 digest of a file's bytes (hex, 256 bits)."""
    digest = blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """``cache(path)`` is ``file_blake3(path)``, remembered in a JSON file (``save``)."""

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
            if entry is not None and entry["stat"] == key and "blake3" in entry:
                return entry["blake3"]
        digest = file_blake3(path)
        with self._lock:
            self._entries[str(path)] = {"stat": key, "blake3": digest}
            self.hashed += 1
        return digest

    def save(self) -> None:
        if self.store is not None:
            with self._lock:
                text = json.dumps(self._entries, sort_keys=True)
            self.store.parent.mkdir(parents=True, exist_ok=True)
            write_text_durably(self.store, text)


CHECKSUM_FIELD = "content_blake3"  # a model file's content checksum, a field of its JSON metadata


def tensors_checksum(tensors: Mapping[str, torch.Tensor], metadata: dict) -> str:
    """BLAKE3 of a safetensors file's content as it is read back: its metadata (canonical JSON,
    without the checksum field) and each tensor's name, dtype, shape and bytes, in name order.
    Kept in the metadata on writing and compared on loading, so a flipped bit in the weights or
    an edited header is caught (the format itself checks neither). In the one metadata entry,
    not an entry of its own: safetensors writes its entries in no fixed order, and a model's
    bytes must not depend on the process that wrote it."""
    import torch  # here: the ingest's hashing needs no torch

    described = {k: v for k, v in metadata.items() if k != CHECKSUM_FIELD}
    digest = blake3(json.dumps(described, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def with_checksum(metadata: dict, tensors: Mapping[str, torch.Tensor]) -> dict:
    """``metadata`` with the checksum of the file it describes (:func:`tensors_checksum`)."""
    return {**metadata, CHECKSUM_FIELD: tensors_checksum(tensors, metadata)}


def checksum_mismatch(metadata: dict, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a file's content differs from the checksum in its metadata (False without one)."""
    return CHECKSUM_FIELD in metadata and metadata[CHECKSUM_FIELD] != tensors_checksum(tensors, metadata)
