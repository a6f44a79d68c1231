"""The persistent XLA compilation cache that `train` and `predict` turn on, healed when an
entry cannot be read.

JAX writes an entry in place and never replaces one that exists, so a process killed while
writing (a preempted Colab runtime) leaves a truncated entry behind, and every later start
warns "Error reading persistent compilation cache entry" and compiles again, forever. When
JAX reports such an entry, its function's entries are deleted before the compile that follows
writes them anew: the next start is warm again.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import jax

_UNREADABLE = "Error reading persistent compilation cache entry for"
_FUNCTION = re.compile(re.escape(_UNREADABLE) + r" '([^']+)'")
_installed = False
_ours: str | None = None  # the directory this module set, and JAX's setting before it
_before_ours: str | None = None


def enable_compilation_cache(directory: str, option: str = "compilation cache") -> None:
    """Persistent XLA compilation cache in ``directory``, so a restart loads its programs
    instead of compiling them. '' turns off a cache an earlier call in this process turned on
    (a notebook's second run went on writing into the first's directory), leaving JAX's own
    setting (``JAX_COMPILATION_CACHE_DIR``) as it was. A directory that cannot be made or
    written is skipped with one warning naming ``option``: the cache only saves time."""
    global _ours, _before_ours
    if not directory:
        if _ours is not None and jax.config.jax_compilation_cache_dir == _ours:
            _use_cache_directory(_before_ours)
        _ours = None
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable, reason = os.access(path, os.W_OK | os.X_OK), "not writable"
    except OSError as e:
        writable = False
        reason = "not a directory" if path.exists() else e.strerror or str(e)
    if not writable:
        logging.getLogger(__name__).warning(
            "%s %s: %s; compiling without the persistent cache", option, path, reason)
        return
    if jax.config.jax_compilation_cache_dir != str(path):
        if _ours is None:
            _before_ours = jax.config.jax_compilation_cache_dir
        _use_cache_directory(str(path))
        _ours = str(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    global _installed
    if not _installed:
        _heal_entries_jax_reports_unreadable()
        _installed = True


def _use_cache_directory(directory: str | None) -> None:
    """Point JAX at ``directory`` (None: no cache) and drop the cache it opened: a notebook
    training again with another directory, or with none, went on writing into the first."""
    jax.config.update("jax_compilation_cache_dir", directory)
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415
    compilation_cache.reset_cache()


def _heal_entries_jax_reports_unreadable() -> None:
    """Every warning JAX gives about an unreadable entry (each one, not once per location)
    deletes that function's entries first; the warning itself is still shown."""
    warnings.filterwarnings("always", message=re.escape(_UNREADABLE))
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        match = _FUNCTION.search(str(message))
        if match:
            _delete_unreadable_function(match.group(1))
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _delete_unreadable_function(function_name: str) -> None:
    """Delete the unreadable entries of ``function_name`` (file names ``<function>-<hash>-cache``
    and their ``-atime`` stamps) in the cache directory in use. JAX names the function, not
    the entry: those that do not decompress are deleted, and if all do (the failure came
    later, in deserialising), every entry of the function, whose other shapes then compile
    once again."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        return
    own = re.compile(re.escape(function_name) + r"-[0-9a-f]{64}-cache")  # nothing else
    entries = [e for e in Path(directory).iterdir() if own.fullmatch(e.name)]
    unreadable = [e for e in entries if not _decompresses(e)] or entries
    removed = []
    for entry in unreadable:
        for path in (entry, entry.with_name(entry.name[:-len("cache")] + "atime")):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    if removed:
        logging.getLogger(__name__).warning(
            "compilation cache: deleted %d file(s) of %r in %s, one unreadable (a process was "
            "probably killed while writing it); compiled and written again now", len(removed),
            function_name, directory)


def _decompresses(entry: Path) -> bool:
    """Whether a cache file decompresses as JAX reads it (one cut short by a killed write does
    not); True where that cannot be told (JAX's private helper moved)."""
    try:
        from jax._src.compilation_cache import decompress_executable  # noqa: PLC0415
    except ImportError:
        return True
    try:
        decompress_executable(entry.read_bytes())
    except OSError:
        return True  # unreadable for another reason: not ours to judge
    except Exception:  # noqa: BLE001 — zstd's and zlib's errors
        return False
    return True
