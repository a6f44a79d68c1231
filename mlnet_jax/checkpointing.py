"""Orbax checkpoints of a training run, and reading them back for prediction.

A workdir holds ``checkpoints/`` (the last K, saved every N steps and at each epoch end) and
``best/`` (the checkpoint with the lowest validation loss); a run resumes from the latest of
``checkpoints/``, or from ``best/`` where ``checkpoints/`` holds none (deleted to free space,
say: starting over would replace the best model and the log). Each checkpoint has three items:
``state`` (step, parameters, optimiser state, RNG), ``data`` (the input iterator's position)
and ``meta`` (the config, the model description that prediction needs, and the progress of
early stopping). Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a checkpoint cut short by a crash is never taken as the latest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import UserError
from mlnet_jax.optim import merge_params

LATEST_DIR, BEST_DIR = "checkpoints", "best"


def _manager(directory: Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           cleanup_tmp_directories=not read_only,
                                           enable_async_checkpointing=False, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_names=("state", "data", "meta"))


class RunCheckpoints:
    """The latest-K and best checkpoint managers of one training workdir."""

    def __init__(self, workdir: str | Path, keep: int):
        workdir = Path(workdir)
        self.latest = _manager(workdir / LATEST_DIR, keep)
        self.best = _manager(workdir / BEST_DIR, 1)

    def latest_step(self) -> int | None:
        """The step a run resumes from: the latest in checkpoints/, else best/'s."""
        return self._resume_manager().latest_step()

    @property
    def resume_dir(self) -> Path:
        return Path(self._resume_manager().directory)

    def _resume_manager(self) -> ocp.CheckpointManager:
        if self.latest.latest_step() is None and self.best.latest_step() is not None:
            return self.best
        return self.latest

    def save(self, step: int, state, data_state: dict, meta: dict, is_best: bool = False) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        # Best first: a crash between the two saves then replays this step, saving both.
        quiet = _QuietWriteFailures()
        try:
            # best/ keeps one checkpoint: Orbax retires the previous best once the new one is saved.
            # The state of a step already in checkpoints/ is this run's: saving that step
            # again (after its evaluation) only updates the meta. A best/ of the same step is
            # always written again: it may be another run's (one whose checkpoints/ was
            # deleted to start over, or a start killed between the two saves).
            for manager, wanted in ((self.best, is_best), (self.latest, True)):
                if not wanted:
                    continue
                if manager is self.latest and manager.latest_step() == step:
                    _rewrite_meta(manager, step, meta)
                else:
                    if manager.latest_step() == step:
                        manager.delete(step)
                    with quiet:
                        manager.save(step, args=args, force=True)
        except (OSError, ValueError) as e:
            if not _is_write_failure(e):
                raise
            quiet.keep()  # Orbax's threads go on reporting the same failure
            code = getattr(e, "errno", None)
            if code is None and (found := re.search(r"os_error_code='(\d+)'", str(e))):
                code = int(found[1])  # tensorstore's, whose message names every path involved
            reason = os.strerror(code) if code else str(e).splitlines()[0]
            previous = self.latest.latest_step()
            full = code == errno.ENOSPC or "RESOURCE_EXHAUSTED" in str(e)
            what = "best checkpoint" if manager is self.best else "checkpoint"
            kept = (f"{LATEST_DIR}/ holds step {previous}, intact" if previous is not None
                    else f"no checkpoint was written yet in {LATEST_DIR}/")
            raise UserError(f"could not write the {what} of step {step} in {manager.directory} "
                            f"({reason}); {kept}: {'free space' if full else 'fix that'} and "
                            "rerun to resume") from None

    def restore(self, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of the step to resume from (``latest_step``)."""
        restored = self._read(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        return restored.state, restored.data, restored.meta

    def read_meta(self) -> dict:
        return self._read(meta=ocp.args.JsonRestore()).meta

    def _read(self, **items):
        manager = self._resume_manager()
        step = manager.latest_step()
        try:
            return manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 — Orbax's and tensorstore's errors vary
            if not _unreadable(e):
                raise
            _ignore_closed_loop_errors()
            older = [s for s in manager.all_steps() if s < step]
            if older:
                then = f"resume from step {max(older)}"
            elif manager is self.latest and self.best.latest_step() is not None:
                then = f"resume from {BEST_DIR}/ (step {self.best.latest_step()})"
            else:
                then = "start over (or use another --workdir)"
            raise UserError(f"{Path(manager.directory) / str(step)}: cannot read this checkpoint "
                            f"({_reason(e)}); it is damaged or incomplete: move it out of "
                            f"{manager.directory} and rerun to {then}") from None

    def close(self) -> None:
        for manager in (self.latest, self.best):
            _close(manager)


def _is_write_failure(error: BaseException) -> bool:
    """An OSError, or tensorstore's ValueError for one (RESOURCE_EXHAUSTED, os_error_code)."""
    return isinstance(error, OSError) or (isinstance(error, ValueError) and (
        "RESOURCE_EXHAUSTED" in str(error) or "os_error_code" in str(error)))


def _unreadable(error: BaseException) -> bool:
    """A file of the checkpoint missing, cut short or garbled: an OSError, a JSON error, or
    tensorstore's status (NOT_FOUND, OUT_OF_RANGE, DATA_LOSS…); not the device or host running
    out of memory, nor a state of another structure (a bug, not the files)."""
    if isinstance(error, OSError | json.JSONDecodeError):
        return True
    status = re.match(r"([A-Z_]+): ", str(error))
    return (isinstance(error, ValueError) and status is not None
            and status.group(1) != "RESOURCE_EXHAUSTED")


def _reason(error: BaseException) -> str:
    """The first line of an Orbax/tensorstore error, without tensorstore's JSON spec and the
    database it read (the step directory is named beside it)."""
    text = (str(error).splitlines() or [type(error).__name__])[0]
    text = text.split(" [tensorstore_spec")[0].split(" in OCDBT database")[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _ignore_closed_loop_errors() -> None:
    """For good, after a failed read: tensorstore's reads still in flight complete into
    Orbax's closed event loop, each printing 'Event loop is closed' with a traceback (dozens,
    some after the one-line report)."""
    if not getattr(sys.unraisablehook, "ignores_closed_loop", False):
        sys.unraisablehook = _unless_closed_loop(sys.unraisablehook)


def _unless_closed_loop(hook):
    def filtered(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)
    filtered.ignores_closed_loop = True
    return filtered


class _QuietWriteFailures:
    """While a save runs, and for good once one failed to write: Orbax's threads each log
    the write failure with its traceback, asyncio logs those of its futures, and tensorstore's
    writes still in flight complete into Orbax's closed event loop, each printing 'Event loop
    is closed'. ``save`` reports the failure in one line, which dozens of tracebacks (some
    after it) would bury. Other records and other unraisable errors pass."""

    def __init__(self):
        # Orbax logs through absl; asyncio logs its futures' errors that no one retrieved.
        self._loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
        self._hook_before = None
        self._kept = False

    def __enter__(self):
        for logger in self._loggers:
            logger.addFilter(self._not_a_write_failure)
        self._hook_before = sys.unraisablehook
        sys.unraisablehook = _unless_closed_loop(self._hook_before)
        return self

    def __exit__(self, *exc_info):
        if not self._kept:
            for logger in self._loggers:
                logger.removeFilter(self._not_a_write_failure)
            sys.unraisablehook = self._hook_before

    def keep(self) -> None:
        """Install again, for good: the run stops with the one-line report."""
        self.__enter__()
        self._kept = True

    @staticmethod
    def _not_a_write_failure(record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_write_failure(record.exc_info[1]))


def _close(manager: ocp.CheckpointManager) -> None:
    """Close after the clean-up of unfinished saves that Orbax starts in a thread when the
    manager is made: its ``close`` does not wait for that thread, which then prints a
    traceback when the process exits right after (an early config error). The waiting method
    is private (orbax-checkpoint 0.12.8); where it is absent, close as Orbax does."""
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait is not None:
        with contextlib.suppress(Exception):  # a failed clean-up must not hide the real error
            wait()
    manager.close()


def _rewrite_meta(manager: ocp.CheckpointManager, step: int, meta: dict) -> None:
    """Replace the ``meta`` item of an existing checkpoint, atomically (the JSON file Orbax's
    JSON handler wrote)."""
    path = Path(manager.directory) / str(step) / "meta" / "metadata"
    if not path.is_file():
        raise UserError(f"{path}: missing; cannot update this checkpoint's progress record")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta))


def _step_dir_for(path: Path) -> Path:
    """A single checkpoint directory from a workdir (best, else latest), its ``best/`` or
    ``checkpoints/`` folder (the last step there), or a step directory."""
    if (path / "state").is_dir() and (path / "meta").is_dir():
        return path
    for folder in (path / BEST_DIR, path / LATEST_DIR, path):
        if folder.is_dir():
            steps = sorted((int(p.name) for p in folder.iterdir()
                            if p.name.isdigit() and (p / "state").is_dir()), reverse=True)
            if steps:
                return folder / str(steps[0])
    raise UserError(f"{path}: no checkpoint found (expected a training workdir with {BEST_DIR}/ or "
                    f"{LATEST_DIR}/, one of those folders, or one checkpoint directory with "
                    "state/ and meta/)")


def stored_config(path: str | Path) -> dict | None:
    """The training config saved with a workdir's or checkpoint directory's checkpoint."""
    try:
        step_dir = _step_dir_for(Path(path).absolute())
    except UserError:
        return None
    try:
        return _read_meta(step_dir).get("config")
    except Exception as e:  # noqa: BLE001 — Orbax's errors for a damaged directory vary
        if not _unreadable(e):
            raise
        raise _damaged(step_dir, e) from None


def _read_meta(step_dir: Path) -> dict:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(step_dir / "meta")


def _damaged(step_dir: Path, error: BaseException) -> UserError:
    """The one-line report of a checkpoint directory that cannot be read, naming the others."""
    _ignore_closed_loop_errors()
    workdir = step_dir.parent.parent
    others = sorted((d for folder in (workdir / BEST_DIR, workdir / LATEST_DIR) if folder.is_dir()
                     for d in folder.iterdir()
                     if d.name.isdigit() and d != step_dir and (d / "state").is_dir()),
                    key=lambda d: int(d.name))
    hint = f"; another one: {others[-1]}" if others else ""
    return UserError(f"{step_dir}: cannot read this checkpoint ({_reason(error)}); it is damaged "
                     f"or incomplete{hint}")


def restore_for_inference(path: str | Path) -> tuple[dict, dict]:
    """(params as NumPy, model metadata) from a workdir or checkpoint directory. A training
    writing to the workdir may retire the checkpoint just found: then the newer one is read."""
    params, metadata, _ = _restore(path)
    return params, metadata


def restore_best(workdir: str | Path) -> tuple[dict, int, bool]:
    """(params as NumPy, step, whether it is best/'s) of a workdir's best checkpoint, else
    its latest."""
    params, _, step_dir = _restore(workdir)
    return params, int(step_dir.name), step_dir.parent.name == BEST_DIR


def _restore(path: str | Path) -> tuple[dict, dict, Path]:
    for attempt in range(3):
        step_dir = _step_dir_for(Path(path).absolute())
        try:
            return (*_restore_params(step_dir), step_dir)
        except Exception as e:  # noqa: BLE001 — Orbax's errors (deleted mid-read, damaged) vary
            if step_dir.exists() or attempt == 2:
                if not _unreadable(e):
                    raise
                raise _damaged(step_dir, e) from None
    raise AssertionError("unreachable")


def _restore_params(step_dir: Path) -> tuple[dict, dict]:
    meta = _read_meta(step_dir)
    # As NumPy, whatever devices or processes saved it (their layout would be required).
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(step_dir / "state")
        tree = getattr(metadata, "tree", metadata)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = handler.restore(step_dir / "state",
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()
    params = merge_params(state["trainable"], state["frozen"])
    return jax.tree.map(np.asarray, params), meta["model"]
