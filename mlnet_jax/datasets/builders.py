"""TFDS builders (``array_record``, no TensorFlow) for SALICON, MIT1003, CAT2000 and folders.

Images and maps are stored as encoded bytes in ``Tensor(shape=(), dtype=object)`` features, not
``tfds.features.Image``: the pipeline decodes them itself (letterboxing needs the original
pixels), a test split stores empty map bytes, and no image is re-encoded. Builders are not
registered with TFDS (``skip_registration``): re-importing this module, or a future TFDS dataset
of the same name, cannot collide; :func:`get_builder` is the lookup.
"""

from __future__ import annotations

import abc
import collections
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from mlnet_jax.datasets import layouts
from mlnet_jax.datasets.layouts import Item
from mlnet_jax.datasets.records import make_record
from mlnet_jax.errors import UserError

_HOMEPAGE = {
    "salicon": "http://salicon.net/",
    "mit1003": "https://people.csail.mit.edu/tjudd/WherePeopleLook/",
    "cat2000": "http://saliency.mit.edu/results_cat2000.html",
}
_CITATION = {
    "salicon": "Jiang, Huang, Duan, Zhao. SALICON: Saliency in Context. CVPR 2015.",
    "mit1003": "Judd, Ehinger, Durand, Torralba. Learning to predict where humans look. "
               "ICCV 2009.",
    "cat2000": "Borji, Itti. CAT2000: A Large Scale Fixation Dataset for Boosting Saliency "
               "Research. CVPR 2015 workshop (arXiv:1505.03581).",
}


def features() -> tfds.features.FeaturesDict:
    """The record schema of :mod:`mlnet_jax.datasets.records` as TFDS features."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "image_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "saliency_map": tfds.features.Tensor(shape=(), dtype=np.object_),
        "fixations": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        "file_name": tfds.features.Text(),
        "category": tfds.features.Text(),
    })


def ordered_map(fn: Callable[[Item], dict], items: list[Item], workers: int,
                window: int = 64) -> Iterator[dict]:
    """``map(fn, items)`` on a thread pool (PIL and zlib release the GIL), in order, with at
    most ``window`` results in memory."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _SaliencyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation: scan the layout, then decode and check each record on threads."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    HOMEPAGE = ""
    CITATION = ""
    DESCRIPTION = ""
    # Threads that read and check files while generating (0: os.cpu_count(), at most 8).
    generation_workers: int = 0
    progress: bool = True

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup imports the `importlib_resources` backport, which TFDS only
        # requires on Python < 3.9; the file defining the class is what it would find anyway.
        return epath.Path(inspect.getfile(cls))

    def is_prepared(self) -> bool:
        """TFDS's answer, without its warning that the version folder has no
        dataset_info.json: callers say in one line that the dataset is not prepared and how
        to prepare it."""
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_no_dataset_info_warning)
        try:
            return super().is_prepared()
        finally:
            absl_logger.removeFilter(_no_dataset_info_warning)

    @abc.abstractmethod
    def _layout(self, manual_dir: Path) -> dict[str, list[Item]]:
        """split name → items, from :mod:`mlnet_jax.datasets.layouts`."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=features(),
            homepage=self.HOMEPAGE, citation=self.CITATION)

    #: (manual_dir, splits) of the last :meth:`scan`, which the build that follows reuses:
    #: scanning again would say each warning (files skipped) twice.
    scanned: tuple[str, dict[str, list[Item]]] | None = None

    def scan(self, manual_dir: str | Path) -> dict[str, list[Item]]:
        """The items of each split, with every layout problem raised as a UserError."""
        splits = self._layout(layouts.check_manual_dir(manual_dir))
        empty = [name for name, items in splits.items() if not items]
        if empty:
            raise UserError(f"{manual_dir}: no images for split(s) {', '.join(empty)}")
        self.scanned = (str(Path(manual_dir)), splits)
        return splits

    def _split_generators(self, dl_manager):
        # Our own check first: TFDS's message for a missing manual dir is several lines.
        manual_dir = getattr(dl_manager, "_manual_dir", None)
        if manual_dir is None:
            raise UserError(f"{self.name} needs --manual_dir:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        manual_dir = str(Path(manual_dir))
        splits = (self.scanned[1] if self.scanned and self.scanned[0] == manual_dir
                  else self.scan(manual_dir))
        return {name: self._generate_examples(items, name) for name, items in splits.items()}

    def _generate_examples(self, items: Iterable[Item], split: str = ""):
        items = list(items)
        workers = self.generation_workers or min(8, os.cpu_count() or 1)
        with tqdm(total=len(items), desc=f"{self.name} {split}", unit="img",
                  disable=not self.progress, leave=True) as bar:
            for item, record in zip(items, ordered_map(make_record, items, workers)):
                bar.update(1)
                yield item.key, record


_SALICON_INSTRUCTIONS = """\
Download SALICON from http://salicon.net/ and put, under --manual_dir:
  images/train/COCO_train2014_<12 digits>.jpg   images/val/COCO_val2014_*.jpg
  images/test/COCO_test2014_*.jpg (optional)
  maps/train/<same stem>.png                      maps/val/<same stem>.png
  fixations/train/<same stem>.mat                 fixations/val/<same stem>.mat
(the .mat files hold a `gaze` struct array whose `fixations` are N×2 1-based (x, y)).
"""


class Salicon2015(_SaliencyBuilder, skip_registration=True):
    """SALICON, 2015 (LSUN'15) edition: the maps and fixations the original ML-Net used."""

    name = "salicon2015"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _SALICON_INSTRUCTIONS
    HOMEPAGE = _HOMEPAGE["salicon"]
    CITATION = _CITATION["salicon"]
    DESCRIPTION = "SALICON 2015: 10000 train / 5000 validation / 5000 test (no maps) images."

    def _layout(self, manual_dir: Path) -> dict[str, list[Item]]:
        return layouts.salicon(manual_dir)


class Salicon2017(Salicon2015, skip_registration=True):
    """SALICON, 2017 (LSUN'17) edition: same images and layout, re-processed maps and fixations."""

    name = "salicon2017"
    DESCRIPTION = "SALICON 2017: 10000 train / 5000 validation / 5000 test (no maps) images."


class Mit1003(_SaliencyBuilder, skip_registration=True):
    """MIT1003 with a fixed-seed 900 / 103 train / validation split."""

    name = "mit1003"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download ALLSTIMULI.zip and ALLFIXATIONMAPS.zip from
https://people.csail.mit.edu/tjudd/WherePeopleLook/ and unzip both under --manual_dir:
  ALLSTIMULI/<name>.jpeg   ALLFIXATIONMAPS/<name>_fixMap.jpg   ALLFIXATIONMAPS/<name>_fixPts.jpg
"""
    HOMEPAGE = _HOMEPAGE["mit1003"]
    CITATION = _CITATION["mit1003"]
    DESCRIPTION = (f"MIT1003: train / validation = 900 / 103 from seed {layouts.SPLIT_SEED}; "
                   "fixations from _fixPts (> 127).")

    def _layout(self, manual_dir: Path) -> dict[str, list[Item]]:
        return layouts.mit1003(manual_dir)


class Cat2000(_SaliencyBuilder, skip_registration=True):
    """CAT2000 training set, split 90 / 10 per category from a fixed seed."""

    name = "cat2000"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the CAT2000 training set (trainSet.zip) from http://saliency.mit.edu/ and unzip it
under --manual_dir:
  trainSet/Stimuli/<Category>/<NNN>.jpg   trainSet/FIXATIONMAPS/<Category>/<NNN>.jpg
  trainSet/FIXATIONLOCS/<Category>/<NNN>.mat (variable fixLocs: binary, image-sized)
"""
    HOMEPAGE = _HOMEPAGE["cat2000"]
    CITATION = _CITATION["cat2000"]
    DESCRIPTION = (f"CAT2000 train set: 1800 train / 200 validation, 10% per category from seed "
                   f"{layouts.SPLIT_SEED}.")

    def _layout(self, manual_dir: Path) -> dict[str, list[Item]]:
        return layouts.cat2000(manual_dir)


class Folder(_SaliencyBuilder, skip_registration=True):
    """Any folder of images and maps matched by stem; ``train`` + optional ``validation``."""

    name = "folder"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put under --manual_dir: images/<stem>.<jpg|png|...>, maps/<stem>.<png|jpg|...> (grey-level
saliency maps) and optionally fixations/<stem>.mat (variable `fixations`, N×2 1-based (x, y))
or fixations/<stem>.png (binary: > 127 is a fixation).
"""
    DESCRIPTION = "A folder of images and saliency maps matched by file stem."

    def __init__(self, *, validation_fraction: float = layouts.FOLDER_VALIDATION_FRACTION,
                 **kwargs):
        self.validation_fraction = validation_fraction
        super().__init__(**kwargs)

    def _layout(self, manual_dir: Path) -> dict[str, list[Item]]:
        return layouts.folder(manual_dir, validation_fraction=self.validation_fraction)


BUILDERS: dict[str, type[_SaliencyBuilder]] = {
    cls.name: cls for cls in (Salicon2015, Salicon2017, Mit1003, Cat2000, Folder)}


def get_builder(name: str, data_dir: str | os.PathLike | None = None,
                **kwargs) -> _SaliencyBuilder:
    """A builder for ``name`` reading/writing under ``data_dir`` (TFDS default when None)."""
    if name not in BUILDERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(BUILDERS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None  # '~/tfds' in a flag
    try:
        return BUILDERS[name](data_dir=data_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 — TFDS reading a damaged dataset_info.json
        info = next(Path(data_dir or tfds.core.constants.DATA_DIR).expanduser().glob(
            f"{name}/*/dataset_info.json"), None)
        if info is None or "JSON" not in str(e):
            raise
        raise UserError(f"{info}: cannot read it ({str(e).splitlines()[0]}); the prepared dataset "
                        f"is damaged: delete {info.parent} and prepare it again") from None


def check_shards(builder: _SaliencyBuilder, splits: Sequence[str] | None = None) -> None:
    """Each split's (or each of ``splits``') record files exist, are whole, and hold the
    records dataset_info.json counts: a copy cut short would otherwise fail at its first
    read, inside the input pipeline's workers (grain's traceback), or part-way through an
    epoch."""
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    for split, info in builder.info.splits.items():
        if splits is not None and split not in splits:
            continue
        for path, expected in zip(info.filepaths, info.shard_lengths):
            if not os.path.exists(path):
                raise UserError(f"{path}: missing, one of the {split} split's record files; the "
                                "prepared dataset is damaged: prepare it again with --overwrite")
            try:
                reader = ArrayRecordReader(os.fspath(path))
                count = reader.num_records()
                reader.close()  # raises where the file is cut short
            except Exception as e:  # noqa: BLE001 — array_record's RuntimeErrors
                problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            else:
                if count == expected:
                    continue
                problem = f"{count} records, dataset_info.json says {expected}"
            raise UserError(f"{path}: the {split} split's records cannot be read ({problem}); the "
                            f"prepared dataset is damaged: prepare it again with --overwrite")


def _no_dataset_info_warning(record: logging.LogRecord) -> bool:
    """False for TFDS's warning that a dataset's version folder has no dataset_info.json."""
    message = record.getMessage()
    return not (message.startswith("Variant folder") and "dataset_info.json" in message)
