"""Where the files of each dataset are, as distributed, and which split each image goes to.

Scanning only lists and matches files (no decoding), so every layout problem — a missing
folder, images without maps or the reverse — is reported before anything is written.

Layouts (``DIR`` is ``--manual_dir``):

- SALICON 2015 / 2017: ``DIR/images/{train,val,test}/<stem>.jpg``,
  ``DIR/maps/{train,val}/<stem>.png``, ``DIR/fixations/{train,val}/<stem>.mat``.
  Splits ``train``, ``validation`` (the ``val`` folders) and ``test`` (images only; optional).
- MIT1003: ``DIR/ALLSTIMULI/<stem>.jpeg`` and ``DIR/ALLFIXATIONMAPS/<stem>_fixMap.jpg`` /
  ``<stem>_fixPts.jpg``. Split ``train`` / ``validation`` = 900 / 103, a permutation of the
  sorted stems by ``numpy.random.default_rng(SPLIT_SEED)`` (its first 103 are validation);
  a subset is split in the same proportion.
- CAT2000: ``DIR/trainSet/{Stimuli,FIXATIONMAPS,FIXATIONLOCS}/<Category>/<NNN>.{jpg,jpg,mat}``.
  Split stratified by category: per category, ``round(10 %)`` (at least one when it has two or
  more images) go to ``validation``, chosen by ``default_rng([SPLIT_SEED, crc32(category)])``
  so a category's split does not depend on the others — 1800 / 200 for the full set.
- folder: ``DIR/images/<stem>.<ext>``, ``DIR/maps/<stem>.<ext>`` (grey-level maps) and optional
  ``DIR/fixations/<stem>.mat`` (a ``fixations`` N×2 array of 1-based (x, y), or a SALICON
  ``gaze`` struct) or ``DIR/fixations/<stem>.png`` (binary map, > 127 is a fixation).
  Split ``train`` plus, when ``validation_fraction`` > 0 (default 0.1), a ``validation`` split
  of ``round(fraction · n)`` images (at least one) from ``default_rng(SPLIT_SEED)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from mlnet_jax.errors import UserError

log = logging.getLogger("mlnet_jax.datasets")

SPLIT_SEED = 0
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MAT_EXTENSIONS = frozenset({".mat"})
MIT1003_VALIDATION = 103
MIT1003_TOTAL = 1003
CAT2000_VALIDATION_FRACTION = 0.1
FOLDER_VALIDATION_FRACTION = 0.1
_LISTED = 5  # names shown before "and N more"

# Official split sizes: a mismatch is only a warning (a subset may be prepared on purpose).
EXPECTED_SPLITS: dict[str, dict[str, int]] = {
    "salicon2015": {"train": 10000, "validation": 5000, "test": 5000},
    "salicon2017": {"train": 10000, "validation": 5000, "test": 5000},
    "mit1003": {"train": 900, "validation": 103},
    "cat2000": {"train": 1800, "validation": 200},
}


@dataclasses.dataclass(frozen=True)
class Item:
    """The files of one record. ``fixation_format`` says how to read ``fixations``:
    ``gaze_mat`` (SALICON struct), ``points_mat`` (N×2 1-based (x, y), or a gaze struct),
    ``fixlocs_mat`` (CAT2000 binary matrix) or ``binary_image`` (> 127 is a fixation)."""

    key: str
    file_name: str
    image: Path
    saliency_map: Path | None = None
    fixations: Path | None = None
    fixation_format: str = ""
    category: str = ""

    def __post_init__(self):
        for field in ("key", "file_name", "category"):
            object.__setattr__(self, field, stored_name(getattr(self, field)))


def stored_name(name: str) -> str:
    """``name`` as valid UTF-8 for the records: a byte the file system's names hold that is not
    UTF-8 (a Windows zip unzipped on Linux: Latin-1, cp437) is written as ``\\xe9``, not a
    serialization error (a traceback after the whole scan)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def check_manual_dir(manual_dir: str | Path) -> Path:
    """The manual directory as a Path; one-line errors when missing, not a folder, or empty."""
    path = Path(manual_dir).expanduser()
    if not path.exists():
        raise UserError(f"--manual_dir {path} does not exist")
    if not path.is_dir():
        raise UserError(f"--manual_dir {path} is not a folder")
    if not any(path.iterdir()):
        raise UserError(f"--manual_dir {path} is empty")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"expected folder {path} ({what}) was not found")
    return path


def _names(paths: Iterable[str]) -> str:
    """'a, b, c, … and 7 more' — enough to find the files without flooding the terminal."""
    paths = sorted(paths)
    shown = ", ".join(paths[:_LISTED])
    return shown + (f", … and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def list_files(folder: Path, extensions: frozenset[str], what: str,
               allow_empty: bool = False) -> dict[str, Path]:
    """stem → file for the files of ``folder`` with one of ``extensions``. Hidden files and
    folders are skipped silently; other files (another extension, a broken link) with a
    warning naming them."""
    found: dict[str, Path] = {}
    duplicates: list[str] = []
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.is_file() or path.suffix.lower() not in extensions:
            skipped.append(path.name)
            continue
        if path.stem in found:
            duplicates.append(f"{found[path.stem].name} / {path.name}")
        found[path.stem] = path
    if skipped:
        log.warning("%s: %d files skipped, not %s (%s) or not readable: %s", folder,
                    len(skipped), what, "/".join(sorted(extensions)), _names(skipped))
    if duplicates:
        raise UserError(f"{folder}: several {what} share a file stem: {_names(duplicates)}")
    if not found and not allow_empty:
        raise UserError(
            f"no {what} ({'/'.join(sorted(extensions))}) in {folder}")
    return found


def check_matched(first: Mapping[str, Path], second: Mapping[str, Path], first_what: str,
                  second_what: str, first_dir: Path, second_dir: Path) -> None:
    """One error listing the stems present on one side only (first few by name, then a count)."""
    only_first = sorted(set(first) - set(second))
    only_second = sorted(set(second) - set(first))
    problems = []
    if only_first:
        problems.append(f"{len(only_first)} {first_what} in {first_dir} have no {second_what} "
                        f"in {second_dir}: {_names(first[s].name for s in only_first)}")
    if only_second:
        problems.append(f"{len(only_second)} {second_what} in {second_dir} have no {first_what} "
                        f"in {first_dir}: {_names(second[s].name for s in only_second)}")
    if problems:
        raise UserError("; ".join(problems))


def _validation_count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def split_stems(stems: Iterable[str], n_validation: int, rng: np.random.Generator
                ) -> tuple[list[str], list[str]]:
    """(train, validation) stems: validation is the first ``n_validation`` of a permutation
    of the sorted stems."""
    ordered = sorted(stems)
    order = rng.permutation(len(ordered))
    validation = {ordered[i] for i in order[:n_validation]}
    return ([s for s in ordered if s not in validation], [s for s in ordered if s in validation])


# --------------------------------------------------------------------------- SALICON

SALICON_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def salicon(manual_dir: str | Path) -> dict[str, list[Item]]:
    """SALICON (2015 or 2017 edition, same layout): train / validation / test (test optional)."""
    root = check_manual_dir(manual_dir)
    layout = "SALICON layout: images/, maps/, fixations/ each with train/ and val/"
    _refuse_coco_json_fixations(root)
    for sub in ("images", "maps", "fixations"):
        _require_dir(root / sub, layout)
    splits: dict[str, list[Item]] = {}
    for split, folder in SALICON_SPLITS.items():
        image_dir = root / "images" / folder
        if split == "test":
            if not image_dir.is_dir():
                continue  # the test images are a separate download; they have no maps anyway
            images = list_files(image_dir, IMAGE_EXTENSIONS, "images", allow_empty=True)
            if not images:
                log.warning("%s has no images: no test split prepared", image_dir)
                continue
            splits[split] = [Item(key=s, file_name=p.name, image=p) for s, p in images.items()]
            continue
        _require_dir(image_dir, f"SALICON {split} images")
        map_dir = _require_dir(root / "maps" / folder, f"SALICON {split} maps")
        fix_dir = _require_dir(root / "fixations" / folder, f"SALICON {split} fixations")
        images = list_files(image_dir, IMAGE_EXTENSIONS, "images")
        maps = list_files(map_dir, IMAGE_EXTENSIONS, "maps", allow_empty=True)
        fixations = list_files(fix_dir, MAT_EXTENSIONS, "fixation files", allow_empty=True)
        check_matched(images, maps, "images", "maps", image_dir, map_dir)
        check_matched(images, fixations, "images", "fixation files", image_dir, fix_dir)
        splits[split] = [Item(key=s, file_name=p.name, image=p, saliency_map=maps[s],
                              fixations=fixations[s], fixation_format="gaze_mat")
                         for s, p in images.items()]
    return splits


def _refuse_coco_json_fixations(root: Path) -> None:
    """The LSUN'15 challenge shipped SALICON's fixations as COCO-style JSON, one file per split:
    say so plainly instead of "folder not found" or "skipped, not fixation files"."""
    fixations = root / "fixations"
    found = sorted(p for folder in (root, root / "annotations", fixations, fixations / "train",
                                    fixations / "val")
                   if folder.is_dir() for p in folder.glob("fixations_*.json"))
    if found and not any(next((fixations / f).glob("*.mat"), None) for f in ("train", "val")):
        raise UserError(
            f"{found[0]}: SALICON fixations as COCO-style JSON (the LSUN'15 challenge's) are "
            f"not read; prepare needs the per-image .mat files, fixations/{{train,val}}/"
            f"<stem>.mat, as salicon.net distributes both editions")


# --------------------------------------------------------------------------- MIT1003

def mit1003(manual_dir: str | Path, seed: int = SPLIT_SEED) -> dict[str, list[Item]]:
    """MIT1003: 900 / 103 train / validation from a fixed seed."""
    root = check_manual_dir(manual_dir)
    stim_dir = _require_dir(root / "ALLSTIMULI", "MIT1003 stimuli")
    map_dir = _require_dir(root / "ALLFIXATIONMAPS", "MIT1003 _fixMap/_fixPts maps")
    images = list_files(stim_dir, IMAGE_EXTENSIONS, "images")
    all_maps = list_files(map_dir, IMAGE_EXTENSIONS, "maps", allow_empty=True)
    maps = {k[:-len("_fixMap")]: p for k, p in all_maps.items() if k.endswith("_fixMap")}
    points = {k[:-len("_fixPts")]: p for k, p in all_maps.items() if k.endswith("_fixPts")}
    check_matched(images, maps, "images", "_fixMap maps", stim_dir, map_dir)
    check_matched(images, points, "images", "_fixPts maps", stim_dir, map_dir)
    n_val = (MIT1003_VALIDATION if len(images) == MIT1003_TOTAL
             else _validation_count(len(images), MIT1003_VALIDATION / MIT1003_TOTAL))
    train, validation = split_stems(images, n_val, np.random.default_rng(seed))

    def items(stems: list[str]) -> list[Item]:
        return [Item(key=s, file_name=images[s].name, image=images[s], saliency_map=maps[s],
                     fixations=points[s], fixation_format="binary_image") for s in stems]

    return {"train": items(train), "validation": items(validation)}


# --------------------------------------------------------------------------- CAT2000

def cat2000(manual_dir: str | Path, seed: int = SPLIT_SEED,
            validation_fraction: float = CAT2000_VALIDATION_FRACTION) -> dict[str, list[Item]]:
    """CAT2000 training set, split stratified by category (90 / 10 per category)."""
    root = check_manual_dir(manual_dir)
    train_set = _require_dir(root / "trainSet", "CAT2000 layout: trainSet/Stimuli, "
                             "trainSet/FIXATIONMAPS, trainSet/FIXATIONLOCS")
    stim_root = _require_dir(train_set / "Stimuli", "CAT2000 stimuli, one folder per category")
    map_root = _require_dir(train_set / "FIXATIONMAPS", "CAT2000 fixation maps per category")
    loc_root = _require_dir(train_set / "FIXATIONLOCS", "CAT2000 fixation .mat files per category")

    def category_folders(root: Path) -> set[str]:
        return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    categories = sorted(category_folders(stim_root))
    if not categories:
        raise UserError(f"no category folders in {stim_root}")
    for root in (map_root, loc_root):  # a partial unzip must not drop a category silently
        if extra := sorted(category_folders(root) - set(categories)):
            raise UserError(f"categories in {root} have no folder in {stim_root}: "
                            f"{_names(extra)}")
    splits: dict[str, list[Item]] = {"train": [], "validation": []}
    for category in categories:
        stim_dir = stim_root / category
        map_dir = _require_dir(map_root / category, f"CAT2000 maps of {category}")
        loc_dir = _require_dir(loc_root / category, f"CAT2000 fixations of {category}")
        images = list_files(stim_dir, IMAGE_EXTENSIONS, "images")
        maps = list_files(map_dir, IMAGE_EXTENSIONS, "maps", allow_empty=True)
        locs = list_files(loc_dir, MAT_EXTENSIONS, "fixation files", allow_empty=True)
        check_matched(images, maps, "images", "maps", stim_dir, map_dir)
        check_matched(images, locs, "images", "fixation files", stim_dir, loc_dir)
        rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(category))])
        train, validation = split_stems(
            images, _validation_count(len(images), validation_fraction), rng)
        for split, stems in (("train", train), ("validation", validation)):
            splits[split] += [
                Item(key=f"{category}/{s}", file_name=f"{category}/{images[s].name}",
                     image=images[s], saliency_map=maps[s], fixations=locs[s],
                     fixation_format="fixlocs_mat", category=category) for s in stems]
    return splits


# --------------------------------------------------------------------------- folder

def folder(manual_dir: str | Path, validation_fraction: float = FOLDER_VALIDATION_FRACTION,
           seed: int = SPLIT_SEED) -> dict[str, list[Item]]:
    """Any ``images/`` + ``maps/`` (+ optional ``fixations/``) folder, matched by file stem."""
    root = check_manual_dir(manual_dir)
    if not 0 <= validation_fraction < 1:
        raise UserError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    layout = "folder layout: images/ and maps/ with files matched by stem, optional fixations/"
    image_dir = _require_dir(root / "images", layout)
    map_dir = _require_dir(root / "maps", layout)
    images = list_files(image_dir, IMAGE_EXTENSIONS, "images")
    maps = list_files(map_dir, IMAGE_EXTENSIONS, "maps", allow_empty=True)
    check_matched(images, maps, "images", "maps", image_dir, map_dir)
    fixations: dict[str, Path] = {}
    fix_dir = root / "fixations"
    if fix_dir.is_dir():
        extensions = MAT_EXTENSIONS | IMAGE_EXTENSIONS
        fixations = list_files(fix_dir, extensions, "fixation files", allow_empty=True)
        if fixations:
            check_matched(images, fixations, "images", "fixation files", image_dir, fix_dir)
        elif any(not p.name.startswith(".") for p in fix_dir.iterdir()):
            raise UserError(f"{fix_dir}: no fixation files ({'/'.join(sorted(extensions))}) "
                            "among its files; remove the folder to prepare without fixations")
    train, validation = split_stems(
        images, _validation_count(len(images), validation_fraction),
        np.random.default_rng(seed))

    def item(stem: str) -> Item:
        fix = fixations.get(stem)
        fmt = "" if fix is None else (
            "points_mat" if fix.suffix.lower() == ".mat" else "binary_image")
        return Item(key=stem, file_name=images[stem].name, image=images[stem],
                    saliency_map=maps[stem], fixations=fix, fixation_format=fmt)

    splits = {"train": [item(s) for s in train]}
    if validation:
        splits["validation"] = [item(s) for s in validation]
    return splits
