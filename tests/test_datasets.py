"""TFDS builders and the prepare CLI on tiny fakes in the exact official layouts."""

from __future__ import annotations

import importlib
import io
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

import fake_datasets as fake
from mlnet_jax.datasets import layouts, prepare as prepare_cli, records
from mlnet_jax.datasets.prepare import main, prepare
from mlnet_jax.errors import UserError
from mlnet_jax.input_pipeline import open_source


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _read_all(name: str, split: str, data_dir: Path) -> dict[str, dict]:
    source = open_source(name, split, str(data_dir))
    out = {}
    for i in range(len(source)):
        record = source[i]
        assert record["file_name"] not in out
        out[record["file_name"]] = record
    return out


def _check_records(got: dict[str, dict], truth: dict[str, dict]) -> None:
    """Every record's image bytes, map pixels and fixation pixels are what was written."""
    assert set(got) == set(truth)
    for file_name, record in got.items():
        expected = truth[file_name]
        assert record["image"] == expected["image"], file_name
        rows, cols = _decode(expected["image"]).shape[:2]
        np.testing.assert_array_equal(record["image_size"], [rows, cols])
        assert record["fixations"].dtype == np.int32 and record["fixations"].shape[1] == 2
        assert {tuple(p) for p in record["fixations"].tolist()} == expected["fixations"]
        assert len(record["fixations"]) == len(expected["fixations"])  # each pixel once
        if expected["map"] is None:
            assert record["saliency_map"] == b""
        else:
            np.testing.assert_array_equal(_decode(record["saliency_map"]), expected["map"])
        assert record["category"] == expected.get("category", "")


# --------------------------------------------------------------------------- builders

@pytest.mark.parametrize("name", ["salicon2015", "salicon2017"])
def test_salicon_prepare_and_read_back(tmp_path, name):
    truth = fake.write_salicon(tmp_path / "manual", {"train": 5, "validation": 3, "test": 2})
    sizes = prepare(name, str(tmp_path / "manual"), str(tmp_path / "tfds"), progress=False)
    assert sizes == {"train": 5, "validation": 3, "test": 2}
    for split in ("train", "validation", "test"):
        _check_records(_read_all(name, split, tmp_path / "tfds"), truth[split])


def test_salicon_fixations_are_the_union_of_observers_converted_to_row_col(tmp_path):
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 1, "validation": 1})
    # One observer fixates (x=1, y=1) → (0, 0) and (x=32, y=2) → (1, 31); the other repeats
    # (1, 1) and adds (x=5, y=24) → (23, 4): the union has each pixel once.
    stem = "COCO_train2014_000000000001"
    fake.salicon_mat(manual / "fixations" / "train" / f"{stem}.mat",
                     [np.array([[1, 1], [32, 2]]), np.array([[1, 1], [5, 24]])], (24, 32))
    prepare("salicon2015", str(manual), str(tmp_path / "tfds"), progress=False)
    record = open_source("salicon2015", "train", str(tmp_path / "tfds"))[0]
    assert sorted(map(tuple, record["fixations"].tolist())) == [(0, 0), (1, 31), (23, 4)]


def test_mit1003_prepare_and_read_back(tmp_path):
    truth = fake.write_mit1003(tmp_path / "manual", n=10)
    sizes = prepare("mit1003", str(tmp_path / "manual"), str(tmp_path / "tfds"), progress=False)
    # A subset is split in the official 103/1003 proportion (at least one).
    assert sizes == {"train": 9, "validation": 1}
    got = {**_read_all("mit1003", "train", tmp_path / "tfds"),
           **_read_all("mit1003", "validation", tmp_path / "tfds")}
    _check_records(got, truth)
    portrait = next(r for r in got.values() if r["image_size"][0] == 40)
    np.testing.assert_array_equal(portrait["image_size"], [40, 30])


def test_mit1003_and_cat2000_full_size_splits(tmp_path):
    """Scanning only lists files, so empty files in the full layouts give the official splits."""
    mit = tmp_path / "mit"
    (mit / "ALLSTIMULI").mkdir(parents=True)
    (mit / "ALLFIXATIONMAPS").mkdir()
    for i in range(1003):
        (mit / "ALLSTIMULI" / f"s{i}.jpeg").touch()
        (mit / "ALLFIXATIONMAPS" / f"s{i}_fixMap.jpg").touch()
        (mit / "ALLFIXATIONMAPS" / f"s{i}_fixPts.jpg").touch()
    splits = layouts.mit1003(mit)
    assert (len(splits["train"]), len(splits["validation"])) == (900, 103)
    again = layouts.mit1003(mit)
    assert [i.key for i in again["validation"]] == [i.key for i in splits["validation"]]
    assert {i.key for i in layouts.mit1003(mit, seed=1)["validation"]} != {
        i.key for i in splits["validation"]}

    cat = tmp_path / "cat" / "trainSet"
    for category in (f"Cat{c:02d}" for c in range(20)):
        for sub, ext in (("Stimuli", "jpg"), ("FIXATIONMAPS", "jpg"), ("FIXATIONLOCS", "mat")):
            (cat / sub / category).mkdir(parents=True)
            for i in range(100):
                (cat / sub / category / f"{i + 1:03d}.{ext}").touch()
    splits = layouts.cat2000(tmp_path / "cat")
    assert (len(splits["train"]), len(splits["validation"])) == (1800, 200)
    per_category = {}
    for item in splits["validation"]:
        per_category[item.category] = per_category.get(item.category, 0) + 1
    assert per_category == {f"Cat{c:02d}": 10 for c in range(20)}
    # README's rule: per category, the first 10 % of a permutation of its sorted stems by
    # default_rng([0, crc32(category)]). One generator for all categories would pick the
    # same stems in each, and a category's split would depend on which others there are.
    stems = [f"{i + 1:03d}" for i in range(100)]
    expected = {f"Cat{c:02d}/{stems[i]}" for c in range(20) for i in np.random.default_rng(
        [0, zlib.crc32(f"Cat{c:02d}".encode())]).permutation(100)[:10]}
    assert {item.key for item in splits["validation"]} == expected


def test_cat2000_prepare_and_read_back(tmp_path):
    truth = fake.write_cat2000(tmp_path / "manual", per_category=4)
    sizes = prepare("cat2000", str(tmp_path / "manual"), str(tmp_path / "tfds"), progress=False)
    assert sizes == {"train": 9, "validation": 3}
    validation = _read_all("cat2000", "validation", tmp_path / "tfds")
    assert sorted(r["category"] for r in validation.values()) == ["Action", "Affective", "Art"]
    got = {**_read_all("cat2000", "train", tmp_path / "tfds"), **validation}
    _check_records(got, truth)
    assert "Action/001.jpg" in got


def test_names_that_are_not_utf8_are_prepared(tmp_path):
    """A Windows zip unzipped on Linux leaves Latin-1 bytes in names: the whole scan passed, then
    writing the first such record was a traceback (UnicodeEncodeError)."""
    truth = fake.write_cat2000(tmp_path / "manual", categories=("Action", "Art"), per_category=3)
    base = os.fsencode(tmp_path / "manual" / "trainSet")
    for part, ext in ((b"Stimuli", b"jpg"), (b"FIXATIONMAPS", b"jpg"), (b"FIXATIONLOCS", b"mat")):
        os.rename(base + b"/" + part + b"/Art", base + b"/" + part + b"/Caf\xe9")  # a category
        folder = base + b"/" + part + b"/Action/"
        os.rename(folder + b"002." + ext, folder + b"d\xe9j\xe0." + ext)  # and a file
    assert prepare("cat2000", str(tmp_path / "manual"), str(tmp_path / "tfds"),
                   progress=False) == {"train": 4, "validation": 2}
    got = {**_read_all("cat2000", "train", tmp_path / "tfds"),
           **_read_all("cat2000", "validation", tmp_path / "tfds")}
    renamed = {"Action/002.jpg": "Action/d\\xe9j\\xe0.jpg"} | {
        f"Art/{n:03d}.jpg": f"Caf\\xe9/{n:03d}.jpg" for n in (1, 2, 3)}
    truth = {renamed.get(name, name): record for name, record in truth.items()}
    for record in truth.values():
        record["category"] = record["category"].replace("Art", "Caf\\xe9")
    _check_records(got, truth)


@pytest.mark.parametrize("fixations", ["mat", "png", None])
def test_folder_prepare_and_read_back(tmp_path, fixations):
    truth = fake.write_folder(tmp_path / "manual", n=5, fixations=fixations)
    sizes = prepare("folder", str(tmp_path / "manual"), str(tmp_path / "tfds"), progress=False)
    assert sizes == {"train": 4, "validation": 1}
    got = {**_read_all("folder", "train", tmp_path / "tfds"),
           **_read_all("folder", "validation", tmp_path / "tfds")}
    _check_records(got, truth)


def test_folder_file_discovery(tmp_path):
    """Extensions match in any case, macOS's hidden `._` companions are skipped, and two files
    of one stem are refused (which one to read would otherwise depend on listing order)."""
    manual = tmp_path / "manual"
    truth = fake.write_folder(manual, n=3)
    rng = np.random.default_rng(7)
    image = fake.save(fake.smooth_image(rng, (24, 32)), manual / "images" / "IMG.JPG",
                      format="JPEG")
    saliency = fake.save(fake.blob_map(rng, (24, 32)), manual / "maps" / "IMG.PNG", format="PNG")
    scipy.io.savemat(str(manual / "fixations" / "IMG.mat"),
                     {"fixations": np.array([[1.0, 1.0], [32, 24]])})
    truth["IMG.JPG"] = {"image": image.read_bytes(), "map": np.asarray(Image.open(saliency)),
                        "fixations": {(0, 0), (23, 31)}}
    # A .MAT is still read as points (read as a binary image it would not decode).
    (manual / "fixations" / "img00.mat").rename(manual / "fixations" / "img00.MAT")
    # AppleDouble files a Mac leaves beside each copied file: not images (a stem '._img00'
    # taken in would be an image without fixations, or fail to decode).
    for sub in ("images", "maps", "fixations"):
        (manual / sub / "._img00.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    assert prepare("folder", str(manual), str(tmp_path / "tfds"), validation_fraction=0.0,
                   progress=False) == {"train": 4}
    _check_records(_read_all("folder", "train", tmp_path / "tfds"), truth)
    # img01.png and img01.jpg: refused, naming both.
    shutil.copyfile(manual / "images" / "IMG.JPG", manual / "images" / "img01.jpg")
    with pytest.raises(UserError, match=r"images: several images share a file stem: "
                                        r"img01.jpg / img01.png$"):
        layouts.folder(manual)


def test_the_validation_count_is_the_documented_rounding():
    """README: round(fraction · n) images, at least one, and at least one left to train on
    (int() would give 16 images 1 for validation, not 2)."""
    got = [layouts._validation_count(n, 0.1) for n in (0, 1, 2, 5, 14, 16, 30, 1003)]
    assert got == [0, 0, 1, 1, 1, 2, 3, 100]
    assert layouts._validation_count(16, 0.0) == 0 and layouts._validation_count(3, 0.9) == 2


def test_folder_without_validation_and_overwrite(tmp_path, capsys):
    fake.write_folder(tmp_path / "manual", n=3)
    args = ["folder", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
            str(tmp_path / "tfds")]
    assert main(args) == 0

    def listing():  # two levels: <data_dir>/<name>/<version>, hidden entries included
        top = tmp_path / "tfds"
        return sorted(str(q.relative_to(top)) for p in top.iterdir()
                      for q in ([p, *p.iterdir()] if p.is_dir() else [p]))

    fresh = listing()
    assert prepare("folder", str(tmp_path / "manual"), str(tmp_path / "tfds"),
                   progress=False) == {"train": 2, "validation": 1}
    # Already prepared: reused, with a warning, until --overwrite.
    assert main(args) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(args + ["--validation_fraction", "0"]) == 0
    err = capsys.readouterr().err
    assert "already prepared" in err
    assert "was prepared with validation_fraction 0.1, not 0.0: it is reused as it is" in err
    other = tmp_path / "other"
    fake.write_folder(other, n=3)
    assert main(["folder", "--manual_dir", str(other), "--data_dir",
                 str(tmp_path / "tfds")]) == 0
    err = capsys.readouterr().err
    assert f"was prepared with manual_dir {(tmp_path / 'manual').resolve()}, not " \
           f"{other.resolve()}" in err
    assert main(args + ["--validation_fraction", "0", "--overwrite"]) == 0
    summary = [line.split() for line in capsys.readouterr().out.splitlines()
               if line.startswith("  ")]
    assert summary == [["train", "3", "records"]]
    # The copy --overwrite set aside is removed once the new one is complete: the data dir
    # holds what a fresh prepare leaves (keeping it would double the space every rebuild).
    assert listing() == fresh


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "info"])
def test_a_damaged_prepared_dataset_is_named_before_anything_reads_it(tmp_path, capsys, damage):
    """A record file cut short, emptied or deleted, or dataset_info.json damaged (a copy to
    Drive interrupted, say) gave array_record's or protobuf's traceback at the first read,
    from train, evaluate or a grain worker; prepare without --overwrite called it prepared."""
    fake.write_folder(tmp_path / "manual", n=5)
    args = ["folder", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
            str(tmp_path / "tfds")]
    assert main(args) == 0
    version = next((tmp_path / "tfds" / "folder").iterdir())
    shard = next(version.glob("folder-validation.array_record-*"))
    if damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 1000)
    elif damage == "empty":
        os.truncate(shard, 0)
    elif damage == "missing":
        shard.unlink()
    else:
        (version / "dataset_info.json").write_text("{")
    if damage == "info":
        expected = (rf"^{version / 'dataset_info.json'}: cannot read it \(Failed to load JSON: "
                    rf".*\); the prepared dataset is damaged: delete {version} and prepare it "
                    "again$")
    else:
        problem = ("missing, one of the validation split's record files" if damage == "missing"
                   else r"the validation split's records cannot be read \(.+\)")
        expected = (rf"^{shard}: {problem}; the prepared dataset is damaged: prepare it again "
                    "with --overwrite$")
    if damage != "info":
        open_source("folder", "train", str(tmp_path / "tfds"))  # the other split reads
    with pytest.raises(UserError, match=expected):
        open_source("folder", "validation", str(tmp_path / "tfds"))
    capsys.readouterr()
    assert main(args) == 2
    assert re.match(expected.replace("^", "^error: "), capsys.readouterr().err.strip())
    if damage != "info":
        assert main(args + ["--overwrite"]) == 0
        assert len(open_source("folder", "validation", str(tmp_path / "tfds"))) == 1


def test_ordered_map_keeps_input_order_past_its_window():
    # Results come back in input order however the threads finish: taking the newest pending
    # result instead of the oldest would reorder (and so mislabel) records.
    from mlnet_jax.datasets.builders import ordered_map
    delays = random.Random(0).choices([0, 1e-4, 1e-3], k=200)

    def slow_square(i):
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, list(range(200)), workers=4, window=8)) == \
        [i * i for i in range(200)]


def test_a_shard_short_of_records_or_a_damaged_second_shard_is_named(tmp_path):
    """check_shards compares each record file's count with dataset_info.json's, and checks every
    record file of a split, not only the first (a whole file with too few records would end an
    epoch early; a damaged later shard would fail part-way through one)."""
    from mlnet_jax.datasets.builders import check_shards, get_builder
    for n, name in ((5, "small"), (9, "large")):
        fake.write_folder(tmp_path / f"{name}_manual", n=n)
        prepare("folder", str(tmp_path / f"{name}_manual"), str(tmp_path / name), progress=False)
    small, large = (get_builder("folder", tmp_path / name).info.splits["train"]
                    for name in ("small", "large"))
    (short,), (whole,) = small.shard_lengths, large.shard_lengths
    assert short < whole
    shard = Path(large.filepaths[0])
    shutil.copyfile(small.filepaths[0], shard)  # a whole file, from a smaller prepare
    with pytest.raises(UserError, match=rf"^{re.escape(str(shard))}: the train split's records "
                                        rf"cannot be read \({short} records, dataset_info.json "
                                        rf"says {whole}\)"):
        open_source("folder", "train", str(tmp_path / "large"))
    # A split of two record files whose second is cut short.
    first = Path(small.filepaths[0])
    second = tmp_path / "second.array_record"
    shutil.copyfile(first, second)
    os.truncate(second, second.stat().st_size - 200)
    split = types.SimpleNamespace(filepaths=[first, second], shard_lengths=[short, short])
    builder = types.SimpleNamespace(info=types.SimpleNamespace(splits={"train": split}))
    with pytest.raises(UserError, match=rf"^{re.escape(str(second))}: the train split's records "
                                        "cannot be read"):
        check_shards(builder)


def test_nothing_of_a_layout_is_dropped_silently(tmp_path, caplog):
    import shutil
    # CAT2000 unzipped in part: a category with maps and fixations but no stimuli folder.
    fake.write_cat2000(tmp_path / "cat", per_category=2)
    shutil.rmtree(tmp_path / "cat" / "trainSet" / "Stimuli" / "Art")
    with pytest.raises(UserError, match=r"categories in .*FIXATIONMAPS have no folder in "
                                        r".*Stimuli: Art"):
        prepare("cat2000", str(tmp_path / "cat"), str(tmp_path / "tfds"), progress=False)
    # A folder dataset whose fixations/ holds nothing usable would give NSS and AUCs n = 0.
    fake.write_folder(tmp_path / "folder", n=3, fixations=None)
    (tmp_path / "folder" / "fixations").mkdir()
    for i in range(3):
        np.save(tmp_path / "folder" / "fixations" / f"img{i:02d}.npy", np.zeros((2, 2)))
    with pytest.raises(UserError, match=r"fixations: no fixation files \(.*\.mat.*\) among its "
                                        "files; remove the folder"):
        prepare("folder", str(tmp_path / "folder"), str(tmp_path / "tfds"), progress=False)
    # Files of another kind are skipped with a warning naming them.
    shutil.rmtree(tmp_path / "folder" / "fixations")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "folder" / "images" / "x.gif")
    (tmp_path / "folder" / "images" / "gone.png").symlink_to(tmp_path / "missing.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        sizes = prepare("folder", str(tmp_path / "folder"), str(tmp_path / "tfds"),
                        progress=False)
    assert sum(sizes.values()) == 3
    assert "images: 2 files skipped, not images" in caplog.text
    assert "gone.png" in caplog.text and "x.gif" in caplog.text
    assert caplog.text.count("files skipped") == 1  # once, not again when the build scans


def test_prepare_warnings_are_lines_of_their_own_above_the_progress_bar(tmp_path, capsys):
    from mlnet_jax.datasets.prepare import main as prepare_main
    fake.write_folder(tmp_path / "folder", n=4)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "folder" / "maps" / "img01.png")
    assert prepare_main(["folder", "--manual_dir", str(tmp_path / "folder"), "--data_dir",
                         str(tmp_path / "tfds"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in re.split(r"[\r\n]", err) if "warning:" in line]
    assert warnings and all(line.startswith("warning: ") for line in warnings), err
    assert any("img01.png: map is 12x16 but its image is 24x32" in line for line in warnings)


def test_an_empty_salicon_test_folder_skips_the_optional_test_split(tmp_path, caplog):
    from mlnet_jax.datasets import layouts
    fake.write_salicon(tmp_path / "manual", {"train": 2, "validation": 1})
    (tmp_path / "manual" / "images" / "test").mkdir()
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        splits = layouts.salicon(tmp_path / "manual")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "validation": 1}
    assert "test has no images: no test split prepared" in caplog.text


def test_salicon_fixations_of_a_resized_image_are_rescaled_from_their_resolution(tmp_path,
                                                                                caplog):
    # Recorded on a 48x64 screen; the image was resized to 24x32 (half).
    xy = [np.array([[1.0, 1.0], [64.0, 48.0], [33.0, 17.0]])]
    mat = fake.salicon_mat(tmp_path / "a.mat", xy, (48, 64))
    item = layouts.Item(key="a", file_name="a.jpg", image=tmp_path / "a.jpg", fixations=mat,
                        fixation_format="gaze_mat")
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        got = records.read_fixations(item, (24, 32))
    # Pixel k spans k ± 0.5: x = 64 → 32, y = 48 → 24; x = 33 → 16.75 → 17; y = 17 → 8.75 → 9.
    assert sorted(map(tuple, got.tolist())) == [(0, 0), (8, 16), (23, 31)]
    assert "recorded at 48x64, its image is 24x32; coordinates rescaled" in caplog.text
    # At its own resolution nothing moves.
    mat = fake.salicon_mat(tmp_path / "b.mat", xy, (48, 64))
    item = layouts.Item(key="b", file_name="b.jpg", image=tmp_path / "b.jpg", fixations=mat,
                        fixation_format="gaze_mat")
    assert sorted(map(tuple, records.read_fixations(item, (48, 64)).tolist())) == [
        (0, 0), (16, 32), (47, 63)]


def test_fixations_of_another_aspect_ratio_are_refused_not_stretched(tmp_path, caplog):
    """A CAT2000 fixLocs saved transposed (48x27 for a 27x48 image) was rescaled with a warning,
    every point stretched into the wrong place; a resized copy (within a pixel's rounding) is
    still rescaled, and SALICON's `resolution` is held to the same rule."""
    mask = np.zeros((27, 48), bool)
    mask[3, 40] = mask[20, 5] = mask[25, 0] = True
    with pytest.raises(UserError, match=r"f.mat: fixation map is 48x27 but its image is 27x48, "
                                        r"another aspect ratio: not this image's fixations"):
        records.binary_to_rc0(mask.T, (27, 48), Path("f.mat"))
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        half = records.binary_to_rc0(mask, (14, 24), Path("f.mat"))  # 13.5 rounded
    # Each point lands in the pixel holding its pixel's centre, (r + ½)·14/27 and (c + ½)·24/48:
    # row 25 → 13.2 → 13 (scaling its corner, 25·14/27 = 12.96, would put it in row 12).
    centres = [(int(np.floor((r + 0.5) * 14 / 27)), int(np.floor((c + 0.5) * 24 / 48)))
               for r, c in np.argwhere(mask)]
    assert sorted(map(tuple, half.tolist())) == sorted(centres) == [(1, 20), (10, 2), (13, 0)]
    assert "coordinates rescaled" in caplog.text
    mat = fake.salicon_mat(tmp_path / "a.mat", [np.array([[1.0, 1.0]])], (64, 48))
    item = layouts.Item(key="a", file_name="a.jpg", image=tmp_path / "a.jpg", fixations=mat,
                        fixation_format="gaze_mat")
    with pytest.raises(UserError, match="fixations were recorded at 64x48 but its image is 48x64"):
        records.read_fixations(item, (48, 64))


def test_fixation_conversion_from_one_based_xy(caplog):
    got = records.xy1_to_rc0(np.array([[1.0, 1.0], [32, 24], [3.4, 2.6], [0, 5], [33, 1],
                                       [1, 25], [np.nan, 3], [4, np.inf]]), (24, 32),
                             Path("f.mat"))
    # (x=1, y=1) → (0, 0); (32, 24) → (23, 31); (3.4, 2.6) rounds to (x=3, y=3) → (2, 2);
    # x=0 and x=33 are outside a 32-column image, y=25 below a 24-row one (kept, it would be
    # row 24, past the last); NaN and inf are no place at all.
    assert sorted(map(tuple, got.tolist())) == [(0, 0), (2, 2), (23, 31)]
    assert got.dtype == np.int32
    assert "3 fixations outside the 24x32 image dropped" in caplog.text
    assert "2 fixations that are not finite numbers dropped" in caplog.text


def test_a_map_in_colour_is_refused_and_grey_stored_as_colour_is_read(tmp_path):
    from matplotlib import colormaps
    truth = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    Image.fromarray(np.repeat(truth[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.repeat(truth[..., None], 3, axis=-1)).save(tmp_path / "rgb.jpg",
                                                                  quality=75)
    jet = (colormaps["jet"](truth / 255.0)[..., :3] * 255).astype(np.uint8)
    Image.fromarray(jet).save(tmp_path / "jet.png")
    assert np.array_equal(_decode(records.read_map(tmp_path / "rgb.png", (48, 64))), truth)
    from_jpeg = _decode(records.read_map(tmp_path / "rgb.jpg", (48, 64))).astype(int)
    assert np.abs(from_jpeg - truth).max() <= 3
    with pytest.raises(UserError, match=r"jet.png: map is in colour .*expected grey levels"):
        records.read_map(tmp_path / "jet.png", (48, 64))


def test_an_empty_or_unknown_image_file_is_named_plainly(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"cannot read image .*empty.jpg: empty file \(0 bytes\)$"):
        records.read_image(tmp_path / "empty.jpg")
    with pytest.raises(UserError, match=r"text.jpg: not an image file Pillow can read$"):
        records.read_image(tmp_path / "text.jpg")


def test_builders_are_not_registered_and_reimport_cleanly():
    import tensorflow_datasets as tfds

    from mlnet_jax.datasets import builders

    importlib.reload(builders)
    importlib.reload(builders)
    assert "salicon2015" not in tfds.list_builders(with_community_datasets=False)
    assert set(builders.BUILDERS) == {"salicon2015", "salicon2017", "mit1003", "cat2000",
                                      "folder"}


def test_no_tensorflow_needed_to_import_build_or_read(tmp_path):
    """In a fresh interpreter: importing is TFDS-free, and building/reading never imports TF."""
    fake.write_folder(tmp_path / "manual", n=2)
    code = f"""
import sys
import mlnet_jax.datasets, mlnet_jax.input_pipeline
assert "tensorflow_datasets" not in sys.modules
from mlnet_jax.datasets.prepare import prepare
from mlnet_jax.input_pipeline import open_source
prepare("folder", {str(tmp_path / 'manual')!r}, {str(tmp_path / 'tfds')!r}, progress=False)
assert len(open_source("folder", "train", {str(tmp_path / 'tfds')!r})[0]["image"]) > 0
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("ok")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- CLI messages

def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_fixations_that_are_not_numbers_are_named(tmp_path, capsys):
    folder = tmp_path / "folder"
    fake.write_folder(folder, n=3)
    cell = np.empty((2,), dtype=object)
    cell[0], cell[1] = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [5.0, 6.0]])
    scipy.io.savemat(str(folder / "fixations" / "img00.mat"), {"fixations": cell})
    salicon = tmp_path / "salicon"
    fake.write_salicon(salicon, {"train": 2, "validation": 1})
    gaze = np.empty((1, 1), dtype=[("location", object), ("fixations", object)])
    gaze[0, 0]["location"], gaze[0, 0]["fixations"] = np.zeros((0, 2)), "n/a"
    mat = salicon / "fixations" / "train" / "COCO_train2014_000000000001.mat"
    scipy.io.savemat(str(mat), {"gaze": gaze})
    for name, manual, bad, expected in (
            ("folder", folder, folder / "fixations" / "img00.mat", "fixations"),
            ("salicon2015", salicon, mat, "gaze.fixations")):
        code, _, err = _cli([name, "--manual_dir", str(manual), "--data_dir",
                             str(tmp_path / "tfds")], capsys)
        assert code == 2 and "Traceback" not in err, err
        assert f"{bad}: {expected} must be a numeric N×2 array of 1-based (x, y), not " \
            in _error_line(err)


def test_cli_summary_and_split_size_warning(tmp_path, capsys):
    fake.write_salicon(tmp_path / "manual", {"train": 3, "validation": 2, "test": 1})
    code, out, err = _cli(["salicon2015", "--manual_dir", str(tmp_path / "manual"),
                           "--data_dir", str(tmp_path / "tfds")], capsys)
    assert code == 0
    assert "train" in out and "3 records" in out and "2 records" in out and "1 records" in out
    warning = next(line for line in err.splitlines() if "split 'train'" in line)
    assert warning.startswith("warning: ") and "has 3 records" in warning and "10000" in warning
    assert "salicon2015 train" in err  # the progress bar


def test_cli_wrong_and_empty_manual_dir(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = _cli(["mit1003", "--manual_dir", str(missing)], capsys)
    assert code == 2 and str(missing) in _error_line(err) and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _cli(["cat2000", "--manual_dir", str(empty)], capsys)
    assert code == 2 and str(empty) in _error_line(err) and "is empty" in err
    fake.write_folder(tmp_path / "manual", n=2)
    (tmp_path / "a_file").write_text("")
    code, _, err = _cli(["folder", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
                         str(tmp_path / "a_file")], capsys)
    assert code == 2 and _error_line(err) == f"error: --data_dir {tmp_path / 'a_file'}: is a file; " \
        "name a folder (created if missing)"


@pytest.mark.parametrize("where", [".", "fixations", "fixations/train"])
def test_salicon_coco_json_fixations_are_named(tmp_path, where):
    """The LSUN'15 challenge's fixations_train2014.json in place of the .mat files was "expected
    folder … fixations was not found", or "skipped, not fixation files" then a list of images
    without fixations: neither said the format is the problem."""
    root = tmp_path / "manual"
    fake.write_salicon(root, {"train": 2, "validation": 1})
    shutil.rmtree(root / "fixations")
    (root / where).mkdir(parents=True, exist_ok=True)
    (root / where / "fixations_train2014.json").write_text('{"type": "fixations"}')
    with pytest.raises(UserError, match=r"fixations_train2014.json: SALICON fixations as "
                                        r"COCO-style JSON .* are not read; prepare needs the "
                                        r"per-image .mat files"):
        layouts.salicon(root)


def test_cli_missing_folder_names_expected_path(tmp_path, capsys):
    fake.write_salicon(tmp_path / "manual", {"train": 2, "validation": 1})
    import shutil

    shutil.rmtree(tmp_path / "manual" / "maps" / "val")
    code, _, err = _cli(["salicon2015", "--manual_dir", str(tmp_path / "manual")], capsys)
    line = _error_line(err)
    assert code == 2 and str(tmp_path / "manual" / "maps" / "val") in line
    assert not (tmp_path / "tfds").exists()


def test_cli_images_without_maps_and_maps_without_images(tmp_path, capsys):
    manual = tmp_path / "manual"
    fake.write_folder(manual, n=9, fixations=None)
    for i in range(7):
        (manual / "maps" / f"img{i:02d}.png").unlink()
    fake.save(np.zeros((4, 4), np.uint8), manual / "maps" / "orphan.png")
    code, _, err = _cli(["folder", "--manual_dir", str(manual), "--data_dir",
                         str(tmp_path / "tfds")], capsys)
    line = _error_line(err)
    assert code == 2
    assert "7 images in" in line and "img00.png, img01.png" in line and "and 2 more" in line
    assert "1 maps in" in line and "orphan.png" in line


def test_cli_mit1003_missing_fixpts(tmp_path, capsys):
    manual = tmp_path / "manual"
    fake.write_mit1003(manual, n=3)
    (manual / "ALLFIXATIONMAPS" / "i0001_scene_fixPts.jpg").unlink()
    code, _, err = _cli(["mit1003", "--manual_dir", str(manual)], capsys)
    assert code == 2 and "_fixPts" in _error_line(err) and "i0001_scene.jpeg" in err


def test_cli_corrupt_image_is_named(tmp_path, capsys):
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 3, "validation": 1})
    bad = manual / "images" / "train" / "COCO_train2014_000000000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    code, _, err = _cli(["salicon2015", "--manual_dir", str(manual), "--data_dir",
                         str(tmp_path / "tfds")], capsys)
    line = _error_line(err)
    assert code == 2 and str(bad) in line and "cannot read image" in line
    bad.write_bytes(b"not an image at all")
    code, _, err = _cli(["salicon2015", "--manual_dir", str(manual), "--data_dir",
                         str(tmp_path / "tfds")], capsys)
    assert code == 2 and str(bad) in _error_line(err)


def test_a_failed_overwrite_keeps_the_prepared_dataset(tmp_path, capsys, monkeypatch):
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 3, "validation": 1})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    args = ["salicon2015", "--manual_dir", str(manual), "--data_dir", "~/tfds"]
    assert _cli(args, capsys)[0] == 0
    data_dir = tmp_path / "home" / "tfds"  # '~' expanded, not a folder named '~' here

    def images():
        return {k: r["image"] for k, r in _read_all("salicon2015", "train", data_dir).items()}

    before = images()
    assert len(before) == 3 and not (tmp_path / "~").exists()
    bad = manual / "images" / "train" / "COCO_train2014_000000000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # found only while writing, after the scan
    code, _, err = _cli(args + ["--overwrite"], capsys)
    assert code == 2 and str(bad) in _error_line(err) and "previously prepared" in err
    assert images() == before
    assert sorted(p.name for p in (data_dir / "salicon2015").iterdir()) == [".lock", "1.0.0"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_prepare_is_one_line_and_keeps_the_prepared_dataset(tmp_path, capsys,
                                                                          monkeypatch, signal_name):
    """Ctrl-C while writing was a long KeyboardInterrupt traceback (the dataset itself was
    safe); SIGTERM killed prepare --overwrite with the prepared dataset set aside, which
    train and evaluate then called not prepared."""
    import signal

    from mlnet_jax import interrupts
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    fake.write_salicon(manual, {"train": 3, "validation": 1})
    args = ["salicon2015", "--manual_dir", str(manual), "--data_dir", str(data_dir)]
    assert _cli(args, capsys)[0] == 0
    def images():
        return {k: r["image"] for k, r in _read_all("salicon2015", "train", data_dir).items()}

    before = images()
    calls = []

    def read_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # raised as the signal raises it (a real one lands at random)
            assert signal.getsignal(signal.SIGTERM) is interrupts._raise_terminated
            raise KeyboardInterrupt if signal_name == "SIGINT" else interrupts.Terminated
        return read_fixations(*args, **kwargs)

    read_fixations = records.read_fixations
    monkeypatch.setattr(records, "read_fixations", read_then_interrupt)
    code, _, err = _cli(args + ["--overwrite"], capsys)
    assert code == {"SIGINT": 130, "SIGTERM": 143}[signal_name] and "Traceback" not in err
    assert f"{'interrupted' if signal_name == 'SIGINT' else 'terminated'}; nothing half-written is kept" in err
    assert images() == before
    assert sorted(p.name for p in (data_dir / "salicon2015").iterdir()) == [".lock", "1.0.0"]


# -1 too: prepare's --workers documents no meaning for it (unlike the training config's
# worker_count = -1); accepting it would pass a negative thread count on.
@pytest.mark.parametrize("workers", [-1, -3])
def test_a_negative_worker_count_is_refused(tmp_path, capsys, workers):
    fake.write_folder(tmp_path / "manual", n=3)
    assert main(["folder", "--manual_dir", str(tmp_path / "manual"), "--data_dir",
                 str(tmp_path / "tfds"), "--workers", str(workers)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --workers must be at least 0 (0: the CPU count, at most 8), got {workers}")
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError('Failed to finalize writing of split "train": write() failed: No space left on '
                 "device; writing /data/incomplete.X/salicon2015-train.array_record"),
])
def test_a_full_disk_during_prepare_is_one_line_and_keeps_the_prepared_dataset(
        tmp_path, capsys, monkeypatch, failure):
    """Was a 44-line traceback ending in array_record's RuntimeError (the data was safe)."""
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    fake.write_salicon(manual, {"train": 3, "validation": 1})
    args = ["salicon2015", "--manual_dir", str(manual), "--data_dir", str(data_dir)]
    assert _cli(args, capsys)[0] == 0
    before = _read_all("salicon2015", "train", data_dir)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(records, "read_fixations", fail)
    code, _, err = _cli(args + ["--overwrite"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: could not write salicon2015 in {data_dir / 'salicon2015' / '1.0.0'} (No space "
        "left on device); nothing "
        "half-written is kept, the dataset prepared before is: free space (or fix that) and rerun")
    assert _read_all("salicon2015", "train", data_dir).keys() == before.keys()
    monkeypatch.setattr(records, "read_fixations", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("a bug, not a full disk")))
    with pytest.raises(ValueError, match="a bug"):  # anything else is not called a full disk
        prepare("salicon2015", str(manual), str(data_dir), overwrite=True, progress=False)


def test_what_a_stopped_prepare_left_is_cleaned_and_a_set_aside_dataset_put_back(
        tmp_path, capsys):
    from mlnet_jax.file_lock import exclusive_lock
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 3, "validation": 1})
    data_dir = tmp_path / "tfds"
    args = ["salicon2015", "--manual_dir", str(manual), "--data_dir", str(data_dir)]
    assert _cli(args, capsys)[0] == 0

    def images():
        return {k: r["image"] for k, r in _read_all("salicon2015", "train", data_dir).items()}

    before = images()
    assert len(before) == 3
    # As a prepare --overwrite killed while writing leaves it: the old dataset set aside,
    # TFDS's half-written folder beside it.
    folder = data_dir / "salicon2015"
    (folder / "1.0.0").rename(folder / ".1.0.0.previous")
    (folder / "incomplete.ABC123_1.0.0" / "x").mkdir(parents=True)
    code, out, err = _cli(args, capsys)
    assert code == 0 and "put back the salicon2015 prepared earlier" in err
    assert "incomplete.ABC123_1.0.0" in err and "already prepared" in err
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "1.0.0"]
    assert images() == before
    # Stopped after the rebuild was complete but before the old copy was removed.
    shutil.copytree(folder / "1.0.0", folder / ".1.0.0.previous")
    code, out, err = _cli(args, capsys)
    assert code == 0 and "the copy an --overwrite that was stopped had kept" in err
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "1.0.0"]
    assert images() == before
    # A second prepare while one is building is refused, not interleaved.
    with exclusive_lock(folder / ".lock", "held"):
        code, _, err = _cli(args + ["--overwrite"], capsys)
    assert code == 2 and "is being prepared in" in _error_line(err)
    assert images() == before


@pytest.mark.parametrize("cut", [0, 100])
def test_cli_empty_or_cut_short_mat_is_named(tmp_path, capsys, cut):
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 2, "validation": 1})
    mat = manual / "fixations" / "train" / "COCO_train2014_000000000002.mat"
    mat.write_bytes(mat.read_bytes()[:cut])
    code, _, err = _cli(["salicon2015", "--manual_dir", str(manual), "--data_dir",
                         str(tmp_path / "tfds")], capsys)
    assert code == 2 and f"cannot read fixations {mat}" in _error_line(err)
    assert "Traceback" not in err


@pytest.mark.parametrize("fields, missing", [(("location",), "'gaze.fixations'"),
                                             (None, "'gaze'")])
def test_cli_mat_without_gaze_fields(tmp_path, capsys, fields, missing):
    manual = tmp_path / "manual"
    fake.write_salicon(manual, {"train": 2, "validation": 1})
    mat = manual / "fixations" / "train" / "COCO_train2014_000000000001.mat"
    if fields is None:
        scipy.io.savemat(str(mat), {"image": "x", "resolution": np.array([[24, 32]])})
    else:
        fake.salicon_mat(mat, [np.array([[1, 1]])], (24, 32), fields=fields)
    code, _, err = _cli(["salicon2015", "--manual_dir", str(manual), "--data_dir",
                         str(tmp_path / "tfds")], capsys)
    line = _error_line(err)
    assert code == 2 and str(mat) in line and missing in line


def test_malformed_fixation_and_map_values_are_named_or_warned(tmp_path, caplog):
    """Text where SALICON's resolution goes, a struct or cell array as CAT2000's fixLocs and
    complex fixations are one-line errors naming the file; a float map's NaN pixels are taken
    as 0 with a warning (one NaN made its peak NaN, and the whole map zero, blamed on the map)."""
    mat = tmp_path / "f.mat"
    with pytest.raises(UserError, match=f"{mat}: 'resolution' must be the numbers"):
        records.at_image_size(np.array([[1.0, 1.0]]), {"resolution": np.array(["480x640"])},
                              (24, 32), mat)
    with pytest.raises(UserError, match=f"{mat}: fixations must be real numbers"):
        records.xy1_to_rc0(np.array([[1 + 1j, 2.0]]), (24, 32), mat)
    for fixlocs, kind in (({"a": np.ones((2, 2))}, "a struct or cell array"),
                          (np.array(["ab", "cd"]), "text")):
        scipy.io.savemat(str(mat), {"fixLocs": fixlocs})
        item = layouts.Item(key="x", image=tmp_path / "x.jpg", fixations=mat,
                            fixation_format="fixlocs_mat", file_name="x.jpg")
        with pytest.raises(UserError, match=f"{mat}: 'fixLocs' must be a 2-D binary matrix, "
                                            f"not {kind}"):
            records.read_fixations(item, (24, 32))
    # A MATLAB sparse fixLocs (scipy reads it as a sparse matrix) was "a struct or cell array".
    locs = np.zeros((24, 32))
    locs[3, 4] = locs[20, 30] = 1
    scipy.io.savemat(str(mat), {"fixLocs": scipy.sparse.csc_matrix(locs)})
    item = layouts.Item(key="x", image=tmp_path / "x.jpg", fixations=mat,
                        fixation_format="fixlocs_mat", file_name="x.jpg")
    caplog.set_level(logging.WARNING)
    assert records.read_fixations(item, (24, 32)).tolist() == [[3, 4], [20, 30]]
    # A file without a single fixation is kept, and said: its image drops out of NSS and AUCs.
    assert "no fixations" not in caplog.text
    scipy.io.savemat(str(mat), {"fixLocs": np.zeros((24, 32))})
    assert records.read_fixations(item, (24, 32)).shape == (0, 2)
    assert f"{mat}: no fixations; kept (this image's NSS and AUCs are NaN" in caplog.text
    values = np.ones((4, 5), np.float32)
    values[1, 2], values[3, 0] = np.nan, 0.5
    grey = records.grey_map(Image.fromarray(values, "F"), tmp_path / "m.tif")
    assert grey[0, 0] == 255 and grey[1, 2] == 0 and grey[3, 0] == 128
    assert "m.tif: 1 map pixels are not finite numbers (NaN or Inf); taken as 0" in caplog.text


def test_cli_debug_shows_traceback(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main(["folder", "--manual_dir", str(tmp_path / "nowhere"), "--debug"])


def test_map_of_other_size_is_resized_and_blank_map_accepted(tmp_path, caplog):
    manual = tmp_path / "manual"
    fake.write_folder(manual, n=3, fixations=None)
    fake.save(np.full((12, 16), 200, np.uint8), manual / "maps" / "img00.png")
    fake.save(np.zeros((24, 32), np.uint8), manual / "maps" / "img01.png")
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        prepare("folder", str(manual), str(tmp_path / "tfds"), validation_fraction=0.0,
                progress=False)
    assert "img00.png: map is 12x16 but its image is 24x32; resized" in caplog.text
    assert "img01.png: map is all zero" in caplog.text
    got = _read_all("folder", "train", tmp_path / "tfds")
    resized = _decode(got["img00.png"]["saliency_map"])
    assert resized.shape == (24, 32) and (resized == 200).all()
    assert not _decode(got["img01.png"]["saliency_map"]).any()


def test_exif_orientation_is_named_and_the_stored_grid_kept(tmp_path, caplog):
    # Maps and fixations refer to the image as the eye tracker showed it: as stored.
    manual = tmp_path / "manual"
    truth = fake.write_folder(manual, n=2, fixations="mat")
    turned = manual / "images" / "img00.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "display turned 90°"
    Image.open(turned).save(turned, exif=exif.tobytes())
    with caplog.at_level(logging.WARNING, logger="mlnet_jax.datasets"):
        prepare("folder", str(manual), str(tmp_path / "tfds"), validation_fraction=0.0,
                progress=False)
    assert "img00.png: EXIF orientation 6 ignored" in caplog.text and "img01.png" not in caplog.text
    got = _read_all("folder", "train", tmp_path / "tfds")
    assert tuple(got["img00.png"]["image_size"]) == (24, 32)
    assert got["img00.png"]["image"] == turned.read_bytes()
    assert {tuple(p) for p in got["img00.png"]["fixations"].tolist()} == truth["img00.png"]["fixations"]


def test_open_source_not_prepared_names_data_dir_and_command(tmp_path, caplog):
    """... and only that: TFDS's own warning about the missing dataset_info.json came first."""
    caplog.set_level("WARNING")
    with pytest.raises(UserError) as info:
        open_source("salicon2015", "train", str(tmp_path / "tfds"))
    message = str(info.value)
    assert str(tmp_path / "tfds") in message
    assert "python -m mlnet_jax.datasets.prepare salicon2015" in message
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_validation_fraction_only_for_folder(tmp_path, capsys):
    fake.write_mit1003(tmp_path / "manual", n=2)
    code, _, err = _cli(["mit1003", "--manual_dir", str(tmp_path / "manual"),
                         "--validation_fraction", "0.5"], capsys)
    assert code == 2 and "folder" in _error_line(err)


def test_check_split_sizes_is_silent_for_official_sizes():
    assert prepare_cli.check_split_sizes("mit1003", {"train": 900, "validation": 103}) == []
    assert len(prepare_cli.check_split_sizes("cat2000", {"train": 1800})) == 1
    # SALICON's test images are optional: no warning when they were not prepared at all.
    assert prepare_cli.check_split_sizes("salicon2015", {"train": 10000, "validation": 5000}) == []
    assert len(prepare_cli.check_split_sizes(
        "salicon2017", {"train": 10000, "validation": 5000, "test": 40})) == 1
