"""Input pipeline: saliency records → letterboxed uint8 images and float targets, with grain.

Records (from a prepared TFDS dataset, or any random-access sequence such as an in-memory list)
are dicts with ``image`` (encoded JPEG/PNG bytes), ``saliency_map`` (encoded PNG of the uint8
map, ``b""`` when the split has none), ``fixations`` (int32 (N, 2) 0-based (row, col)),
``image_size`` (int32 (rows, cols)), ``file_name`` (str) and ``category`` (str, ``''`` when none).

Images stay uint8 on the host (4× less to copy than float32); normalisation to the caffe/torch
convention happens on the device (:func:`mlnet_jax.preprocessing.normalize`). Targets follow
SPEC §1: the map letterboxed like the image, bilinearly resized to 1/8 of the model size, / 255.
Decoding runs on grain's read threads and, with ``worker_count`` > 0, in worker processes.
"""

from __future__ import annotations

import collections
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from mlnet_jax.errors import UserError
from mlnet_jax.image_io import to_rgb
from mlnet_jax.preprocessing import ground_truth_map, letterbox

OUTPUT_STRIDE = 8
RECORD_KEYS = ("image", "saliency_map", "fixations", "image_size", "file_name", "category")


# --------------------------------------------------------------------------- records

def _as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, np.ndarray):
        value = value.item() if value.size else b""
    return bytes(value)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, np.ndarray):
        value = value.item() if value.size else ""
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def as_record(raw: dict) -> dict:
    """A record in the schema above (TFDS gives bytes for text; lists may omit empty fields)."""
    if "image" not in raw:
        raise UserError(f"a record has no 'image' (keys: {', '.join(sorted(raw))})")
    fixations = raw.get("fixations")
    fixations = (np.zeros((0, 2), np.int32) if fixations is None
                 else np.asarray(fixations, np.int32).reshape(-1, 2))
    image_size = raw.get("image_size")
    return {
        "image": _as_bytes(raw["image"]),
        "saliency_map": _as_bytes(raw.get("saliency_map")),
        "fixations": fixations,
        "image_size": None if image_size is None else np.asarray(image_size, np.int32),
        "file_name": _as_text(raw.get("file_name")),
        "category": _as_text(raw.get("category")),
    }


class RecordSource(grain.sources.RandomAccessDataSource):
    """Any random-access source of saliency records, returning :func:`as_record` dicts.

    Its ``repr`` is stable (no memory addresses, no data) because grain stores it in iterator
    checkpoints and refuses to restore into a loader whose source repr differs.
    """

    def __init__(self, source: Sequence[dict], description: str | None = None,
                 fingerprint: dict | None = None):
        self._source = source
        #: What tells this split from the same split prepared again from other files (its
        #: size in bytes and shard lengths), None where the config alone defines the data.
        self.fingerprint = fingerprint
        if description is None:
            own_repr = type(source).__repr__ is not object.__repr__ and not isinstance(
                source, list | tuple)
            description = repr(source) if own_repr else f"{type(source).__name__}"
        self._description = description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return as_record(self._source[int(index)])

    def __repr__(self) -> str:
        return f"RecordSource({self._description}, len={len(self)})"


def as_source(source) -> RecordSource:
    return source if isinstance(source, RecordSource) else RecordSource(source)


def open_source(name: str, split: str, data_dir: str | None = None) -> RecordSource:
    """The prepared TFDS dataset ``name``'s ``split`` as a random-access source (no TensorFlow).

    Raises UserError naming the data_dir and the prepare command when it is not prepared.
    """
    from mlnet_jax.datasets import builders  # noqa: PLC0415 — TFDS only when reading TFDS

    builder = builders.get_builder(name, data_dir)
    if not builder.is_prepared():
        flag = f" --data_dir {data_dir}" if data_dir else ""
        raise UserError(
            f"dataset {name} is not prepared in {builder.data_dir}: run "
            f"`python -m mlnet_jax.datasets.prepare {name} --manual_dir DIR{flag}` first")
    splits = list(builder.info.splits)
    if split not in splits:
        raise UserError(f"dataset {name} (in {builder.data_dir}) has no split {split!r}; "
                        f"it has {', '.join(splits)}")
    builders.check_shards(builder, [split])
    info = builder.info.splits[split]
    return RecordSource(builder.as_data_source(split), description=f"{name}/{split}",
                        fingerprint={"num_bytes": int(info.num_bytes),
                                     "shard_lengths": [int(n) for n in info.shard_lengths]})


# --------------------------------------------------------------------------- decoding

def check_model_size(model_size: Sequence[int]) -> tuple[int, int]:
    rows, cols = (int(v) for v in model_size)
    if rows <= 0 or cols <= 0 or rows % OUTPUT_STRIDE or cols % OUTPUT_STRIDE:
        raise UserError(f"model size must be positive and divisible by {OUTPUT_STRIDE}, "
                        f"got {rows}x{cols}")
    return rows, cols


def decode_image(record: dict) -> Image.Image:
    """RGB as prediction reads it (:func:`mlnet_jax.image_io.to_rgb`: 16-bit scaled, not
    clipped; transparency on white), so a model trains on the pixels it will be shown."""
    try:
        pil = Image.open(io.BytesIO(record["image"]))
        if pil.mode == "RGB":
            pil.load()
            return pil
        return Image.fromarray(to_rgb(pil))
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode the image of {record['file_name'] or 'a record'}: "
                        f"{e}") from None


def decode_map(record: dict, size: tuple[int, int]) -> Image.Image:
    """The grey map as PIL ``L`` at ``size`` (cols, rows) — the image's size, as prepared."""
    if not record["saliency_map"]:
        raise UserError(f"{record['file_name'] or 'a record'} has no saliency map (a test "
                        f"split?); it cannot be used for training or evaluation")
    try:
        pil = Image.open(io.BytesIO(record["saliency_map"])).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode the map of {record['file_name'] or 'a record'}: "
                        f"{e}") from None
    return pil if pil.size == size else pil.resize(size, Image.BILINEAR)


class TrainExample(grain.transforms.Map):
    """Record → ``{'image': uint8 (rows, cols, 3), 'target': float32 (rows/8, cols/8, 1)}``."""

    def __init__(self, model_size: Sequence[int]):
        self.model_size = check_model_size(model_size)
        self.output_size = (self.model_size[0] // OUTPUT_STRIDE,
                            self.model_size[1] // OUTPUT_STRIDE)

    def map(self, record: dict) -> dict:
        record = as_record(record)
        image = decode_image(record)
        target = ground_truth_map(decode_map(record, image.size), self.model_size,
                                  self.output_size)
        return {"image": letterbox(image, self.model_size), "target": target[..., None]}


class EvalExample(TrainExample):
    """Like :class:`TrainExample`, plus what metrics at ground-truth resolution need."""

    def map(self, record: dict) -> dict:
        record = as_record(record)
        image = decode_image(record)
        example = {"image": letterbox(image, self.model_size), "fixations": record["fixations"],
                   "image_size": np.asarray((image.height, image.width), np.int32),
                   "file_name": record["file_name"], "category": record["category"]}
        if record["saliency_map"]:
            smap = decode_map(record, image.size)
            example["target"] = ground_truth_map(smap, self.model_size, self.output_size)[
                ..., None]
            example["saliency_map_full"] = np.asarray(smap, np.float32) / 255.0
        else:  # test split: images only
            example["target"] = np.zeros(self.output_size + (1,), np.float32)
            example["saliency_map_full"] = None
        return example


# --------------------------------------------------------------------------- loaders

def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags (its profiler switch); a program that never
    parsed absl flags (anything not started by ``absl.app.run``) would fail with
    UnparsedFlagAccessError, so their defaults are marked as parsed."""
    from absl import flags  # noqa: PLC0415

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if shard_index is None else int(shard_index)
    count = jax.process_count() if shard_count is None else int(shard_count)
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard_index must be in [0, shard_count), got {index} of {count}")
    return index, count


class DecodedSource(grain.sources.RandomAccessDataSource):
    """``transform.map(source[i])``: decoding inside the source lets grain's read threads decode
    in parallel (PIL releases the GIL) even without worker processes."""

    def __init__(self, source: RecordSource, transform: TrainExample):
        self._source, self._transform = source, transform

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._transform.map(self._source[index])

    def __repr__(self) -> str:
        return (f"DecodedSource({self._source!r}, {type(self._transform).__name__}"
                f"{self._transform.model_size})")


def auto_worker_count(backend: str, cores: int | None = None) -> int:
    """Worker processes for ``worker_count = -1``: none on a CPU-only machine (the cores do the
    training), else a quarter of the cores, at most 4. On a 16-core H200 host, in-process
    decoding fed 55 % of the training rate at 32 × 480×640 and 4 workers 99 %
    (benchmarks/results/2026-11-26-nvidia-h200.json)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 0 if backend == "cpu" else min(4, cores // 4)


def _threads(read_threads: int | None, worker_count: int) -> int:
    if read_threads:
        return int(read_threads)
    cores = os.cpu_count() or 1
    return max(1, min(16, cores // max(1, worker_count)))


def train_loader(source, *, model_size: Sequence[int], global_batch_size: int, seed: int,
                 num_epochs: int | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, worker_count: int = 0,
                 drop_remainder: bool = True, worker_buffer_size: int = 2,
                 read_threads: int | None = None) -> grain.DataLoaderIterator:
    """Shuffled training batches of this process's shard, as a grain ``DataLoaderIterator``.

    Yields ``{'image': uint8 (B, rows, cols, 3), 'target': float32 (B, rows/8, cols/8, 1)}``
    with B = ``global_batch_size // shard_count``. Every epoch is reshuffled from ``seed``
    (grain ``IndexSampler``); process k reads only records of its shard (a contiguous 1/K of
    the records, equal sizes: up to K − 1 records are left out), so the K local batches of a
    step form the global batch. ``get_state()`` / ``set_state()`` resume exactly (a state is
    only valid for the same source, seed, sharding and ``worker_count``). ``shard_index`` /
    ``shard_count`` default to ``jax.process_index()`` / ``jax.process_count()``.
    Decoding runs on ``read_threads`` threads (default: cores / max(1, workers), at most 16) in
    each of ``worker_count`` processes (0: in this process). With workers, batch arrays are
    grain ``SharedMemoryArray`` objects (NumPy subclasses): drop them after use — do not keep
    them in module globals until the interpreter exits.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    src = as_source(source)
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise UserError(f"global batch size {global_batch_size} must be a positive multiple of "
                        f"the number of processes ({shard_count})")
    local_batch = global_batch_size // shard_count
    if len(src) < shard_count:
        raise UserError(f"{src!r} has {len(src)} records, fewer than the {shard_count} "
                        f"processes that share it")
    if not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2 ** 32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not src[0]["saliency_map"]:
        raise UserError(f"{src!r} has no saliency maps (a test split?); it cannot be used for "
                        f"training")
    if worker_count > 0:
        _absl_flags_ready()
    shard_options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(src), shard_options=shard_options, shuffle=True,
        num_epochs=num_epochs, seed=int(seed))
    loader = grain.DataLoader(
        data_source=DecodedSource(src, TrainExample(model_size)), sampler=sampler,
        shard_options=shard_options,
        operations=[grain.transforms.Batch(local_batch, drop_remainder=drop_remainder)],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=_threads(read_threads, worker_count),
                                       prefetch_buffer_size=max(2 * local_batch, 16)))
    return iter(loader)


def shard_range(n: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """[start, stop) of the contiguous records process ``shard_index`` of ``shard_count`` evaluates."""
    return shard_index * n // shard_count, (shard_index + 1) * n // shard_count


def _stack_eval(examples: list[dict], batch_size: int, model_size: tuple[int, int]) -> dict:
    rows, cols = model_size
    image = np.zeros((batch_size, rows, cols, 3), np.uint8)
    target = np.zeros((batch_size, rows // OUTPUT_STRIDE, cols // OUTPUT_STRIDE, 1), np.float32)
    mask = np.zeros((batch_size,), bool)
    for i, example in enumerate(examples):
        image[i], target[i], mask[i] = example["image"], example["target"], True
    batch = {"image": image, "target": target, "mask": mask}
    for key in ("saliency_map_full", "fixations", "image_size", "file_name", "category"):
        # Copies: arrays from worker processes live in shared memory until dropped.
        batch[key] = [np.array(example[key]) if isinstance(example[key], np.ndarray)
                      else example[key] for example in examples]
    return batch


def eval_batches(source, *, model_size: Sequence[int], batch_size: int,
                 shard_index: int | None = None, shard_count: int | None = None,
                 worker_count: int = 0, read_threads: int | None = None) -> Iterator[dict]:
    """Every record of this process's shard once, in source order, in padded batches.

    Each batch: ``image`` uint8 (batch_size, rows, cols, 3), ``target`` float32
    (batch_size, rows/8, cols/8, 1), ``mask`` bool (batch_size,) marking real rows (they come
    first), and per-image lists for the real rows only — ``saliency_map_full`` (float32 map in
    [0, 1] at the original image size; ``None`` for a split without maps), ``fixations``
    (int32 (N, 2) 0-based (row, col)), ``image_size`` (int32 (rows, cols)), ``file_name`` and
    ``category``. ``batch_size`` is per process; process k of K takes the contiguous records
    [k·n/K, (k+1)·n/K) and every process yields the same number of batches (trailing ones
    fully masked), so collective steps stay in lockstep.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    model_size = check_model_size(model_size)
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    src = as_source(source)
    n = len(src)
    start, stop = shard_range(n, shard_index, shard_count)
    num_batches = math.ceil(math.ceil(n / shard_count) / batch_size)
    return _eval_iterator(src, model_size, batch_size, start, stop, num_batches, worker_count,
                          _threads(read_threads, worker_count))


def _eval_iterator(src: RecordSource, model_size: tuple[int, int], batch_size: int, start: int,
                   stop: int, num_batches: int, worker_count: int,
                   read_threads: int) -> Iterator[dict]:
    examples: Iterator[dict] = iter(())
    if stop > start:
        dataset = grain.MapDataset.source(src)[start:stop].map(EvalExample(model_size))
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 16)))
        if worker_count > 0:
            _absl_flags_ready()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        examples = iter(iter_ds)
    try:
        for _ in range(num_batches):
            chunk = [example for _, example in zip(range(batch_size), examples)]
            yield _stack_eval(chunk, batch_size, model_size)
    finally:  # stop worker processes and free their shared memory now, not at exit
        close = getattr(examples, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- device

def _to_device(tree, sharding):
    if isinstance(tree, dict):
        return {k: _to_device(v, sharding) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        if type(tree) is not np.ndarray and _on_cpu(sharding):
            # A grain worker's batch in shared memory: a CPU array would alias it (no copy), and
            # its segment, exported, could never be unlinked: /dev/shm filled batch by batch.
            tree = np.array(tree)
        if sharding is None:
            return jax.device_put(tree)
        return jax.make_array_from_process_local_data(sharding, tree)
    return tree  # per-image lists, strings: stay on the host


def _on_cpu(sharding) -> bool:
    devices = jax.devices() if sharding is None else sharding.device_set
    return next(iter(devices)).platform == "cpu"


class DevicePrefetcher(Iterator[dict]):
    """Keeps ``size`` batches in flight to the devices while the caller computes.

    NumPy arrays (at any depth of dicts) become global ``jax.Array``\\ s on ``sharding`` (each
    process passes its own rows); lists stay on the host. When the wrapped iterator has
    ``get_state`` / ``set_state``, so does this one, and its state is that of the next batch
    *this* iterator will yield — batches already prefetched are not skipped on resume.
    """

    def __init__(self, iterator: Iterator[dict], size: int = 2, sharding=None):
        self._iterator = iterator
        self._size = max(1, int(size))
        self._sharding = sharding
        self._queue: collections.deque = collections.deque()
        self._stateful = hasattr(iterator, "get_state")

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _fill(self) -> None:
        while len(self._queue) < self._size:
            state = self._iterator.get_state() if self._stateful else None
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            self._queue.append((state, _to_device(batch, self._sharding)))

    def __next__(self) -> dict:
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()
        return batch

    def get_state(self):
        if not self._stateful:
            raise TypeError(f"{type(self._iterator).__name__} has no get_state")
        return self._queue[0][0] if self._queue else self._iterator.get_state()

    def set_state(self, state) -> None:
        self._queue.clear()
        self._iterator.set_state(state)


def prefetch_to_device(iterator: Iterator[dict], size: int = 2,
                       sharding=None) -> DevicePrefetcher:
    """Overlap host→device transfer with compute; ``sharding`` is a NamedSharding splitting the
    batch axis (``mlnet_jax.sharding.batch_sharding(mesh)``), ``None`` for the default device."""
    return DevicePrefetcher(iterator, size, sharding)
