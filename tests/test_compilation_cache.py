"""The persistent compilation cache heals itself: an entry truncated by a killed process is
deleted when JAX reports it unreadable, written again by the compile that follows, and the
start after that loads it without a warning."""

import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = """
import sys
import jax, jax.numpy as jnp
from mlnet_jax.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
print(float(jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((n, 8)))) / n / n * 64)
"""
UNREADABLE = "Error reading persistent compilation cache entry"


def start(cache_dir, rows=8):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir), str(rows)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) == pytest.approx(64 * np.tanh(8.0), rel=1e-6)  # the same program
    return result.stderr


def test_an_entry_truncated_by_a_killed_process_is_written_again(tmp_path):
    assert UNREADABLE not in start(tmp_path)
    entries = {p.name: p.stat().st_size for p in tmp_path.glob("*-cache")}
    assert any(name.startswith("jit__lambda-") for name in entries)
    for name in entries:  # what a process killed mid-write leaves
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:20])
    bystander = tmp_path / "jit__lambda-notes.txt"  # not a JAX entry: never deleted
    bystander.write_text("mine")

    healing = start(tmp_path)
    assert UNREADABLE in healing and "jit__lambda" in healing
    assert "compilation cache: deleted" in healing
    rewritten = {p.name: p.stat().st_size for p in tmp_path.glob("*-cache")}
    assert rewritten.keys() == entries.keys()  # each deleted and written again, whole:
    assert all(size > 20 for size in rewritten.values())  # the next start reads them

    assert UNREADABLE not in start(tmp_path)  # warm again
    assert bystander.read_text() == "mine"


def test_a_directory_that_cannot_be_written_is_skipped_with_one_warning(tmp_path, caplog):
    import jax

    from mlnet_jax.compilation_cache import enable_compilation_cache
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    before = jax.config.jax_compilation_cache_dir
    with caplog.at_level("WARNING"):
        enable_compilation_cache(str(not_a_directory), "config.compilation_cache_dir")
    assert jax.config.jax_compilation_cache_dir == before  # the cache stays as it was
    (record,) = caplog.records
    assert record.getMessage().startswith(f"config.compilation_cache_dir {not_a_directory}: not a directory")
    assert "compiling without the persistent cache" in record.getMessage()


SWITCH = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp
from mlnet_jax.compilation_cache import enable_compilation_cache
jax.jit(lambda x: x + 1)(jnp.ones(3))  # the process compiled before
for directory in sys.argv[1:]:  # as a notebook training twice, with two cache directories
    enable_compilation_cache(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * len(directory))(jnp.ones((8, 8))).block_until_ready()
    print(len(list(Path(directory or sys.argv[1]).glob("*-cache"))))
"""


def test_each_directory_asked_for_in_one_process_is_the_one_used(tmp_path):
    """JAX keeps the cache it opened: a directory set after it (a notebook training again with
    another compilation_cache_dir) was never written."""
    first, second = tmp_path / "a", tmp_path / "bb"
    result = subprocess.run([sys.executable, "-c", SWITCH, str(first), str(second)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first_entries, second_entries = (int(n) for n in result.stdout.split())
    assert first_entries >= 1 and second_entries >= 1  # the second was never written


def test_an_empty_directory_turns_off_the_cache_an_earlier_call_turned_on(tmp_path):
    """'' is documented as "no cache": after a first training with the cache in one process, a
    second with compilation_cache_dir='' went on writing into the first one's directory."""
    first = tmp_path / "a"
    result = subprocess.run([sys.executable, "-c", SWITCH, str(first), ""],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with_cache, after_turning_it_off = (int(n) for n in result.stdout.split())
    assert with_cache >= 1
    assert after_turning_it_off == with_cache  # nothing written into the first directory
    # JAX's own setting (the environment's) is not ours to turn off.
    own = tmp_path / "own"
    result = subprocess.run([sys.executable, "-c", SWITCH, ""], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(own)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(own.glob("*-cache"))) >= 1


def test_only_the_unreadable_entry_of_a_function_is_deleted(tmp_path):
    """JAX names the function, not the entry: every entry of that name was deleted, so the
    other shapes (another config's train step, say) compiled cold again."""
    start(tmp_path, rows=8)
    (first,) = tmp_path.glob("jit__lambda-*-cache")
    start(tmp_path, rows=16)
    (other,) = set(tmp_path.glob("jit__lambda-*-cache")) - {first}
    kept = other.read_bytes(), other.stat().st_mtime_ns
    first.write_bytes(first.read_bytes()[:20])

    healing = start(tmp_path, rows=8)
    assert UNREADABLE in healing and "compilation cache: deleted" in healing, healing
    assert (other.read_bytes(), other.stat().st_mtime_ns) == kept
    assert first.stat().st_size > 20  # written again
    assert UNREADABLE not in start(tmp_path, rows=16)


def test_a_directory_switched_away_from_is_not_the_one_turned_back_to(tmp_path):
    """A → B → '' in one process (a notebook training three times): '' restores the setting
    from before the first directory of ours (none here), not A. Remembering the setting before
    each switch instead, '' would turn the cache back on in A and go on writing there."""
    first, second = tmp_path / "a", tmp_path / "bb"
    result = subprocess.run([sys.executable, "-c", SWITCH, str(first), str(second), ""],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    in_first, in_second, in_first_after_turning_off = (int(n) for n in result.stdout.split())
    assert in_first >= 1 and in_second >= 1
    assert in_first_after_turning_off == in_first  # nothing more written into A
    assert len(list(second.glob("*-cache"))) == in_second  # nor into B


def test_a_directory_under_home_is_expanded(tmp_path):
    """'~/c' (the default is '~/.cache/…') is the home's c: used unexpanded, JAX's setting
    would be the literal '~/c', and a folder named '~' would be made in the current one."""
    code = ("import jax; from mlnet_jax.compilation_cache import enable_compilation_cache; "
            "enable_compilation_cache('~/c'); print(jax.config.jax_compilation_cache_dir)")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=work, env={**os.environ, "HOME": str(tmp_path),
                                                        "PYTHONPATH": _package_root()})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (work / "~").exists()


def _package_root() -> str:
    """The folder holding mlnet_jax, for a subprocess started in another directory."""
    from pathlib import Path

    import mlnet_jax
    root = str(Path(mlnet_jax.__file__).parent.parent)
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
