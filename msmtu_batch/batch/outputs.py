"""Output safety for every command that writes a store: which paths may be written or
replaced, one writer per output at a time, and writes that survive a power cut.

- An output may not be, contain, or lie inside one of the command's inputs (paths compared
  resolved, so ``DIR/sub/..`` is ``DIR``), nor be an existing file.
- Only a store that msmtu-batch wrote is ever deleted, ``--overwrite`` or not.
- A command holds ``.NAME.lock`` beside its output while it writes it: a kernel ``flock``,
  released when its process ends however it ends, so the lock of a dead run is taken over;
  the file names the holder (host, pid, start time) for the message a second run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msmtu_batch.errors import MsmtuError


def check_output_path(out: Path, inputs: Iterable[tuple[str, Path | str | None]], option: str = "--out") -> None:
    """Refuse an output path that is, contains or lies inside one of ``inputs`` ((role, path)
    pairs), or that is an existing file."""
    out = out.resolve()
    for role, path in inputs:
        if path is None:
            continue
        path = Path(path).resolve()
        if out == path or out in path.parents:
            raise MsmtuError(f"{option} {out} is or contains the {role} {path}; choose another output path")
        if path in out.parents:
            raise MsmtuError(f"{option} {out} lies inside the {role} {path}; choose a path outside it")
    if out.exists() and not out.is_dir():
        raise MsmtuError(f"{option} {out} is an existing file, not an output store; choose another path")


def check_replaceable(store: Path, ours: bool, kind: str = "msmtu-batch output (no run manifest)") -> None:
    """Only a store that msmtu-batch wrote (``ours``) is ever deleted."""
    if not ours:
        raise MsmtuError(f"{store} exists and is not an {kind}; it is never replaced: remove it yourself or "
                         "choose another --out")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` while writing it (see the module docstring)."""
    lock = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = "host {host}, pid {pid}, started {started}".format(**json.loads(holder))
            except (ValueError, KeyError, TypeError):
                who = "holder unknown"
            raise MsmtuError(f"{out} is being written by another run ({who}); wait for it to end") from None
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break  # else its last holder removed the file between our open and flock: retry
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def replace_store(new: Path, final: Path) -> None:
    """Put the finished store ``new`` at ``final``, replacing the store there (ours, checked by
    the caller) by two renames: a reader meets the old store or the new one, never a half-written
    or half-deleted one (only, for an instant, none)."""
    if not final.exists():
        new.rename(final)
        return
    aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    final.rename(aside)
    new.rename(final)
    shutil.rmtree(aside)


def fsync_path(path: Path) -> None:
    """Force a file's (or a folder's entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temporary file, rename) and durably (fsync of
    the file and of its folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_path(path.parent)
