"""Output safety for every command that writes a store: which paths may be written or
replaced, one writer per output at a time, and writes that survive a power cut: every file
and store the project publishes goes through the durable writes at the end of this module.

- An output may not be, contain, or lie inside one of the command's inputs (paths compared
  resolved, so ``DIR/sub/..`` is ``DIR``), nor be an existing file.
- Only a store that msmtu-batch wrote is ever deleted, ``--overwrite`` or not.
- A command holds ``.NAME.lock`` beside its output while it writes it: a kernel ``flock``,
  released when its process ends however it ends, so the lock of a dead run is taken over;
  the file names the holder (host, pid, start time) for the message a second run prints.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msmtu_batch.runtime.errors import MsmtuError


def staging_path(out: Path) -> Path:
    """Where a command builds ``out`` before publishing it: a hidden sibling."""
    return out.with_name(f".{out.name}.partial")


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


def replace_store(new: Path, final: Path, *, versioned: bool = False) -> None:
    """Put the finished store ``new`` at ``final``, replacing the store there (ours, checked by
    the caller).

    Plain: by two renames, so a reader that opens ``final`` meets the old store or the new
    one, never a half-written or half-deleted one (only, for an instant, none). But a lazy
    reader that opened the old store reads its chunks by path, and after the renames they are
    the new store's. ``versioned``: each store is kept as ``.NAME.versions/<n>.zarr`` and
    ``final`` is a symbolic link to the current one, replaced atomically; a reader resolves
    the link once, at open (:func:`msmtu_batch.products.archive.open_output`), and so reads
    one version to the end. The version replaced is kept until the next replacement, older
    ones go."""
    if versioned:
        _publish_version(new, final)
        return
    if not final.exists() and not final.is_symlink():
        new.rename(final)
        fsync_path(final.parent)
        return
    aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    final.rename(aside)
    new.rename(final)
    fsync_path(final.parent)
    if aside.is_symlink():  # a versioned store published plainly: its versions go with it
        versions = store_versions(final)
        aside.unlink()
        shutil.rmtree(versions, ignore_errors=True)
    else:
        shutil.rmtree(aside)


def store_versions(final: Path) -> Path:
    """The folder holding the versions of a store published with ``versioned``."""
    return final.with_name(f".{final.name}.versions")


def _publish_version(new: Path, final: Path) -> None:
    versions = store_versions(final)
    versions.mkdir(exist_ok=True)
    previous = final.resolve() if final.is_symlink() else None
    if final.exists() and not final.is_symlink():  # published plainly before: it becomes a version
        previous = versions / f"{time.time_ns()}.zarr"
        final.rename(previous)
    current = versions / f"{time.time_ns()}.zarr"
    new.rename(current)
    replace_link(final, current.relative_to(final.parent))  # relative: the folder can be moved or copied whole
    for old in versions.iterdir():
        if old not in (current, previous):
            shutil.rmtree(old, ignore_errors=True)


def take_back(final: Path, staging: Path) -> None:
    """Move the store at ``final`` (a versioned store's current version) to ``staging``, to be
    repaired and published again."""
    if final.is_symlink():
        final.resolve().rename(staging)
        final.unlink()
    else:
        final.rename(staging)


def fsync_path(path: Path) -> None:
    """Force a file's (or a folder's entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- durable writes: every file the project writes goes through these -------------------------

def publish_file(written: Path, final: Path) -> None:
    """Move the finished file ``written`` to ``final`` (same file system) atomically and durably:
    its bytes forced to disk before the rename, the folder's entry after it, so that after a
    power cut ``final`` holds the old file or the whole new one."""
    fsync_path(written)
    written.replace(final)
    fsync_path(final.parent)


@contextmanager
def durable_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write (ending in ``suffix``, for writers that add
    one); when the block ends it is published over ``path`` (:func:`publish_file`), and when the
    block fails it is removed: a reader never meets half a file, a crash never leaves one at
    ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        yield temporary
        publish_file(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# what a writer killed inside its write leaves of the file: durable_file's temporary (the name
# it gives above, for a file named {name}), and zarr's (LocalStore writes each chunk and
# metadata file to NAME.<uuid4 hex>.partial first)
_DURABLE_TEMPORARY = r"\.{name}\.\d+\.partial"
_STRAY_TEMPORARY = re.compile(_DURABLE_TEMPORARY.format(name=".+") + r"|.+\.[0-9a-f]{32}\.partial")


def remove_stray_temporaries(store: Path) -> list[Path]:
    """Delete the temporaries that writers killed mid-file (a SIGKILLed driver or worker) left
    in ``store``, whose every writer has ended, before it is published: a resumed run writes
    the same files under other names, and the output would carry the dead ones (a killed run
    left one in 4 of 30 trials). Returns what was removed."""
    removed = []
    for folder, _, files in os.walk(store):
        for name in files:
            if _STRAY_TEMPORARY.fullmatch(name):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_temporaries_of(path: Path) -> list[Path]:
    """Delete what writers of ``path`` killed inside :func:`durable_file` left beside it (a
    training killed while it saved a checkpoint, then resumed by its requeued job), for a
    caller that has just finished with ``path`` and is its only writer. Returns what was removed."""
    own = re.compile(_DURABLE_TEMPORARY.format(name=re.escape(path.name)))
    removed = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.partial") if own.fullmatch(p.name)]
    for leftover in removed:
        leftover.unlink(missing_ok=True)
    return removed


def write_text_durably(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically and durably (:func:`durable_file`)."""
    with durable_file(path) as temporary:
        temporary.write_text(text)


def replace_link(link: Path, target: str | Path) -> None:
    """Point the symbolic link ``link`` at ``target`` atomically (a new link renamed over it)
    and durably."""
    temporary = link.with_name(f".{link.name}.link-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)
    fsync_path(link.parent)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A hidden sibling folder to build ``final`` in, moved into place only once the block ends
    (the folder ``final`` replaced, its entry forced to disk); left behind by a failure, for the
    next call to clear."""
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    fsync_path(final.parent)
