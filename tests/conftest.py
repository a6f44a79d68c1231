"""Test-wide settings: highest matmul precision so float32 comparisons are meaningful, and one
persistent compilation cache for the training processes the tests start (tests/configs/tiny.py
reads it), so the same programs are compiled once per session, not once per process.

Under pytest-xdist each worker gets its own subdirectory: JAX writes cache entries in place, so a
worker could otherwise read an entry that another is still writing."""

import os
import shutil
import tempfile

import jax

jax.config.update("jax_default_matmul_precision", "highest")

_CACHE_VARIABLE = "MLNET_JAX_TEST_COMPILATION_CACHE"
_OWN_CACHE = None if _CACHE_VARIABLE in os.environ else tempfile.mkdtemp(prefix="mlnet_jax_test_cache_")
if _OWN_CACHE:
    os.environ[_CACHE_VARIABLE] = _OWN_CACHE
if "PYTEST_XDIST_WORKER" in os.environ:  # set by xdist in each worker, after the parent's import
    os.environ[_CACHE_VARIABLE] = os.path.join(os.environ[_CACHE_VARIABLE],
                                               os.environ["PYTEST_XDIST_WORKER"])


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
