"""The grain input pipeline: shapes, determinism, sharding, exact resume, eval batches."""

from __future__ import annotations

import io
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import fake_datasets as fake
from mlnet_jax import input_pipeline as ip
from mlnet_jax.errors import UserError
from mlnet_jax.preprocessing import ground_truth_map, letterbox
from mlnet_jax.sharding import batch_sharding, data_mesh

MODEL = (16, 24)  # rows, cols: divisible by 8 → targets are 2×3


def make_records(n: int, seed: int = 0) -> list[dict]:
    """In-memory records in the pipeline's schema; image i is tagged by its top-left pixel's
    red value (i * 7 + 3) so batches can be traced back to records."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = (24, 32) if i % 3 else (30, 20)  # some portrait images get letterboxed
        image = fake.smooth_image(rng, size)
        saliency = fake.blob_map(rng, size)
        out.append({
            "image": fake.encode(image, "PNG"), "saliency_map": fake.encode(saliency, "PNG"),
            "fixations": fake.random_points(rng, size, 3).astype(np.int32),
            "image_size": np.asarray(size, np.int32), "file_name": f"r{i:02d}.png",
            "category": "",
        })
    return out


RECORDS = make_records(12)


def expected_example(record: dict) -> tuple[np.ndarray, np.ndarray]:
    image = Image.open(io.BytesIO(record["image"])).convert("RGB")
    smap = Image.open(io.BytesIO(record["saliency_map"]))
    return (letterbox(image, MODEL),
            ground_truth_map(smap, MODEL, (MODEL[0] // 8, MODEL[1] // 8))[..., None])


EXPECTED = [expected_example(r) for r in RECORDS]


def identify(image: np.ndarray) -> int:
    """Index of the record whose letterboxed image this is."""
    matches = [i for i, (e, _) in enumerate(EXPECTED) if np.array_equal(e, image)]
    assert len(matches) == 1
    return matches[0]


def order(iterator, batches: int) -> list[int]:
    return [identify(image) for _ in range(batches) for image in next(iterator)["image"]]


def loader(records=RECORDS, **kwargs):
    kwargs = {"model_size": MODEL, "global_batch_size": 4, "seed": 7, "shard_index": 0,
              "shard_count": 1, **kwargs}
    return ip.train_loader(records, **kwargs)


def test_train_batches_shapes_dtypes_and_values():
    batch = next(loader())
    assert batch["image"].shape == (4, *MODEL, 3) and batch["image"].dtype == np.uint8
    assert batch["target"].shape == (4, 2, 3, 1) and batch["target"].dtype == np.float32
    assert 0 <= batch["target"].min() and batch["target"].max() <= 1
    for image, target in zip(batch["image"], batch["target"]):
        np.testing.assert_array_equal(target, EXPECTED[identify(image)][1])


def test_a_map_of_another_size_than_its_image_is_stretched_to_the_image_first():
    """A record (from Python: prepared datasets are resized already) whose map is half its
    image's size: the map is stretched to the image (cols, rows), then letterboxed like it."""
    rng = np.random.default_rng(3)
    image, smap = fake.smooth_image(rng, (30, 20)), fake.blob_map(rng, (15, 10))
    record = dict(RECORDS[0], image=fake.encode(image, "PNG"), saliency_map=fake.encode(smap, "PNG"),
                  image_size=np.asarray((30, 20), np.int32))
    stretched = Image.fromarray(smap).resize((20, 30), Image.BILINEAR)
    want = ground_truth_map(stretched, MODEL, (MODEL[0] // 8, MODEL[1] // 8))[..., None]
    np.testing.assert_array_equal(ip.TrainExample(MODEL).map(record)["target"], want)


def test_same_seed_same_order_and_each_epoch_reshuffled():
    first, again = order(loader(), 6), order(loader(), 6)  # two epochs of 12
    assert first == again
    assert sorted(first[:12]) == list(range(12)) and sorted(first[12:]) == list(range(12))
    assert first[:12] != first[12:]  # reshuffled per epoch
    assert order(loader(seed=8), 3) != first[:12]


def test_num_epochs_ends_the_iterator():
    it = loader(num_epochs=2)
    assert len(order(it, 6)) == 24
    with pytest.raises(StopIteration):
        next(it)


def test_process_shards_are_disjoint_and_cover_the_epoch():
    shards = [order(loader(global_batch_size=4, shard_index=k, shard_count=2), 3)
              for k in range(2)]  # local batch 2, 3 batches = one epoch of a 6-record shard
    assert next(loader(shard_index=1, shard_count=2))["image"].shape[0] == 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(12))


@pytest.mark.parametrize("worker_count", [0, 1])
def test_restored_state_continues_with_exactly_the_next_batch(worker_count):
    it = loader(worker_count=worker_count)
    order(it, 2)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (12 records)
    resumed = loader(worker_count=worker_count)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["target"], want["target"])


def test_eval_batches_cover_each_record_once_in_order_with_padding():
    batches = list(ip.eval_batches(RECORDS[:5], model_size=MODEL, batch_size=2))
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    names = [n for b in batches for n in b["file_name"]]
    assert names == [r["file_name"] for r in RECORDS[:5]]
    last = batches[-1]
    assert last["image"].shape == (2, *MODEL, 3) and not last["image"][1].any()
    assert len(last["saliency_map_full"]) == 1
    for b in batches:
        for i, name in enumerate(b["file_name"]):
            record = RECORDS[int(name[1:3])]
            np.testing.assert_array_equal(b["image"][i], EXPECTED[int(name[1:3])][0])
            full = b["saliency_map_full"][i]
            assert full.dtype == np.float32 and full.shape == tuple(record["image_size"])
            np.testing.assert_allclose(
                full, np.asarray(Image.open(io.BytesIO(record["saliency_map"]))) / 255.0,
                rtol=1e-6)
            np.testing.assert_array_equal(b["fixations"][i], record["fixations"])
            np.testing.assert_array_equal(b["image_size"][i], record["image_size"])


def test_eval_shards_are_disjoint_cover_and_stay_in_lockstep():
    shards = [list(ip.eval_batches(RECORDS[:7], model_size=MODEL, batch_size=2, shard_index=k,
                                   shard_count=2)) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2  # ceil(ceil(7/2)/2)
    names = [[n for b in shard for n in b["file_name"]] for shard in shards]
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == [r["file_name"] for r in RECORDS[:7]]
    assert sum(int(b["mask"].sum()) for shard in shards for b in shard) == 7
    # Every process yields as many batches as the largest shard needs: counted from its own
    # shard, a process with fewer records would stop early and the others' collectives hang.
    for n in range(1, 9):
        for count in (2, 3):
            sizes = [(k + 1) * n // count - k * n // count for k in range(count)]
            for batch in (1, 2, 3):
                shards = [list(ip.eval_batches(RECORDS[:n], model_size=MODEL, batch_size=batch,
                                               shard_index=k, shard_count=count))
                          for k in range(count)]
                want = max(math.ceil(size / batch) for size in sizes)
                assert [len(s) for s in shards] == [want] * count, (n, count, batch)
                assert [sum(int(b["mask"].sum()) for b in s) for s in shards] == sizes


def test_prefetch_to_device_and_its_state():
    sharding = batch_sharding(data_mesh())
    it = ip.prefetch_to_device(loader(), size=2, sharding=sharding)
    first = next(it)
    assert isinstance(first["image"], jax.Array) and first["image"].sharding == sharding
    state = it.get_state()  # the host iterator is already ahead; this is the next batch's
    want = [np.asarray(next(it)["image"]) for _ in range(2)]
    resumed = ip.prefetch_to_device(loader(), size=2, sharding=sharding)
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), w)
    eval_it = ip.prefetch_to_device(ip.eval_batches(RECORDS[:3], model_size=MODEL,
                                                    batch_size=2), size=1)
    batch = next(eval_it)
    assert isinstance(batch["mask"], jax.Array) and isinstance(batch["file_name"], list)


@pytest.mark.timeout(120)
def test_worker_batches_on_a_cpu_device_free_their_shared_memory(tmp_path):
    """A CPU array made from a worker's shared-memory batch aliased it, so no segment was ever
    unlinked: /dev/shm grew by a batch per step, and Python warned of leaks at exit."""
    import subprocess
    import sys
    script = tmp_path / "feed.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "def main():\n"
        "    import test_input_pipeline as t\n"
        "    from mlnet_jax import input_pipeline as ip\n"
        "    it = ip.prefetch_to_device(t.loader(worker_count=1), size=2)\n"
        "    first = next(it)['image']\n"
        "    for _ in range(5):\n"
        "        next(it)\n"
        "    print(t.identify(t.np.asarray(first)[0]))\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stderr[-2000:]
    assert "leaked shared_memory" not in out.stderr, out.stderr[-2000:]


def test_tfds_source_feeds_train_and_eval(tmp_path):
    data_dir = fake.prepared_salicon(tmp_path, {"train": 4, "validation": 3, "test": 1})
    train = ip.open_source("salicon2015", "train", str(data_dir))
    batch = next(ip.train_loader(train, model_size=(24, 32), global_batch_size=2, seed=0,
                                 shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, 24, 32, 3) and batch["target"].shape == (2, 3, 4, 1)
    validation = ip.open_source("salicon2015", "validation", str(data_dir))
    batches = list(ip.eval_batches(validation, model_size=(24, 32), batch_size=2))
    assert sum(len(b["fixations"]) for b in batches) == 3
    assert all(len(f) == 5 and f.dtype == np.int32 for b in batches for f in b["fixations"])
    test = ip.open_source("salicon2015", "test", str(data_dir))
    with pytest.raises(UserError, match="no saliency maps"):
        ip.train_loader(test, model_size=(24, 32), global_batch_size=1, seed=0,
                        shard_index=0, shard_count=1)
    (only,) = list(ip.eval_batches(test, model_size=(24, 32), batch_size=1))
    assert only["saliency_map_full"] == [None] and only["mask"].tolist() == [True]


def test_training_decodes_images_as_prediction_reads_them(tmp_path):
    from mlnet_jax.datasets.records import read_image
    from mlnet_jax.image_io import load_image
    rng = np.random.default_rng(0)
    sixteen = rng.integers(0, 65536, (6, 5), dtype=np.uint16)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 128, 255], (6, 5))
    for name, array in (("sixteen.png", sixteen), ("sixteen.tif", sixteen), ("alpha.png", rgba)):
        Image.fromarray(array).save(tmp_path / name)
        data, _ = read_image(tmp_path / name)  # as prepared (a TIFF is re-encoded as PNG)
        decoded = np.asarray(ip.decode_image({"image": data, "file_name": name}))
        np.testing.assert_array_equal(decoded, load_image(tmp_path / name), err_msg=name)
    # Scaled from 16 bits and composited on white, not clipped to white or showing hidden RGB.
    np.testing.assert_array_equal(load_image(tmp_path / "sixteen.png")[..., 0],
                                  np.round(sixteen / 257).astype(np.uint8))
    assert (load_image(tmp_path / "alpha.png")[rgba[..., 3] == 0] == 255).all()


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="divisible by 8"):
        loader(model_size=(20, 24))
    with pytest.raises(UserError, match="multiple of the number of processes"):
        loader(global_batch_size=3, shard_count=2)
    with pytest.raises(UserError, match="seed"):
        loader(seed=-1)


def test_record_source_repr_is_stable_for_checkpoints():
    assert repr(ip.RecordSource(RECORDS)) == "RecordSource(list, len=12)"
    record = ip.RecordSource([{"image": b"x", "file_name": b"a.jpg", "category": np.array(
        b"Art", dtype=object), "fixations": []}])[0]
    assert record["file_name"] == "a.jpg" and record["category"] == "Art"
    assert record["fixations"].shape == (0, 2) and record["saliency_map"] == b""


def test_auto_worker_count_uses_processes_only_beside_an_accelerator():
    assert ip.auto_worker_count("cpu", 64) == 0  # the cores train: no decoding processes
    assert [ip.auto_worker_count("gpu", n) for n in (2, 8, 16, 96)] == [0, 2, 4, 4]
    assert ip.auto_worker_count("tpu", 12) == 3
