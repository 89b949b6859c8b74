"""Progress and log lines for people at a terminal and for batch logs.

On a terminal, long work shows a rich progress bar. Elsewhere (a SLURM job's output file,
CI, a pipe) a bar is noise, so :class:`Reporter` prints plain progress lines instead: one
every ``step_percent`` per cent or ``every_seconds`` seconds, whichever comes first, and
one at the end. With a log file, every line (messages and progress) is also appended to
it with a UTC time stamp, so a batch job leaves a record of what it did and when.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
ProgressFactory = Callable[[Iterable[T], int], Iterator[T]]


class Reporter(AbstractContextManager):
    """Messages to stdout, progress to stderr as a bar or as lines; both to the log file."""

    def __init__(self, console: Console, log_file: Path | None = None, *, step_percent: float = 5,
                 every_seconds: float = 30, interactive: bool | None = None) -> None:
        self.console = console
        self.interactive = console.is_terminal if interactive is None else interactive
        self.step_percent, self.every_seconds = step_percent, every_seconds
        self._lock = threading.Lock()
        self._log = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_file.open("a", buffering=1)
        self._bar: Progress | None = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._log is not None:
            self._log.close()

    def say(self, line: str) -> None:
        """One message line to stdout and to the log file."""
        with self._lock:
            print(line, flush=True)
            self._write_log(line)

    def note(self, line: str) -> None:
        """A progress line to stderr (stdout keeps the results) and to the log file."""
        with self._lock:
            self.console.print(line, highlight=False, soft_wrap=True)
            self._write_log(line)

    def _write_log(self, line: str) -> None:
        if self._log is not None:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._log.write(f"{stamp} {line}\n")

    def progress(self, description: str) -> ProgressFactory:
        """A wrapper for an iterable of finished items (chunks) whose total is known."""
        def wrap(items: Iterable[T], total: int) -> Iterator[T]:
            if self.interactive:
                yield from self._bar_items(description, items, total)
            else:
                yield from self._line_items(description, items, total)
        return wrap

    def _bar_items(self, description: str, items: Iterable[T], total: int) -> Iterator[T]:
        with self._lock:
            if self._bar is None:
                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=True)
                self._bar.start()
            task = self._bar.add_task(description, total=total)
        for item in items:
            yield item
            self._bar.advance(task)
        self._bar.remove_task(task)
        with self._lock:
            self._write_log(f"{description}: {total}/{total} (100 %)")

    def _line_items(self, description: str, items: Iterable[T], total: int) -> Iterator[T]:
        start = last_time = time.monotonic()
        last_percent = 0.0
        for done, item in enumerate(items, start=1):
            yield item
            now, percent = time.monotonic(), 100.0 * done / max(total, 1)
            if done == total or percent - last_percent >= self.step_percent or now - last_time >= self.every_seconds:
                self.note(f"{description}: {done}/{total} ({percent:.0f} %), {now - start:.1f} s")
                last_time, last_percent = now, percent
