"""``python -m mlnet_jax.datasets.prepare NAME --manual_dir DIR [--data_dir DIR]``.

Checks the manual download's layout, writes ``array_record`` files with a progress bar, prints
the records per split, and warns (without failing) when a split's size differs from the
official one — a subset may be prepared on purpose. Errors are one line; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from mlnet_jax.datasets import DATASET_NAMES
from mlnet_jax.errors import UserError
from mlnet_jax.interrupts import sigterm_raises, stopped
from mlnet_jax.file_lock import exclusive_lock

log = logging.getLogger("mlnet_jax.datasets")
#: Written beside TFDS's files: the folder and split fraction a dataset was prepared from.
PROVENANCE_FILE = "prepared_from.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlnet_jax.datasets.prepare",
        description="Prepare a manually downloaded saliency dataset as TFDS array_record files.")
    p.add_argument("name", choices=DATASET_NAMES, help="dataset to prepare")
    p.add_argument("--manual_dir", required=True,
                   help="folder holding the download in its official layout")
    p.add_argument("--data_dir", default=None,
                   help="where prepared datasets live (default: $TFDS_DATA_DIR or "
                        "~/tensorflow_datasets)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete and rebuild a dataset that is already prepared")
    p.add_argument("--validation_fraction", type=float, default=None,
                   help="folder only: fraction of images held out as 'validation' (default 0.1;"
                        " 0 for none)")
    p.add_argument("--workers", type=int, default=0,
                   help="threads reading and checking files (default: CPU count, at most 8)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class _LowerLevelFormatter(logging.Formatter):
    """``warning: ...`` like the ``error: ...`` lines, one per message."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record).replace("\n", " ")


class _AboveProgressBars(logging.Handler):
    """Lines on stderr above the progress bar (a plain stream handler wrote them onto the end of
    the bar's line)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # noqa: PLC0415

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 — logging's own convention
            self.handleError(record)


@contextlib.contextmanager
def _cli_logging():
    """Warnings as ``warning: ...`` lines on stderr while the CLI runs; restored afterwards so
    that callers in the same process (tests) keep their logging."""
    handler = _AboveProgressBars()
    handler.setFormatter(_LowerLevelFormatter("%(levelname)s: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:  # TFDS logs through absl; keep its INFO/WARNING chatter out of the way.
        from absl import logging as absl_logging  # noqa: PLC0415

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = saved


def check_split_sizes(name: str, sizes: dict[str, int]) -> list[str]:
    """Warnings for split sizes that differ from the official dataset (none for ``folder``)."""
    from mlnet_jax.datasets.layouts import EXPECTED_SPLITS  # noqa: PLC0415

    expected = EXPECTED_SPLITS.get(name, {})
    messages = []
    for split, count in expected.items():
        if split == "test" and split not in sizes:
            continue  # SALICON's test images are optional (they have no maps to train on)
        got = sizes.get(split, 0)
        if got != count:
            messages.append(f"{name} split '{split}' has {got} records; the official dataset "
                            f"has {count} (fine if you prepared a subset on purpose)")
    return messages


def _previous_path(builder) -> Path:
    """Where ``--overwrite`` keeps the prepared dataset until the new one is complete."""
    return builder.data_path.with_name(f".{builder.data_path.name}.previous")


def _build_lock(builder, name: str):
    """Held while building: two prepares of one dataset would write into each other's way,
    and under it whatever a killed prepare left is known to be dead."""
    folder = Path(builder.data_path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_dir {folder.parent}: cannot write there "
                        f"({e.strerror or e})") from None
    return exclusive_lock(folder / ".lock", f"{name} is being prepared in {folder.parent} by "
                          f"another process (it holds {folder / '.lock'}); wait for it")


def _clean_up_after_a_killed_run(builder, name: str) -> bool:
    """Remove TFDS's ``incomplete.*`` folders and put back a dataset that a killed
    ``--overwrite`` had set aside. True when a dataset was put back."""
    data_path = Path(builder.data_path)
    for leftover in sorted(data_path.parent.glob(f"incomplete.*_{data_path.name}")):
        shutil.rmtree(leftover, ignore_errors=True)
        log.info("removed %s, left by a prepare that was stopped", leftover)
    previous = _previous_path(builder)
    if previous.is_dir() and not data_path.exists():
        previous.rename(data_path)
        log.warning("put back the %s prepared earlier in %s, set aside by an --overwrite that "
                    "was stopped", name, data_path)
        return True
    if previous.exists():  # the rebuild was complete; only the old copy's removal was not
        shutil.rmtree(previous, ignore_errors=True)
        log.info("removed %s, the copy an --overwrite that was stopped had kept", previous)
    return False


def _build(builder, make_builder, manual: Path, name: str):
    """Write the dataset; returns the builder that reads it."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    builder.scan(manual)  # every layout problem, before anything is written
    # --overwrite keeps the prepared dataset aside until the new one is complete (a bad file
    # is found only while writing); the remains of a failed run are just removed.
    previous = _previous_path(builder)
    if builder.data_path.exists():
        shutil.rmtree(previous, ignore_errors=True)
        if builder.is_prepared():
            builder.data_path.rename(previous)
        else:
            shutil.rmtree(builder.data_path)
        builder, scanned = make_builder(), builder.scanned  # forget the moved dataset's info
        builder.scanned = scanned
    tfds.disable_progress_bar()  # ours counts images; TFDS's does not know the total
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    except BaseException as e:
        kept = previous.exists()
        if kept:
            shutil.rmtree(builder.data_path, ignore_errors=True)
            previous.rename(builder.data_path)
            log.warning("the previously prepared %s in %s is kept", name, builder.data_dir)
        reason = _write_failure(e)
        if reason is None:
            raise
        raise UserError(f"could not write {name} in {builder.data_dir} ({reason}); nothing "
                        f"half-written is kept{', the dataset prepared before is' if kept else ''}"
                        ": free space (or fix that) and rerun") from None
    (Path(builder.data_path) / PROVENANCE_FILE).write_text(
        json.dumps(_provenance(builder, manual), indent=1) + "\n")
    shutil.rmtree(previous, ignore_errors=True)
    return builder


def _write_failure(error: BaseException) -> str | None:
    """Why writing failed, for an OSError of a full or read-only disk or array_record's
    RuntimeError for a failed write (which names every file involved); None otherwise."""
    if isinstance(error, OSError):  # a full or read-only disk; a file it reads names itself
        full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
        return (error.strerror or str(error)) if full else None
    found = re.search(r"write\(\) failed: ([^;]+)", str(error))
    return found.group(1).strip() if isinstance(error, RuntimeError) and found else None


def _provenance(builder, manual: Path) -> dict:
    """What a rerun must match to reuse the prepared dataset."""
    return {"manual_dir": str(manual.resolve()),
            "validation_fraction": getattr(builder, "validation_fraction", None)}


def _warn_if_prepared_differently(builder, manual: Path, name: str) -> None:
    """A rerun with another --manual_dir or --validation_fraction reuses the dataset as it
    is: say so, rather than let the user believe it was rebuilt from what they named."""
    try:
        recorded = json.loads((Path(builder.data_path) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return  # prepared by an older version: nothing to compare
    wanted = _provenance(builder, manual)
    for field, value in wanted.items():
        if recorded.get(field) != value:
            log.warning("%s in %s was prepared with %s %s, not %s: it is reused as it is "
                        "(--overwrite rebuilds it; another --data_dir keeps both)", name,
                        builder.data_dir, field, recorded.get(field), value)


def prepare(name: str, manual_dir: str, data_dir: str | None = None, *, overwrite: bool = False,
            validation_fraction: float | None = None, workers: int = 0,
            progress: bool = True) -> dict[str, int]:
    """Build ``name`` from ``manual_dir``; returns records per split. Raises UserError."""
    from mlnet_jax.datasets import builders, layouts  # noqa: PLC0415

    if validation_fraction is not None and name != "folder":
        raise UserError("--validation_fraction applies to the 'folder' dataset only")
    if workers < 0:
        raise UserError(f"--workers must be at least 0 (0: the CPU count, at most 8), got "
                        f"{workers}")
    if data_dir and Path(data_dir).expanduser().is_file():
        raise UserError(f"--data_dir {data_dir}: is a file; name a folder (created if missing)")
    manual = layouts.check_manual_dir(manual_dir)

    def make_builder():
        builder = builders.get_builder(name, data_dir, **(
            {"validation_fraction": validation_fraction} if name == "folder" else {}))
        builder.generation_workers = workers
        builder.progress = progress
        return builder

    builder, built = make_builder(), False
    if overwrite or not builder.is_prepared() or _previous_path(builder).exists():
        with _build_lock(builder, name):
            if _clean_up_after_a_killed_run(builder, name):
                builder = make_builder()  # read the restored dataset's info
            if overwrite or not builder.is_prepared():
                builder, built = _build(builder, make_builder, manual, name), True
    if not built:
        builders.check_shards(builder)
        _warn_if_prepared_differently(builder, manual, name)
        log.info("%s is already prepared in %s (use --overwrite to rebuild)", name,
                 builder.data_dir)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    for message in check_split_sizes(name, sizes):
        log.warning("%s", message)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with _cli_logging(), sigterm_raises():
            sizes = prepare(args.name, args.manual_dir, args.data_dir, overwrite=args.overwrite,
                            validation_fraction=args.validation_fraction, workers=args.workers)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        return stopped(e, "nothing half-written is kept (a dataset prepared before is as it was)")
    from mlnet_jax.datasets import builders  # noqa: PLC0415

    where = builders.get_builder(args.name, args.data_dir).data_dir
    print(f"{args.name}: prepared in {where}")
    for split, count in sizes.items():
        print(f"  {split:<12} {count:>7} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
