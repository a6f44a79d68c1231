"""Ctrl-C and SIGTERM as one line and exit status 130/143 in every command.

SIGTERM (a Colab disconnect, ``kill``, a job scheduler) is raised as an exception, as Ctrl-C
is, so the files being written are removed on the way out (``atomic_path``) and a dataset set
aside by ``prepare --overwrite`` is put back; its default action killed the process there,
leaving them. Training has its own handling (it saves a checkpoint first: ``train``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as KeyboardInterrupt is for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` (from the main thread only, where
    handlers can be set; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped(error: KeyboardInterrupt, what: str) -> int:
    """Say in one line that the command was stopped and ``what`` of its work is as it should
    be; the exit status a shell gives a process stopped by that signal."""
    terminated = isinstance(error, Terminated)
    print(f"{'terminated' if terminated else 'interrupted'}; {what}", file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
