"""Train and evaluate ML-Net: ``python -m mlnet_jax.train --config configs/X.py --workdir DIR``.

With no flags it runs the embedded demo (configs/demo.py) into ``runs/demo``.
The step is one ``jax.jit`` over a 1-D device mesh: the global batch is split on the ``data``
axis, parameters and optimiser state are replicated and donated. On several hosts each process
feeds only its shard of every global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlnet_jax.cli import run_absl
from mlnet_jax.compilation_cache import enable_compilation_cache
from mlnet_jax.compute_dtype import compute_dtype
from mlnet_jax.errors import UserError
from mlnet_jax.evaluation import (EvaluationStopped, check_data_fields, evaluate_split,
                                  require_ground_truth)
from mlnet_jax.file_lock import exclusive_lock
from mlnet_jax.first_conv import FIRST_CONV_MODES, unfit_reason
from mlnet_jax.inference import ModelInfo
from mlnet_jax.loss import mlnet_loss
from mlnet_jax.models import OUTPUT_STRIDE, MLNet
from mlnet_jax.optim import keras1_decay_schedule, make_optimizer, merge_params, split_frozen
from mlnet_jax.preprocessing import normalize
from mlnet_jax.prior import prior_penalty
from mlnet_jax.sharding import batch_sharding, data_mesh, replicated
from mlnet_jax.vgg import VGG16_CONVS, scaled_width
from mlnet_jax.weights_file import check_param_shapes

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.py"
DEMO_WORKDIR = "runs/demo"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict          # parameters the optimiser updates
    frozen: dict             # parameters held fixed (no gradient, no optimiser state)
    opt_state: optax.OptState
    rng: jax.Array           # raw uint32 key; dropout uses fold_in(rng, step)

    @property
    def params(self) -> dict:
        return merge_params(self.trainable, self.frozen)


# --------------------------------------------------------------------------- model and state

def model_info_from_config(config, init_metadata: dict | None) -> ModelInfo:
    """The model a config describes; 'auto' fields come from the initial weights."""
    init_metadata = init_metadata or {}
    pooling = config.pooling if config.pooling != "auto" else init_metadata.get("pooling", "standard")
    preprocessing = (config.preprocessing if config.preprocessing != "auto"
                     else init_metadata.get("preprocessing", "caffe"))
    rows, cols = config.input_size
    return ModelInfo(input_size=(rows, cols), preprocessing=preprocessing, pooling=pooling,
                     prior=config.prior, source=init_metadata.get("source", "random"),
                     width_multiplier=config.width_multiplier)


def read_init_weights(path: str) -> tuple[dict | None, dict | None]:
    """(params, metadata) from ``config.init_weights``: a converted .npz or a checkpoint dir."""
    if not path:
        return None, None
    p = Path(path).expanduser()
    if p.is_dir():
        from mlnet_jax.checkpointing import restore_for_inference
        return restore_for_inference(p)
    from mlnet_jax.weights_file import read_weights
    if not p.exists():
        hint = ("a training workdir: train it first, e.g. with configs/salicon.py" if not p.suffix
                else "convert weights with python -m mlnet_jax.convert_weights")
        raise UserError(f"config.init_weights: {p} does not exist ({hint}; or set "
                        "--config.init_weights='' for random weights)")
    return read_weights(p)


def initial_params(model: MLNet, info: ModelInfo, rng: jax.Array, loaded: dict | None) -> dict:
    """Random parameters, overwritten by whatever of backbone/head/prior ``loaded`` holds."""
    rows, cols = info.input_size
    params = jax.jit(model.init)(rng, jnp.zeros((1, rows, cols, 3)))["params"]
    params = flax.core.unfreeze(params)
    if loaded is not None and "prior" in loaded and "prior" not in params:
        _log("config.prior is False: the prior in config.init_weights is not used")
    for key in ("backbone", "head", "prior"):
        if loaded is not None and key in loaded and key in params:
            check_param_shapes({key: params[key]}, {key: loaded[key]}, "config.init_weights",
                               needs="this config's model needs",
                               hint=" (different input_size or width_multiplier?)")
            params[key] = jax.tree.map(jnp.asarray, loaded[key])
    return params


def create_train_state(params: dict, tx: optax.GradientTransformation, frozen_convs: int,
                       seed: int) -> TrainState:
    trainable, frozen = split_frozen(params, frozen_convs)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------- steps

def train_step(state: TrainState, batch: dict, *, model: MLNet, tx: optax.GradientTransformation,
               preprocessing: str) -> tuple[TrainState, dict]:
    """One SGD update on a global batch; a non-finite loss or update leaves the state unchanged
    (and is reported in the metrics), so the last good state is never overwritten."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    images = normalize(batch["image"], preprocessing)

    def loss_fn(trainable):
        params = merge_params(trainable, state.frozen)
        pred = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        loss = mlnet_loss(pred, batch["target"])
        penalty = prior_penalty(params["prior"]) if "prior" in params else jnp.zeros(())
        return loss + penalty, loss

    (total, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                              opt_state=opt_state)
    finite = jnp.isfinite(total) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.trainable)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {"loss": loss, "total_loss": total, "nonfinite": 1 - finite.astype(jnp.int32)}


def eval_step(params: dict, batch: dict, *, model: MLNet, preprocessing: str) -> dict:
    """Predicted maps and each image's loss (without the prior penalty)."""
    pred = model.apply({"params": params}, normalize(batch["image"], preprocessing), train=False)
    per_image = jax.vmap(lambda p, t: mlnet_loss(p[None], t[None]))(pred, batch["target"])
    return {"pred": pred[..., 0], "loss": per_image}


def compile_steps(model: MLNet, tx, preprocessing: str, mesh):
    """jit the steps over ``mesh``: batch split on 'data', state replicated and donated."""
    rep, data = replicated(mesh), batch_sharding(mesh)
    train = jax.jit(partial(train_step, model=model, tx=tx, preprocessing=preprocessing),
                    in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)
    evaluate = jax.jit(partial(eval_step, model=model, preprocessing=preprocessing),
                       in_shardings=(rep, data), out_shardings=data)
    return train, evaluate


# --------------------------------------------------------------------------- data

def make_sources(config):
    """(train, evaluation) record sources for ``config.dataset``."""
    from mlnet_jax.input_pipeline import RecordSource, open_source
    if config.dataset == "synthetic":
        from mlnet_jax.datasets.synthetic import synthetic_dataset
        size = tuple(config.input_size)
        return tuple(
            RecordSource(synthetic_dataset(split, n, size, config.seed), f"synthetic {split}")
            for split, n in (("train", config.synthetic_train_size),
                             ("validation", config.synthetic_eval_size)))
    data_dir = config.data_dir or None
    return (open_source(config.dataset, config.train_split, data_dir),
            open_source(config.dataset, config.eval_split, data_dir))


def _split_size(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "(not recorded)"
    return (f"{fingerprint['num_bytes']:,} bytes in {sum(fingerprint['shard_lengths'])} "
            "records")


def _encode_state(state) -> dict:
    """Every process's input position, in process order (only process 0 writes the
    checkpoint's JSON items, so each must reach it; a collective, like the save itself)."""
    from jax.experimental import multihost_utils

    text = json.dumps({"bytes": state.decode()} if isinstance(state, bytes) else {"value": state})
    if jax.process_count() == 1:
        return {"iterators": [text]}
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return {"iterators": [bytes(row[:int(n)]).decode()
                          for row, n in zip(gathered, lengths.reshape(-1))]}


def _decode_state(saved: dict, workdir: Path):
    """This process's input position from :func:`_encode_state`'s record (or the single
    ``iterator`` of checkpoints written before it)."""
    if "iterator" in saved:
        if jax.process_count() > 1:
            raise UserError(f"{workdir}: this checkpoint holds one process's input position; "
                            f"resume it with 1 process, not {jax.process_count()}")
        value = saved["iterator"]
        return value.encode() if isinstance(value, str) else value
    iterators = saved["iterators"]
    if len(iterators) != jax.process_count():
        raise UserError(f"{workdir}: the run was saved by {len(iterators)} process(es); resume it "
                        f"with the same number, not {jax.process_count()}")
    mine = json.loads(iterators[jax.process_index()])
    return mine["bytes"].encode() if "bytes" in mine else mine["value"]


# --------------------------------------------------------------------------- the loop

class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may catch signals (a notebook's worker thread)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def evaluation_should_stop(self) -> Callable[[], bool] | None:
        """What an evaluation asks between batches: only a lone process stops midway (every
        process must take the same batches)."""
        return (lambda: self.signum is not None) if jax.process_count() == 1 else None

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingStopped(Exception):
    """Raised after a signal (checkpoint saved) or a non-finite loss (last good kept)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def steps_per_epoch(config, num_train_records: int) -> int:
    if config.steps_per_epoch > 0:
        if num_train_records < config.global_batch_size:  # trains, but not as one may think
            _log(f"warning: the training split has {num_train_records} records, fewer than one "
                 f"global batch ({config.global_batch_size}): every batch repeats images")
        return config.steps_per_epoch
    steps = num_train_records // config.global_batch_size
    if steps < 1:
        raise UserError(f"the training split has {num_train_records} records, fewer than one "
                        f"global batch ({config.global_batch_size})")
    return steps


# Fields a resumed run may change freely (e.g. to train for more epochs).
RESUMABLE_CHANGES = frozenset({
    "num_epochs", "early_stopping_patience", "log_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "eval_batch_size", "grid_images", "compilation_cache_dir", "data_dir",
    "first_conv"})
#: Fields that shape the saved state: not even --override_config can change them on resume.
STATE_SHAPING = ("input_size", "width_multiplier", "prior", "frozen_convs")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: saved → current' for every config field that differs and matters for resuming."""
    diffs = []
    for key in sorted((set(saved) | set(current)) - RESUMABLE_CHANGES):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            diffs.append(f"{prefix}{key}: {a!r} → {b!r}")
    return diffs


def _jsonable_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=list))


POOLINGS = ("auto", "standard", "keras1")
PREPROCESSINGS = ("auto", "caffe", "torch")


def check_config(config) -> None:
    """Every field's range, as one line naming it, before anything is loaded or compiled."""
    def fail(field: str, expected: str) -> None:
        raise UserError(f"config.{field} must be {expected}, got {config[field]!r}")

    check_data_fields(config)
    for field in ("num_epochs", "global_batch_size", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints"):
        if config[field] < 1:  # 0 would divide by zero, or keep no checkpoint to resume from
            fail(field, "at least 1")
    for field, lowest in (("steps_per_epoch", 1), ("eval_max_images", 1), ("worker_count", 0)):
        if config[field] != -1 and config[field] < lowest:
            fail(field, f"-1 (the default) or at least {lowest}")
    if config.dataset == "synthetic":
        for field in ("synthetic_train_size", "synthetic_eval_size"):
            if config[field] < 1:
                fail(field, "at least 1 with config.dataset='synthetic'")
    if config.grid_images < 0:
        fail("grid_images", "at least 0 (0: no grid)")
    if config.early_stopping_patience < 0:
        fail("early_stopping_patience", "at least 0 (0 disables it)")
    if not 0 <= config.dropout_rate < 1:
        fail("dropout_rate", "in [0, 1)")
    for field in ("learning_rate", "lr_decay"):  # inf passed, then the loss was NaN at step 1
        if not 0 <= config[field] < math.inf:
            fail(field, "finite and at least 0")
    if not 0 <= config.momentum < 1:
        fail("momentum", "in [0, 1)")
    if not config.width_multiplier > 0:
        fail("width_multiplier", "positive")
    size = tuple(config.input_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 and v % OUTPUT_STRIDE == 0
                                 for v in size):
        fail("input_size", f"(rows, cols), each a positive multiple of {OUTPUT_STRIDE}")
    if config.pooling not in POOLINGS:
        fail("pooling", " or ".join(POOLINGS))
    if config.preprocessing not in PREPROCESSINGS:
        fail("preprocessing", " or ".join(PREPROCESSINGS))
    if config.first_conv not in FIRST_CONV_MODES:
        fail("first_conv", " or ".join(FIRST_CONV_MODES))
    if config.first_conv == "pallas":
        reason = unfit_reason((1, *size, 3), "float32",
                              scaled_width(VGG16_CONVS[0][1], config.width_multiplier))
        if reason:
            fail("first_conv", f"'auto' or 'xla' where the kernel cannot take conv1_1 ({reason})")
    if not 0 <= config.seed < 2**32:
        fail("seed", "in [0, 2**32)")


def train_and_evaluate(config, workdir: str | Path, override_config: bool = False) -> dict:
    """Train (resuming from the workdir's latest checkpoint), evaluate each epoch, and write
    ``final_metrics.json`` with the held-out split's metrics. Returns those metrics."""
    check_config(config)
    if not str(workdir).strip():  # Path('') is the current folder
        raise UserError("--workdir is empty; name the folder for this run's checkpoints and logs")
    workdir = Path(workdir).expanduser()  # '--workdir=~/run' reaches us unexpanded
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
            pass  # a unique name: every process of a multi-host run checks at once
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or e})") from None
    # Process 0 holds the lock: a second training in the same workdir would interleave its
    # checkpoints and logs with this one's.
    lock = exclusive_lock(workdir / ".lock", f"--workdir {workdir}: another training is "
                          "running in it (it holds .lock); wait for it, or use another --workdir")
    # Signals are caught from here on: a Ctrl-C while starting (restoring, compiling) stops
    # the run before its first step. Python's own KeyboardInterrupt could land inside a
    # callback (JAX's garbage-collection hook), which swallows it, and training went on.
    try:
        with (lock if jax.process_index() == 0 else contextlib.nullcontext(),
              _StopRequest() as stop):
            return _train_and_evaluate(config, workdir, override_config, stop)
    except UserError:
        if created and jax.process_index() == 0:
            _remove_if_untouched(workdir)
        raise


def _remove_if_untouched(workdir: Path) -> None:
    """A workdir this call made, refused before anything was written in it (a dataset not
    prepared, say): only the lock and empty checkpoint folders are there, and go."""
    for path in workdir.rglob("*"):
        if not (path.is_dir() or path == workdir / ".lock"):
            return
        if path.is_dir() and any(p.is_file() for p in path.rglob("*")):
            return
    shutil.rmtree(workdir, ignore_errors=True)


def _train_and_evaluate(config, workdir: Path, override_config: bool, stop: "_StopRequest") -> dict:
    from mlnet_jax.checkpointing import RunCheckpoints
    from mlnet_jax.input_pipeline import auto_worker_count, prefetch_to_device, train_loader
    from mlnet_jax.reporting import MetricWriter, save_training_curves

    enable_compilation_cache(config.compilation_cache_dir, "config.compilation_cache_dir")
    mesh = data_mesh()
    if config.global_batch_size % mesh.size:
        suggestion = -(-config.global_batch_size // mesh.size) * mesh.size
        raise UserError(f"config.global_batch_size={config.global_batch_size} cannot be split over "
                        f"{mesh.size} devices; use a multiple of {mesh.size} (e.g. {suggestion})")
    dtype = compute_dtype(config.compute_dtype, "config.compute_dtype")
    train_source, eval_source = make_sources(config)
    require_ground_truth(eval_source, len(eval_source) if config.eval_max_images < 0 else
                         min(len(eval_source), config.eval_max_images),
                         f"config.eval_split {config.dataset}/{config.eval_split}")
    epoch_steps = steps_per_epoch(config, len(train_source))
    total_steps = epoch_steps * config.num_epochs
    checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
    try:  # an error before the loop's try/finally must close the manager too (its thread)
        saved_meta = checkpoints.read_meta() if checkpoints.latest_step() is not None else None
        if saved_meta is None:
            loaded, init_metadata = read_init_weights(config.init_weights)
            info = model_info_from_config(config, init_metadata)
        else:  # the model the run started as: init_weights may be gone, or converted again
            loaded, info = None, ModelInfo.from_metadata(saved_meta["model"])
        model = info.build(dtype, config.first_conv).clone(dropout_rate=config.dropout_rate)
        tx = make_optimizer(config.learning_rate, config.lr_decay, config.momentum)
        learning_rate = keras1_decay_schedule(config.learning_rate, config.lr_decay)
        worker_count = config.worker_count
        if worker_count < 0:  # auto, fixed at the first start: the data position depends on it
            worker_count = (saved_meta or {}).get("worker_count", auto_worker_count(jax.default_backend()))
        loader = prefetch_to_device(
            train_loader(train_source, model_size=info.input_size, global_batch_size=config.global_batch_size,
                         seed=config.seed, worker_count=worker_count),
            size=2, sharding=batch_sharding(mesh))
        config_json = _jsonable_config(config)
        meta = {"config": config_json, "model": info.to_metadata(), "best_val_loss": None,
                "best_step": None, "epochs_without_improvement": 0, "stopped_early": False,
                "evaluation_pending": False, "worker_count": worker_count,
                "splits": {"train": train_source.fingerprint, "eval": eval_source.fingerprint}}

        rng = jax.random.PRNGKey(config.seed)
        if saved_meta is not None:
            shaping = [f"config.{field}" for field in STATE_SHAPING if json.dumps(
                saved_meta["config"].get(field)) != json.dumps(config_json.get(field))]
            if worker_count != saved_meta.get("worker_count", worker_count):
                shaping.append("config.worker_count (the input position is per worker)")
            # The input order is drawn from the seed: grain refuses the saved position
            # otherwise, which the message below would blame on the dataset.
            if saved_meta["config"].get("seed", config.seed) != config.seed:
                shaping.append("config.seed (the input order is drawn from it)")
            if shaping:
                raise UserError(f"{workdir}: {', '.join(shaping)} cannot change when resuming, not "
                                "even with --override_config (the saved state has another shape); "
                                f"use another --workdir, with --config.init_weights={workdir} to "
                                "start from this run's weights")
            diffs = config_differences(saved_meta["config"], config_json)
            if diffs and not override_config:
                raise UserError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
                                "use another --workdir, or pass --override_config to continue anyway")
            splits = meta["splits"]
            changed = [f"config.{kind}_split {_split_size(saved_meta['splits'][kind])} → "
                       f"{_split_size(splits[kind])}" for kind in ("train", "eval")
                       if saved_meta.get("splits", splits)[kind] != splits[kind]]
            if changed and not override_config:
                raise UserError(f"{workdir}: the dataset was prepared again since this run "
                                f"started, from other images ({'; '.join(changed)}); use another "
                                "--workdir to start over, or pass --override_config to continue "
                                "on the new data anyway")
            abstract = jax.eval_shape(lambda: create_train_state(
                initial_params(model, info, rng, None), tx, config.frozen_convs, config.seed))
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)),
                                    abstract)
            state, data_state, meta = checkpoints.restore(abstract)
            meta.update(config=config_json, worker_count=worker_count, splits=splits)
            try:
                loader.set_state(_decode_state(data_state, workdir))
            except ValueError as e:  # grain: the sampler (record count, seed, sharding) differs
                before = saved_meta.get("splits", {}).get("train")
                if config.dataset == "synthetic":
                    was = saved_meta["config"].get("synthetic_train_size")
                    changed = (f"config.synthetic_train_size {was} then, "
                               f"{config.synthetic_train_size} now")
                elif before is not None and before != splits["train"]:
                    changed = (f"{_split_size(before)} then, {_split_size(splits['train'])} now: "
                               "the dataset was prepared again")
                else:
                    changed = "was the dataset prepared again?"
                raise UserError(f"{workdir}: the training split is not the one this run was reading "
                                f"({changed}; grain: {str(e).splitlines()[0]}); use another "
                                "--workdir to start over") from None
            _log(f"resuming from {checkpoints.resume_dir} at step {int(state.step)}")
            was = saved_meta["config"].get("steps_per_epoch")
            if was != config.steps_per_epoch:  # only with --override_config
                _log(f"warning: config.steps_per_epoch {was} → {config.steps_per_epoch}: epochs "
                     f"are counted from step 0 with {epoch_steps} steps each, so this one ends at "
                     f"step {(int(state.step) // epoch_steps + 1) * epoch_steps} and is evaluated "
                     "and counted for early stopping as a whole one")
            # patience may have changed (a resumable change): the stop is decided again with it.
            stopped = _patience_exhausted(meta["epochs_without_improvement"],
                                          config.early_stopping_patience)
            if meta["stopped_early"] and not stopped:
                _log(f"the run had stopped early; continuing with early_stopping_patience "
                     f"{config.early_stopping_patience}")
            if stopped:  # whatever num_epochs asks: said, not a silent run of no steps
                _log(f"early stopping: {meta['epochs_without_improvement']} epochs without a "
                     f"better validation loss (early_stopping_patience "
                     f"{config.early_stopping_patience}; the best is step {meta['best_step']}): "
                     "nothing more is trained; a larger patience continues the run")
            elif int(state.step) >= total_steps:
                _log(f"the run is at step {int(state.step)}, and config.num_epochs "
                     f"{config.num_epochs} × {epoch_steps} steps ends at {total_steps}: nothing "
                     "more is trained; a larger num_epochs continues the run")
            meta["stopped_early"] = stopped
        else:
            params = initial_params(model, info, rng, loaded)
            state = create_train_state(params, tx, config.frozen_convs, config.seed)
            source = config.init_weights or "random weights (config.init_weights is empty)"
            _log(f"initialised from {source}; preprocessing {info.preprocessing}, pooling {info.pooling}")
        state = jax.device_put(state, replicated(mesh))
        train_fn, evaluate_fn = compile_steps(model, tx, info.preprocessing, mesh)
        step = int(state.step)
        writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=step,
                              evaluation_pending=bool(meta.get("evaluation_pending")))
        if writer.replayed:
            _log(f"dropped {writer.replayed} record(s) after step {step} from "
                 f"{writer.path.name}: those steps run again")
        if writer.unreadable:
            _log(f"warning: {writer.path}: dropped {len(writer.unreadable)} unreadable line(s) "
                 f"(line {', '.join(map(str, writer.unreadable))}), not JSON records: the "
                 "file was changed by something other than this training")
        _log(f"{jax.device_count()} device(s) over {jax.process_count()} process(es); "
             f"{epoch_steps} steps/epoch, {total_steps} steps; workdir {workdir}")
    except BaseException:
        checkpoints.close()
        raise

    last_good_step = checkpoints.latest_step()
    pending: list = []   # step metrics still on the device, oldest first
    # fetched and checked, not yet logged (a resumed run starts with the saved run's)
    fetched: list = [{"loss": np.float32(v)}  # float32, as fetched: the same mean
                     for v in meta.pop("unlogged_losses", [])]

    def check_finite() -> None:
        """Fetch the pending steps' metrics; stop at the first non-finite one, so no checkpoint
        is ever written after it (such a step leaves the state as it was)."""
        nonlocal pending
        new, pending = jax.device_get(pending), []
        for i, m in enumerate(new):
            if int(m["nonfinite"]):
                kept = (f"The last good checkpoint (step {last_good_step}) is kept in "
                        f"{workdir / 'checkpoints'}." if last_good_step is not None else
                        "No checkpoint had been written yet: a rerun starts over.")
                raise TrainingStopped(
                    f"the loss became NaN/Inf at step {step - len(new) + i + 1}; training stopped "
                    f"(check the data and the learning rate). {kept}", 1)
        fetched.extend(new)

    def save(is_best: bool = False) -> None:
        nonlocal last_good_step
        check_finite()
        # The losses since the last log record: a resumed run folds them into its next one.
        meta["unlogged_losses"] = [float(m["loss"]) for m in fetched]
        checkpoints.save(step, state, _encode_state(loader.get_state()), meta, is_best=is_best)
        last_good_step = step

    def end_epoch(bar, stop) -> None:
        """Save the epoch's state, evaluate on the validation split (a stop cuts it short:
        the resumed run evaluates first), keep the best checkpoint, count towards early
        stopping (Keras 1's rule), and record the outcome in the checkpoint."""
        if not meta.get("evaluation_pending"):
            meta["evaluation_pending"] = True
            save()
        try:
            result = evaluate_split(
                state.params, evaluate_fn, eval_source, config, info, mesh,
                grid_path=workdir / f"eval_step{step:07d}.png",
                should_stop=stop.evaluation_should_stop())
        except EvaluationStopped:
            raise TrainingStopped(
                f"received signal {stop.signum} while evaluating step {step}; its checkpoint is "
                f"saved in {workdir / 'checkpoints'}; rerun the same command to resume (the "
                "evaluation runs first)", 128 + stop.signum) from None
        writer.write(step, "eval", result)
        best = meta["best_val_loss"]
        # A blank map's loss is finite only by the guard (the original's is NaN, never best),
        # and low: a model whose ReLUs died would be kept as the best one.
        is_best = (math.isfinite(result["loss"]) and not result["blank_maps"]
                   and (best is None or result["loss"] < best))
        if is_best:
            meta.update(best_val_loss=result["loss"], best_step=step, epochs_without_improvement=0)
        else:
            meta["epochs_without_improvement"] += 1
        meta.update(evaluation_pending=False, stopped_early=_patience_exhausted(
            meta["epochs_without_improvement"], config.early_stopping_patience))
        if jax.process_index() == 0:
            blank = (f" ({result['blank_maps']} of {result['num_images']} validation maps "
                     f"blank, every ReLU dead: not a best checkpoint; CC and NSS without them)"
                     if result["blank_maps"] else "")
            bar.write(f"epoch {step // epoch_steps}: validation loss {result['loss']:.4f}, "
                      f"CC {result['cc']:.3f}, KLD {result['kld']:.3f}, NSS {result['nss']:.3f}, "
                      f"SIM {result['sim']:.3f}" + (" (best)" if is_best else "") + blank)
            if meta["stopped_early"]:
                bar.write(f"early stopping: {meta['epochs_without_improvement']} epochs without a "
                          f"better validation loss (patience {config.early_stopping_patience}); "
                          f"the best is step {meta['best_step']}")
        save(is_best)

    try:
        first_step = step + 1
        with _progress(total_steps, step) as bar:
            if stop.signum is not None:
                kept = (f"the checkpoint of step {step} is kept" if last_good_step is not None
                        else "nothing was trained yet")
                raise TrainingStopped(f"received signal {stop.signum} while starting; stopped "
                                      f"before step {step + 1} ({kept}); rerun the same "
                                      "command to continue", 128 + stop.signum)
            if meta.get("evaluation_pending"):
                _log(f"evaluating epoch {step // epoch_steps}: a stop came before its evaluation")
                end_epoch(bar, stop)
            window_start, window_images = time.perf_counter(), 0
            while step < total_steps and not meta["stopped_early"]:
                batch = next(loader)
                state, step_metrics = train_fn(state, batch)
                step += 1
                pending.append(step_metrics)
                if step == first_step:  # keep compilation out of images/s
                    jax.block_until_ready(step_metrics)
                    window_start = time.perf_counter()
                else:
                    window_images += config.global_batch_size
                epoch_end = step % epoch_steps == 0
                if step % config.log_every_steps == 0 or epoch_end:
                    check_finite()
                    loss = float(np.mean([m["loss"] for m in fetched]))
                    fetched.clear()
                    # The rate step N's update used: the schedule counts updates from 0.
                    record = {"loss": loss, "learning_rate": float(learning_rate(step - 1))}
                    if window_images:
                        record["images_per_second"] = window_images / (time.perf_counter() - window_start)
                        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_second']:.1f}")
                    writer.write(step, "train", record)
                    window_start, window_images = time.perf_counter(), 0
                bar.update(1)
                if stop.signum is not None:
                    meta["evaluation_pending"] = epoch_end  # done first when the run resumes
                    save()
                    raise TrainingStopped(f"received signal {stop.signum}; saved a checkpoint at step "
                                          f"{step} in {workdir / 'checkpoints'}; rerun the same command "
                                          "to resume", 128 + stop.signum)
                if epoch_end:
                    end_epoch(bar, stop)
                    if stop.signum is not None:  # came during an evaluation that ran to its end
                        raise TrainingStopped(
                            f"received signal {stop.signum}; saved a checkpoint at step {step} in "
                            f"{workdir / 'checkpoints'}; rerun the same command to resume",
                            128 + stop.signum)
                elif step % config.checkpoint_every_steps == 0:
                    save()
        if step == total_steps or meta["stopped_early"]:
            save()
        try:
            final = final_evaluation(workdir, state, meta["best_step"], evaluate_fn, eval_source,
                                     config, info, mesh, should_stop=stop.evaluation_should_stop())
        except EvaluationStopped:
            raise TrainingStopped(
                f"received signal {stop.signum} during the held-out evaluation; training is "
                f"complete and saved in {workdir / 'checkpoints'}; rerun the same command to "
                "evaluate it and write final_metrics.json", 128 + stop.signum) from None
        if jax.process_index() == 0:
            writer.write(step, "final", final)
            save_training_curves(workdir / "training_curves.png", writer.path)
        return final
    finally:
        writer.close()
        checkpoints.close()


def _patience_exhausted(epochs_without_improvement: int, patience: int) -> bool:
    """Keras 1's ``EarlyStopping``, which the original used: with patience p it stops at the
    (p + 1)-th epoch in a row without a better validation loss. Patience 0 disables it here."""
    return patience > 0 and epochs_without_improvement > patience


def final_evaluation(workdir: Path, state: TrainState, best_step: int | None, evaluate_fn,
                     eval_source, config, info: ModelInfo, mesh,
                     should_stop: Callable[[], bool] | None = None) -> dict:
    """Metrics of the best checkpoint (else the last state) and of a centre-bias map on the
    held-out split, written to ``final_metrics.json`` (``EvaluationStopped`` when
    ``should_stop()`` says so between two batches: nothing is written)."""
    from mlnet_jax.atomic import atomic_path
    from mlnet_jax.checkpointing import BEST_DIR, restore_best

    params = state.params
    source = "last" if best_step is None else "best"
    if best_step is not None and best_step != int(state.step):
        # What is on disk is scored and named: after a resume from an earlier checkpoint than
        # the last (the later ones moved away), best/ may hold a later step of the abandoned
        # continuation that no epoch of this one beat, or be gone (then the latest is read).
        best_params, best_step, from_best = restore_best(workdir)
        params = jax.device_put(best_params, replicated(mesh))
        if not from_best:  # best/ deleted: the latest is what is read
            source = "last"
            _log(f"{workdir / BEST_DIR} holds no checkpoint: the held-out split is scored with "
                 f"the latest (step {best_step})")
    result = evaluate_split(params, evaluate_fn, eval_source, config, info, mesh, centre_bias=True,
                            should_stop=should_stop)
    result["checkpoint"] = source
    result["step"] = int(state.step)  # where training ended
    result["checkpoint_step"] = int(state.step) if best_step is None else best_step  # scored
    if jax.process_index() == 0:
        with atomic_path(workdir / "final_metrics.json") as tmp:
            strict = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                      for k, v in result.items()}  # NaN (e.g. CC of a constant map) → null
            tmp.write_text(json.dumps(strict, indent=2, sort_keys=True, allow_nan=False) + "\n")
        blank = (f" ({result['blank_maps']} maps blank, left out of CC and NSS)"
                 if result["blank_maps"] else "")
        _log(f"held-out ({result['num_images']} images, {source} checkpoint): CC {result['cc']:.3f} "
             f"vs centre bias {result['centre_bias_cc']:.3f}{blank}; metrics in "
             f"{workdir / 'final_metrics.json'}")
    return result


def _progress(total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0, file=sys.stdout)


# --------------------------------------------------------------------------- command line

def _start_distributed(FLAGS) -> None:
    """``jax.distributed.initialize`` as the multi-host flags ask, or nothing for one process.
    A process count without a coordinator would have trained alone on every host."""
    multi = FLAGS["num_processes"].present or FLAGS["process_id"].present
    if not (FLAGS.coordinator_address or FLAGS.distributed):
        if multi:
            raise UserError("--num_processes and --process_id need --coordinator_address="
                            "HOST:PORT of process 0 (or --distributed, which detects all three "
                            "on TPU pod slices and SLURM)")
        return
    if multi and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise UserError(f"--process_id must be in [0, --num_processes={FLAGS.num_processes})"
                        f", got {FLAGS.process_id}")
    if FLAGS.coordinator_address:
        given = dict(coordinator_address=FLAGS.coordinator_address,
                     num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    else:  # --distributed: what is given, the rest detected
        given = {name: FLAGS[name].value for name in ("num_processes", "process_id")
                 if FLAGS[name].present}
    try:
        jax.distributed.initialize(**given)
    except (ValueError, RuntimeError) as e:
        how = ("--distributed detects the processes only on TPU pod slices, SLURM and similar "
               "clusters; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N "
               "--process_id=K" if not FLAGS.coordinator_address else
               f"is process 0 running, at --coordinator_address={FLAGS.coordinator_address}?")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot start the multi-process run ({reason}); {how}") from None


def main(argv=None) -> int:
    from absl import flags

    def define() -> None:
        flags.DEFINE_string("workdir", DEMO_WORKDIR, "Directory for checkpoints, logs and figures.")
        flags.DEFINE_bool("override_config", False, "Resume even if the config differs from the checkpoint's.")
        flags.DEFINE_bool("debug", False, "Show tracebacks for errors.")
        flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-host runs.")
        flags.DEFINE_integer("num_processes", 1, "Number of processes (multi-host).")
        flags.DEFINE_integer("process_id", 0, "This process's index (multi-host).")
        flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                          "auto-detection (TPU pod slices, SLURM).")

    def run() -> int:
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
        FLAGS = flags.FLAGS
        _start_distributed(FLAGS)
        try:
            train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.override_config)
        except TrainingStopped as e:
            print(str(e), file=sys.stderr)
            return e.exit_code
        return 0

    return run_absl(run, argv, config=(str(DEMO_CONFIG), "Training configuration file."),
                    define=define)


if __name__ == "__main__":
    sys.exit(main())
