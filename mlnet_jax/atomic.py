"""Write files so that a crash or a full disk never leaves a half-written output in place."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# Read once, at import: os.umask can only be read by setting it, which is not thread-safe later.
_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The previous file (if any) stays intact when writing fails. The file gets the mode a plain
    ``open`` would give it (0o666 less the umask), not ``mkstemp``'s owner-only 0o600.
    """
    path = Path(path)
    try:  # an error names the folder that could not be made (a file in its place)
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a folder is needed",
                                 e.filename) from None
    try:  # an error names the file asked for, not the temporary one
        # The name is cut (in bytes: 255 is the usual limit) so that a legal long name keeps a
        # legal temporary one.
        fd, tmp = tempfile.mkstemp(prefix=f".{_cut(path.name, 200)}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _cut(name: str, most_bytes: int) -> str:
    """The longest start of ``name`` whose file-system encoding fits in ``most_bytes``."""
    while len(os.fsencode(name)) > most_bytes:
        name = name[:-1]
    return name
