"""An exclusive, advisory lock on a file, released when the holder exits or is killed.

``flock`` rather than a marker file: a killed holder leaves no stale lock behind, so what a
killed run left (a half-written dataset, say) can be recognised and cleaned by the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mlnet_jax.errors import UserError


@contextlib.contextmanager
def exclusive_lock(path: Path, busy_message: str) -> Iterator[None]:
    """Hold ``path``'s lock for the block; UserError(busy_message) if another process holds
    it. Without ``fcntl`` (not POSIX) nothing is locked."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        yield
        return
    try:
        file = open(path, "a")  # noqa: SIM115 — closed below, which releases the lock
    except OSError as e:
        raise UserError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(busy_message) from None
        yield  # closing the file releases the lock
