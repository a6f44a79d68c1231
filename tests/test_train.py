"""Training: the optimiser, freezing, data parallelism on 1/2 devices and 2 processes,
exact resume across a process exit, and an end-to-end run of the train command."""

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mlnet_jax.errors import UserError
from mlnet_jax.inference import ModelInfo
from mlnet_jax.optim import keras1_decay_schedule, make_optimizer
from mlnet_jax.train import create_train_state, initial_params, train_step

TESTS = Path(__file__).parent
TINY_CONFIG = TESTS / "configs" / "tiny.py"
STEP_SCRIPT = TESTS / "scripts" / "one_train_step.py"


def run(*args, timeout=600, check=True):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=TESTS.parent)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("t", [0, 1, 10, 999, 20000])
def test_learning_rate_is_keras1_time_decay(t):
    assert float(keras1_decay_schedule(1e-3, 5e-4)(t)) == pytest.approx(1e-3 / (1 + 5e-4 * t), rel=1e-6)


def test_optimizer_is_keras1_nesterov_sgd():
    """Several updates equal a NumPy transcription of Keras 1's SGD(momentum, nesterov, decay)."""
    tx = make_optimizer(0.1, 0.05, 0.9)
    rng = np.random.default_rng(0)
    p = rng.normal(size=5).astype(np.float32)
    params, state = jnp.asarray(p), tx.init(jnp.asarray(p))
    ref_p, v = p.astype(np.float64), np.zeros(5)
    for t in range(6):
        g = rng.normal(size=5)
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        lr = 0.1 / (1 + 0.05 * t)                 # Keras 1: lr · 1/(1 + decay · iterations)
        v = 0.9 * v - lr * g                      # v = momentum·m − lr·g
        ref_p = ref_p + 0.9 * v - lr * g          # nesterov: p + momentum·v − lr·g
    np.testing.assert_allclose(np.asarray(params), ref_p, rtol=1e-5)


def test_frozen_layers_are_bit_identical_and_have_no_optimizer_state():
    info = ModelInfo(input_size=(32, 32), preprocessing="caffe")
    model = info.build()
    tx = make_optimizer(1e-2, 5e-4, 0.9)
    params = initial_params(model, info, jax.random.PRNGKey(0), None)
    state = create_train_state(params, tx, frozen_convs=10, seed=0)
    opt_paths = {"/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    assert not any(f"conv{b}_" in p for p in opt_paths for b in (1, 2, 3, 4))
    assert any("conv5_1" in p for p in opt_paths) and any("head" in p for p in opt_paths)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)),
             "target": jnp.asarray(rng.uniform(0, 1, (2, 4, 4, 1)), jnp.float32)}
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, preprocessing="caffe"))
    before = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    for _ in range(2):
        state, _ = step(state, batch)
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    for key, value in before.items():
        frozen = key.startswith("backbone/conv") and key.split("/")[1][:5] in (
            "conv1", "conv2", "conv3", "conv4")
        if frozen:
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        elif key.endswith("kernel"):
            assert not np.array_equal(after[key], value), key
    # No backward compute for frozen layers: the step has 15 forward convolutions plus, for the
    # 5 trainable ones (conv5_1…3, head conv, readout), a kernel gradient each and an input
    # gradient for all but conv5_1, whose input comes from the frozen part.
    def conv_count(frozen_convs):
        s = create_train_state(params, tx, frozen_convs=frozen_convs, seed=0)
        jaxpr = jax.make_jaxpr(lambda s, b: train_step(s, b, model=model, tx=tx, preprocessing="caffe"))(s, batch)
        return str(jaxpr).count("conv_general_dilated[")
    assert conv_count(10) == 15 + 5 + 4
    assert conv_count(0) == 15 + 15 + 14


def _small_state_and_batch(preprocessing="caffe", learning_rate=0.0):
    info = ModelInfo(input_size=(32, 32), preprocessing=preprocessing)
    model = info.build()
    tx = make_optimizer(learning_rate, 5e-4, 0.9)
    params = initial_params(model, info, jax.random.PRNGKey(0), None)
    params["head"]["readout"]["bias"] = jnp.full((1,), 0.2)  # maps not blank
    rng = np.random.default_rng(2)
    params["prior"] = jnp.asarray(rng.normal(0, 0.3, params["prior"].shape), jnp.float32)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)),
             "target": jnp.asarray(rng.uniform(0, 1, (3, 4, 4, 1)), jnp.float32)}
    return model, tx, params, batch


def test_the_training_loss_adds_the_prior_penalty_and_each_step_draws_new_dropout():
    """Nothing noticed the prior's λ·ΣW² dropped (W starts at zero), nor one dropout mask
    used for every step (dropout turned into fixed pruning)."""
    model, tx, params, batch = _small_state_and_batch()
    state = create_train_state(params, tx, frozen_convs=0, seed=0)
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, preprocessing="caffe"))
    next_state, first = step(state, batch)
    w = np.asarray(params["prior"], np.float64)
    penalty = float(first["total_loss"]) - float(first["loss"])  # float32: to ~1e-5 of 0.4
    assert penalty == pytest.approx((w ** 2).sum() / w.size, rel=1e-3)
    _, again = step(state, batch)  # the same step again: the same mask
    _, second = step(next_state, batch)  # learning rate 0: the same weights, the next step
    assert float(again["loss"]) == float(first["loss"])
    assert float(second["loss"]) != pytest.approx(float(first["loss"]), rel=1e-4)


@pytest.mark.parametrize("preprocessing", ["caffe", "torch"])
def test_eval_step_normalises_as_the_weights_and_gives_each_images_loss(preprocessing):
    """Evaluation (the validation loss, best/, final_metrics.json, evaluate) read the images
    with the run's convention, and the loss is per image, not the batch's mean repeated."""
    from mlnet_jax.preprocessing import normalize
    from mlnet_jax.train import eval_step
    import reference_numpy as ref
    model, _, params, batch = _small_state_and_batch(preprocessing)
    got = eval_step(params, batch, model=model, preprocessing=preprocessing)
    other = "torch" if preprocessing == "caffe" else "caffe"
    want = model.apply({"params": params}, normalize(batch["image"], preprocessing), train=False)
    np.testing.assert_allclose(np.asarray(got["pred"]), np.asarray(want)[..., 0], rtol=1e-5,
                               atol=1e-6)
    wrong = model.apply({"params": params}, normalize(batch["image"], other), train=False)
    assert not np.allclose(np.asarray(got["pred"]), np.asarray(wrong)[..., 0], rtol=1e-3)
    pred, target = np.asarray(want, np.float64), np.asarray(batch["target"], np.float64)
    np.testing.assert_allclose(np.asarray(got["loss"]),
                               [ref.mlnet_loss(pred[i:i + 1], target[i:i + 1]) for i in range(3)],
                               rtol=1e-5)


def _compare_params(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert set(a.files) == set(b.files)
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.timeout(300)
def test_two_devices_take_the_same_step_as_one(tmp_path):
    run(STEP_SCRIPT, tmp_path / "one.npz", "--devices", "1", timeout=240)
    run(STEP_SCRIPT, tmp_path / "two.npz", "--devices", "2", timeout=240)
    _compare_params(tmp_path / "one.npz", tmp_path / "two.npz")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args_for) -> list[tuple[str, str]]:
    """Start ``python *args_for(coordinator_address, k)`` for k = 0, 1 on localhost and return
    their (stdout, stderr); both must succeed."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, *args_for(address, k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=TESTS.parent)
             for k in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    return outputs


@pytest.mark.timeout(300)
def test_two_processes_take_the_same_step_as_one(tmp_path):
    run(STEP_SCRIPT, tmp_path / "one.npz", "--devices", "1", timeout=240)
    run_two_processes(lambda address, k: [
        str(STEP_SCRIPT), str(tmp_path / f"multi{k}.npz"), "--coordinator", address,
        "--num_processes", "2", "--process_id", str(k)])
    _compare_params(tmp_path / "one.npz", tmp_path / "multi0.npz")


def train_cli(workdir, *overrides, check=True):
    return run("-m", "mlnet_jax.train", f"--config={TINY_CONFIG}", f"--workdir={workdir}", *overrides,
               check=check)


def latest_state(workdir):
    from mlnet_jax.checkpointing import RunCheckpoints
    import orbax.checkpoint as ocp
    checkpoints = RunCheckpoints(workdir, 2)
    step = checkpoints.latest_step()
    restored = checkpoints.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    checkpoints.close()
    return step, jax.tree.map(np.asarray, restored.state), restored.data


@pytest.mark.timeout(600)
def test_resume_after_process_exit_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli(straight, "--config.num_epochs=2")
    train_cli(resumed, "--config.num_epochs=1")           # N steps, then the process exits
    log = resumed / "metrics.jsonl"  # damaged between the runs: named, not dropped silently
    first, *rest = log.read_text().splitlines()
    log.write_text("\n".join([first, "<<<<<<< HEAD", *rest]) + "\n")
    out = train_cli(resumed, "--config.num_epochs=2")     # restart: N more steps
    assert "resuming" in out.stdout + out.stderr
    assert f"warning: {log}: dropped 1 unreadable line(s) (line 2)" in out.stdout
    assert "<<<<<<<" not in log.read_text()
    step_a, state_a, data_a = latest_state(straight)
    step_b, state_b, data_b = latest_state(resumed)
    assert step_a == step_b == 6
    assert data_a == data_b
    from mlnet_jax.checkpointing import RunCheckpoints
    checkpoints = RunCheckpoints(resumed, 2)
    assert checkpoints.read_meta()["worker_count"] == 0  # auto (-1) on CPU, kept on resume
    checkpoints.close()
    flat_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(state_b)[0])
    assert len(flat_a) == len(flat_b)
    for path, value in flat_a:  # parameters, optimiser state, step, RNG
        np.testing.assert_array_equal(flat_b[path], value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.timeout(600)
def test_train_command_writes_everything_and_learns(tmp_path):
    workdir = tmp_path / "run"
    # At 1e-2 the tiny model's 4×4 maps go blank in its first epoch, and no epoch is the best.
    train_cli(workdir, "--config.num_epochs=3", "--config.learning_rate=1e-3")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["8", "9"]  # saved at 2, 3, 4, 6, 8, 9; keep 2
    assert [p.name for p in (workdir / "best").iterdir()] and (workdir / "best").is_dir()
    # best/ or checkpoints/ themselves name their last step, as the README's "checkpoint dir".
    from mlnet_jax.checkpointing import _step_dir_for
    best = _step_dir_for(workdir)
    assert best.parent.name == "best" and _step_dir_for(workdir / "best") == best
    assert _step_dir_for(workdir / "checkpoints") == workdir / "checkpoints" / "9"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9]
    assert {"loss", "cc", "kld", "nss", "sim"} <= set(evals[0])
    assert all(np.isfinite(r["loss"]) for r in evals)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 9 and all(r["images_per_second"] > 0 for r in train[1:])
    # Each step logs the rate its update used: lr / (1 + decay · updates before it).
    assert [r["learning_rate"] for r in train[:2]] == pytest.approx([1e-3, 1e-3 / (1 + 5e-4)])
    # It learns: the training objective falls. (At 4×4 output maps the held-out loss is no
    # such signal: an all-zero map scores 0.08 there, so a collapsed readout "improves" it,
    # and such an epoch is not eligible as the best; test_demo.py checks what the model
    # learns, by CC against the centre bias.)
    assert np.mean([r["loss"] for r in train[-3:]]) < 0.7 * np.mean([r["loss"] for r in train[:3]])
    assert "images_per_second" not in train[0]  # the first step is compilation, not throughput
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    for png in ["eval_step0000003.png", "eval_step0000009.png", "training_curves.png"]:
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert {"cc", "centre_bias_cc", "num_images"} <= set(final) and final["num_images"] == 8
    best_step = min((r for r in evals if not r["blank_maps"]), key=lambda r: r["loss"])["step"]
    assert (final["checkpoint"], final["checkpoint_step"], final["step"]) == ("best", best_step, 9)
    # ... and its scores are that checkpoint's, not the last weights'.
    scored = next(r for r in evals if r["step"] == best_step)
    assert final["loss"] == pytest.approx(scored["loss"], rel=1e-4)
    assert final["cc"] == pytest.approx(scored["cc"], rel=1e-4)
    # The checkpoint is self-describing: prediction needs only the directory.
    from mlnet_jax import load_model
    model, variables, info = load_model(workdir)
    assert info.input_size == (32, 32) and info.preprocessing == "caffe"


def test_resumed_metric_log_drops_the_records_of_replayed_steps(tmp_path):
    from mlnet_jax.reporting import MetricWriter
    writer = MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, "train", {"loss": step / 10})
    writer.write(5, "eval", {"loss": 0.5, "cc": 0.1})
    writer.close()
    with open(writer.path, "a") as f:
        f.write('{"step": 6, "kind": "tr')  # a line cut short by a crash
    resumed = MetricWriter(tmp_path, resume_step=3)  # the checkpoint was at step 3
    resumed.write(4, "train", {"loss": 0.04})
    resumed.write(4, "final", {"loss": 0.4, "cc": float("nan"), "step": 4.0})  # NaN: null
    resumed.close()
    records = [json.loads(line) for line in writer.path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.04),
                                                         (4, 0.4)]
    assert records[-1]["cc"] is None and "NaN" not in writer.path.read_text()
    assert type(records[-1]["step"]) is int  # the record's own step, not the values' float
    assert resumed.replayed == 4
    # Rerunning the finished run (resumed at its last step) writes its final record again,
    # not a second one.
    rerun = MetricWriter(tmp_path, resume_step=4)
    rerun.close()
    assert rerun.replayed == 0 and [r["kind"] for r in map(
        json.loads, writer.path.read_text().splitlines())] == ["train"] * 4
    again = MetricWriter(tmp_path, resume_step=4)
    again.close()
    assert again.replayed == 0  # nothing past step 4: the file is left as it is
    assert resumed.unreadable == rerun.unreadable == again.unreadable == []  # a torn last line

    # A damaged line in the middle (not what a crash leaves) is dropped and named, by number.
    lines = writer.path.read_text().splitlines()
    writer.path.write_text("\n".join([lines[0], "#garbage", *lines[1:]]) + "\n")
    damaged = MetricWriter(tmp_path, resume_step=4)
    damaged.close()
    assert damaged.unreadable == [2] and damaged.replayed == 0
    assert writer.path.read_text().splitlines() == lines


def test_training_curves_plot_the_train_and_eval_records(tmp_path, monkeypatch):
    """The curves' lines hold the train records' loss and the eval records' loss and CC at
    their steps: eval records plotted as the train curve (or CC from the train records)
    would draw a run that did not happen."""
    import matplotlib.pyplot as plt

    from mlnet_jax.reporting import save_training_curves
    records = [{"step": 1, "kind": "train", "loss": 0.9}, {"step": 2, "kind": "train", "loss": 0.7},
               {"step": 2, "kind": "eval", "loss": 0.8, "cc": 0.3},
               {"step": 3, "kind": "train", "loss": 0.6},
               {"step": 4, "kind": "train", "loss": 0.5},
               {"step": 4, "kind": "eval", "loss": 0.65, "cc": 0.45},
               {"step": 4, "kind": "final", "loss": 0.6, "cc": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its lines
    save_training_curves(tmp_path / "curves.png", tmp_path / "metrics.jsonl")
    assert (tmp_path / "curves.png").stat().st_size > 0
    (fig,) = figures
    ax_loss, ax_cc = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax_loss.lines}

    def series(kind, key):
        chosen = [r for r in records if r["kind"] == kind]
        return [r["step"] for r in chosen], [r[key] for r in chosen]

    assert lines == {"train loss": series("train", "loss"),
                     "validation loss": series("eval", "loss")}
    (cc,) = ax_cc.lines
    assert (list(cc.get_xdata()), list(cc.get_ydata())) == series("eval", "cc")
    close(fig)


def _tensorboard_events(folder: Path) -> list:
    """Every event as written, in order, without purge semantics: ("START", step) for a
    session start, (tag, step) for each scalar."""
    import struct

    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data, offset = path.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                events.append(("START", event.step))
            events.extend((value.tag, event.step) for value in event.summary.value)
    return events


def test_a_resumed_tensorboard_log_purges_what_it_writes_again_and_has_no_final(tmp_path):
    """A resumed writer starts a session purging from step 1 and mirrors the kept records
    again: without the purge every earlier point would be shown twice; and the final record
    (in final_metrics.json) would, mirrored, be a second point at the last step on each rerun."""
    from mlnet_jax.reporting import MetricWriter
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, "train", {"loss": step / 10})
    writer.write(3, "eval", {"loss": 0.5, "cc": 0.2})
    writer.write(3, "final", {"loss": 0.5, "cc": 0.2})
    writer.close()
    resumed = MetricWriter(tmp_path, resume_step=3)
    resumed.write(4, "train", {"loss": 0.4})
    resumed.write(4, "final", {"loss": 0.4, "cc": 0.3})
    resumed.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    assert not [tag for tag, _ in events if tag.startswith("final/")], events
    starts = [i for i, (tag, _) in enumerate(events) if tag == "START"]
    assert starts and events[starts[-1]][1] <= 1, events  # the last session purges from step 1
    shown = [e for e in events[starts[-1] + 1:] if e[0] != "START"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [(f"{r['kind']}/{k}", r["step"]) for r in records if r["kind"] != "final"
            for k in r if k not in ("step", "kind")]
    assert sorted(shown) == sorted(want) and len(set(shown)) == len(shown), shown


def test_a_resumed_metric_log_drops_the_eval_record_of_an_evaluation_that_runs_again(tmp_path):
    """Resumed at a checkpoint saved before its evaluation (evaluation_pending), that step's
    eval record (written before the crash) goes: the evaluation writes it again. Kept, the
    step would have two."""
    from mlnet_jax.reporting import MetricWriter
    writer = MetricWriter(tmp_path)
    for step in (1, 2):
        writer.write(step, "train", {"loss": step / 10})
        writer.write(step, "eval", {"loss": step})
    writer.close()
    MetricWriter(tmp_path, resume_step=2, evaluation_pending=True).close()
    assert [(r["step"], r["kind"]) for r in map(json.loads, writer.path.read_text().splitlines())
            ] == [(1, "train"), (1, "eval"), (2, "train")]
    MetricWriter(tmp_path, resume_step=2).close()  # not pending: nothing more goes
    assert len(writer.path.read_text().splitlines()) == 3


def test_the_metric_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch whenever it is installed (seconds of every training start on
    Colab); the writer keeps it out, and TensorBoard still gets the scalars."""
    pytest.importorskip("torch")
    code = ("import sys; from pathlib import Path; from mlnet_jax.reporting import MetricWriter; "
            f"w = MetricWriter(Path({str(tmp_path)!r})); w.write(3, 'train', {{'loss': 0.25}}); "
            "w.close(); print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "2.0"]  # not imported, and still importable after
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {("train/loss", 3): 0.25}

@pytest.mark.timeout(300)
def test_a_different_config_is_refused_on_resume(tmp_path):
    workdir = tmp_path / "run"
    train_cli(workdir, "--config.num_epochs=1")
    result = train_cli(workdir, "--config.learning_rate=0.5", check=False)
    assert result.returncode == 2
    assert "learning_rate: 0.01 → 0.5" in result.stderr and "--override_config" in result.stderr
    # Fewer evaluation images would make the next epoch's loss incomparable with the best's.
    result = train_cli(workdir, "--config.eval_max_images=2", check=False)
    assert result.returncode == 2 and "eval_max_images: -1 → 2" in result.stderr
    # What shapes the saved state cannot change, not even with --override_config.
    result = train_cli(workdir, "--config.prior=False", "--override_config", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.prior cannot change when resuming, not even with --override_config" in \
        result.stderr and f"--config.init_weights={workdir}" in result.stderr
    # The seed too (the input order is drawn from it): named, not blamed on the dataset.
    result = train_cli(workdir, "--config.seed=1", "--override_config", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.seed (the input order is drawn from it) cannot change when resuming" in \
        result.stderr
    # As advised: another workdir from this run's weights, without the prior it had.
    result = train_cli(tmp_path / "no_prior", "--config.prior=False", "--config.num_epochs=1",
                       f"--config.init_weights={workdir}")
    assert "config.prior is False: the prior in config.init_weights is not used" in result.stdout
    assert (tmp_path / "no_prior" / "final_metrics.json").exists()


def _readme_resumable_fields() -> list[str]:
    """The fields README's Resume paragraph says may change when resuming: the backquoted
    names between "You may change" and "when resuming", and its "logging and checkpoint
    frequency" (log_every_steps, checkpoint_every_steps)."""
    import re
    text = " ".join((TESTS.parent / "README.md").read_text().split())
    sentence = re.search(r"You may change (.*?) when resuming", text)
    assert sentence and "logging and checkpoint frequency" in sentence[1], "README changed"
    return [*re.findall(r"`(\w+)`", sentence[1]), "log_every_steps", "checkpoint_every_steps"]


@pytest.mark.parametrize("field", _readme_resumable_fields())
def test_every_field_readme_lets_a_resume_change_is_accepted(field):
    """A field left out of train.RESUMABLE_CHANGES would refuse the resume README promises
    (e.g. data_dir after moving the prepared dataset) unless --override_config is passed."""
    from mlnet_jax.train import _jsonable_config, config_differences
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    saved = _jsonable_config(tiny.get_config())
    assert field in saved, field
    current = dict(saved, **{field: "/elsewhere" if isinstance(saved[field], str)
                             else saved[field] + 1})
    assert config_differences(saved, current) == []
    # ... while a field README does not list is named.
    assert config_differences(saved, dict(current, learning_rate=0.5)) == [
        f"learning_rate: {saved['learning_rate']!r} → 0.5"]


@pytest.mark.timeout(600)
def test_salicon_config_trains_from_a_prepared_salicon2015(tmp_path):
    """The real data path: TFDS array_record files read with grain, letterboxed 24×32 → 32×32."""
    from fake_datasets import prepared_salicon
    data_dir = prepared_salicon(tmp_path, counts={"train": 8, "validation": 4, "test": 0})
    workdir = tmp_path / "run"
    train_cli(workdir, "--config.dataset=salicon2015", f"--config.data_dir={data_dir}",
              "--config.num_epochs=1", "--config.steps_per_epoch=2")
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["num_images"] == 4 and np.isfinite(final["cc"])


def _wait_for(predicate, timeout, proc):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.timeout(300)
def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    import signal
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlnet_jax.train", f"--config={TINY_CONFIG}",
                             f"--workdir={workdir}", "--config.num_epochs=50",
                             "--config.checkpoint_every_steps=1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent)
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 4, 240, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "saved a checkpoint" in stderr
    step, _, _ = latest_state(workdir)
    assert 4 <= step < 150  # saved where it stopped, not at a scheduled save


@pytest.mark.timeout(300)
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    train_cli(workdir, "--config.num_epochs=1")
    # The first bad step (5: step 4's update is the one that blows up) is a scheduled save
    # before any log point: the save must check it first, not write a checkpoint "5" that
    # holds step 4's state (a non-finite step leaves the state as it was).
    result = train_cli(workdir, "--config.num_epochs=3", "--override_config",
                       "--config.learning_rate=1e30", "--config.log_every_steps=100",
                       "--config.checkpoint_every_steps=5", check=False)
    assert result.returncode == 1
    import re
    match = re.search(r"NaN/Inf at step (\d+).*last good checkpoint \(step (\d+)\)", result.stderr)
    assert match, result.stderr[-2000:]
    assert (int(match[1]), int(match[2])) == (5, 3)
    step, state, _ = latest_state(workdir)
    assert step == 3 and int(state["step"]) == 3  # nothing saved after the failure
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
    # Before any checkpoint: said so, not "the last good checkpoint (step None)".
    result = train_cli(tmp_path / "fresh", "--config.learning_rate=1e30", check=False)
    assert result.returncode == 1
    assert "No checkpoint had been written yet: a rerun starts over." in result.stderr


def _eval_steps(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "eval"]


@pytest.mark.timeout(300)
def test_early_stopping_is_keras1s_and_a_resume_decides_it_again(tmp_path):
    workdir = tmp_path / "run"
    # Learning rate 0: epoch 1 is the best, and no later one improves on it.
    frozen = ("--config.learning_rate=0", "--config.num_epochs=5")
    out = train_cli(workdir, *frozen, "--config.early_stopping_patience=1")
    # Keras 1 with patience 1 stops at the 2nd epoch in a row without improvement (epoch 3).
    assert _eval_steps(workdir) == [3, 6, 9]
    assert "early stopping: 2 epochs without a better validation loss (patience 1); the best " \
           "is step 3" in out.stdout + out.stderr
    out = train_cli(workdir, *frozen, "--config.early_stopping_patience=2")
    assert "the run had stopped early; continuing" in out.stdout + out.stderr
    assert _eval_steps(workdir) == [3, 6, 9, 12]


@pytest.mark.timeout(300)
def test_early_stopping_counts_epochs_without_improvement_in_a_row(tmp_path, monkeypatch):
    """A new best resets the count (not resetting it would stop a run at patience + 1 worse
    epochs in all, cutting it short): losses 1, 2, 0.5, 2, 2, 2 with patience 2 run all six
    epochs (Keras 1 stops at the third worse epoch in a row), and best/ is epoch 3's."""
    import mlnet_jax.train as train_module
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    real, losses = train_module.evaluate_split, iter([1.0, 2.0, 0.5, 2.0, 2.0, 2.0, 2.0, 2.0])

    def scripted(*args, **kwargs):
        return dict(real(*args, **kwargs), loss=next(losses))

    monkeypatch.setattr(train_module, "evaluate_split", scripted)
    config = tiny.get_config()
    config.num_epochs, config.early_stopping_patience, config.learning_rate = 8, 2, 0.0
    train_module.train_and_evaluate(config, tmp_path / "run")
    assert _eval_steps(tmp_path / "run") == [3, 6, 9, 12, 15, 18]  # stopped after epoch 6
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["checkpoint_step"] == 9


@pytest.mark.timeout(300)
def test_an_epoch_with_blank_validation_maps_is_never_the_best(tmp_path, monkeypatch, capsys):
    """The loss guard makes a blank map's loss finite, and low: a model whose ReLUs died for an
    epoch was kept in best/ (the original's loss was NaN there, never the best), so predict and
    evaluate on the workdir gave blank maps. Such an epoch is not an improvement, and the
    blank maps are counted in the log and final_metrics.json."""
    import mlnet_jax.train as train_module
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    real, calls = train_module.evaluate_split, []

    def second_epoch_blank(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # a dead epoch: every map blank, the guarded loss tiny
            result.update(loss=1e-9, blank_maps=result["num_images"])
        return result

    monkeypatch.setattr(train_module, "evaluate_split", second_epoch_blank)
    config = tiny.get_config()
    config.num_epochs, config.learning_rate = 3, 0.0  # every epoch scores as the first
    train_module.train_and_evaluate(config, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["checkpoint_step"] == 3 and final["blank_maps"] == 0
    out = capsys.readouterr()
    assert "epoch 2: validation loss 0.0000" in out.out + out.err
    assert "(8 of 8 validation maps blank, every ReLU dead: not a best checkpoint" in out.out + out.err


def test_blank_maps_are_counted_per_image(tmp_path):
    from mlnet_jax.evaluation import score_split
    import fake_datasets as fake
    from mlnet_jax.input_pipeline import open_source
    data_dir = fake.prepared_salicon(tmp_path, {"train": 1, "validation": 3})
    source = open_source("salicon2015", "validation", str(data_dir))

    def predict(batch):  # the second image's map is blank
        pred = np.ones((len(batch["image"]), 4, 4), np.float32)
        pred[1] = 0
        return {"pred": pred, "loss": np.zeros(len(batch["image"]), np.float32)}

    scores = score_split(source, model_size=(32, 32), batch_size=3, predict=predict)
    assert [row["blank_map"] for row in scores.rows] == [0.0, 1.0, 0.0]
    assert scores.summary["blank_map"] == {"mean": pytest.approx(1 / 3), "std": pytest.approx(
        np.std([0, 1, 0])), "n": 3}


def _sigterm_at_batch(prefetch_to_device, n: int):
    """A ``prefetch_to_device`` whose loader sends this process SIGTERM as it hands out its
    n-th batch (the step of that batch then completes, and the run stops)."""
    import os
    import signal

    def prefetch(*args, **kwargs):
        loader = prefetch_to_device(*args, **kwargs)

        class Loader:
            get_state, set_state = loader.get_state, loader.set_state
            taken = 0

            def __next__(self):
                Loader.taken += 1
                if Loader.taken == n:
                    os.kill(os.getpid(), signal.SIGTERM)
                return next(loader)
        return Loader()
    return prefetch


@pytest.mark.timeout(300)
def test_a_ctrl_c_while_starting_stops_before_the_first_step(tmp_path, monkeypatch):
    """Python's KeyboardInterrupt can land inside a callback that swallows it (JAX's garbage-
    collection hook), and the run trained on: the signal is caught from the start instead,
    and the run stops with one line before its first step."""
    import os
    import signal

    import mlnet_jax.train as train_module
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    real_compile = train_module.compile_steps

    def interrupted_compile(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(train_module, "compile_steps", interrupted_compile)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job
    with pytest.raises(train_module.TrainingStopped, match=r"received signal 2 while starting; "
                       r"stopped before step 1 \(nothing was trained yet\)") as stopped:
        train_module.train_and_evaluate(tiny.get_config(), tmp_path / "run")
    assert stopped.value.exit_code == 130
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (
        tmp_path / "run" / "metrics.jsonl").read_text().strip()
    assert signal.getsignal(signal.SIGINT) is before  # given back


@pytest.mark.timeout(300)
def test_a_stop_during_an_epochs_last_step_evaluates_that_epoch_on_resume(tmp_path, monkeypatch):

    import mlnet_jax.input_pipeline as input_pipeline
    from mlnet_jax.train import TrainingStopped, train_and_evaluate
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    real = input_pipeline.prefetch_to_device
    stopped_at_the_third_batch = _sigterm_at_batch(real, 3)  # step 3 ends epoch 1

    workdir = tmp_path / "run"
    config = tiny.get_config()
    config.num_epochs = 1  # the stop comes in the run's last step: no later save
    config.learning_rate = 1e-3  # at 1e-2 its maps go blank, and no epoch is the best
    monkeypatch.setattr(input_pipeline, "prefetch_to_device", stopped_at_the_third_batch)
    with pytest.raises(TrainingStopped, match="received signal 15; saved a checkpoint at step 3"):
        train_and_evaluate(config, workdir)
    assert _eval_steps(workdir) == []
    monkeypatch.setattr(input_pipeline, "prefetch_to_device", real)
    train_and_evaluate(config, workdir)
    assert _eval_steps(workdir) == [3]  # as a run without the stop
    from mlnet_jax.checkpointing import RunCheckpoints
    checkpoints = RunCheckpoints(workdir, 2)
    meta = checkpoints.read_meta()
    checkpoints.close()
    assert meta["evaluation_pending"] is False and meta["best_step"] == 3  # recorded at step 3
    train_and_evaluate(config, workdir)  # the finished run again: nothing left to evaluate
    assert _eval_steps(workdir) == [3]
    # A stop during the held-out evaluation stops it (it ran to its end, minutes on SALICON,
    # and the run returned as if nothing had been asked); a rerun evaluates and writes.
    import os

    import mlnet_jax.train as train_module
    real_evaluate = train_module.evaluate_split

    def signalled(*args, **kwargs):
        if kwargs.get("centre_bias"):  # the held-out evaluation, not an epoch's
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    (workdir / "final_metrics.json").unlink()
    monkeypatch.setattr(train_module, "evaluate_split", signalled)
    with pytest.raises(TrainingStopped, match="received signal 15 during the held-out "
                                              "evaluation; training is complete"):
        train_and_evaluate(config, workdir)
    assert not (workdir / "final_metrics.json").exists()
    monkeypatch.setattr(train_module, "evaluate_split", real_evaluate)
    assert train_and_evaluate(config, workdir)["step"] == 3
    assert (workdir / "final_metrics.json").exists() and _eval_steps(workdir) == [3]


def test_training_runs_in_a_thread_other_than_the_main_one(tmp_path):
    """As a notebook does to stay responsive: signal handlers can only be installed from the
    main thread, and setting them raised ValueError there."""
    import threading

    from mlnet_jax.train import train_and_evaluate
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    config = tiny.get_config()
    config.num_epochs = 1
    outcome, before = {}, signal.getsignal(signal.SIGINT)

    def run():
        try:
            outcome["result"] = train_and_evaluate(config, tmp_path / "run")
        except BaseException as e:  # noqa: BLE001 — reported below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=240)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["result"]["step"] == config.steps_per_epoch
    assert signal.getsignal(signal.SIGINT) is before  # untouched


def test_the_commands_main_runs_again_in_one_process_with_its_overrides(tmp_path):
    """A notebook cell calling ``main(argv)``: a second call raised DuplicateFlagError (absl's
    flags are process-wide), ``--config.key`` overrides in ``argv`` were refused (looked for in
    the kernel's own argv), and absl left the root logger at ERROR, hiding later warnings."""
    import logging

    from mlnet_jax.evaluate import main as evaluate_main
    from mlnet_jax.train import main as train_main
    workdir, level = tmp_path / "run", logging.getLogger().level
    for epochs in (1, 2):  # the second call resumes, with its own override
        assert train_main(["train", f"--config={TINY_CONFIG}", f"--workdir={workdir}",
                           f"--config.num_epochs={epochs}"]) == 0
        assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 3 * epochs
    assert evaluate_main(["evaluate", f"--checkpoint={workdir}", "--noprogress",
                          f"--config={TINY_CONFIG}", "--config.eval_max_images=4"]) == 0
    summary = json.loads((workdir / "eval_synthetic_validation.json").read_text())
    assert summary["num_images"] == 4
    assert logging.getLogger().level == level


def test_a_commands_main_puts_the_logging_state_back(tmp_path):
    """absl's app.run sets the root logger's level and absl's verbosity for a process that ends
    with the command (evaluate sets its verbosity to ERROR): not put back, a notebook calling
    main() would hide every later warning. In a fresh interpreter (pytest sets up logging of
    its own), two calls each leave both as they were before the first."""
    code = f"""
import logging, sys
from absl import logging as absl_logging
from mlnet_jax.evaluate import main
def state():
    return [logging.getLogger().level, absl_logging.get_verbosity()]
states = [state()]
for run in (1, 2):
    code = main(["evaluate", "--baseline=centre", "--noprogress", "--config={TINY_CONFIG}",
                 "--config.synthetic_eval_size=2", "--config.compilation_cache_dir=",
                 "--output={tmp_path / 'e.json'}"])
    assert code == 0, code
    states.append(state())
print(states)
"""
    result = run("-c", code)
    states = json.loads(result.stdout.strip().splitlines()[-1])
    assert states[1] == states[0] and states[2] == states[0], states


def test_packaged_configs_are_found_without_a_checkout(tmp_path, monkeypatch):
    """`--config configs/salicon.py` works from any folder (pip install without a clone)."""
    from mlnet_jax.cli import PACKAGED_CONFIGS, resolve_packaged_config
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config=configs/salicon.py", "--config", "configs/demo.py", "--workdir=x"]
    assert resolve_packaged_config(argv) == [
        "train", f"--config={PACKAGED_CONFIGS / 'salicon.py'}", "--config",
        str(PACKAGED_CONFIGS / "demo.py"), "--workdir=x"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "salicon.py").write_text("# a local file wins")
    assert resolve_packaged_config(argv)[1] == "--config=configs/salicon.py"


def test_a_config_field_given_twice_takes_its_last_value():
    """As for every other flag; ml_collections joined a tuple field's repeats instead
    (input_size=64,96 then =32,32 was (64, 96, 32, 32))."""
    from absl import flags

    from mlnet_jax.cli import run_absl
    seen = []

    def define():
        flags.DEFINE_bool("debug", False, "")

    def body():
        seen.append((flags.FLAGS.config.input_size, flags.FLAGS.config.num_epochs))

    argv = ["train", f"--config={TINY_CONFIG}", "--config.input_size=64,96",
            "--config.num_epochs=2", "--config.input_size=32,32", "--config.num_epochs=3"]
    assert run_absl(body, argv, config=(str(TINY_CONFIG), ""), define=define) == 0
    assert seen == [((32, 32), 3)]


@pytest.mark.timeout(300)
def test_two_process_training_run_end_to_end(tmp_path):
    """The whole command on 2 processes (gloo): sharded data, Orbax saves from both, and the
    evaluation gathered over processes covers every held-out image."""
    workdir = tmp_path / "run"
    script = ("import jax, sys; jax.config.update('jax_cpu_collectives_implementation', 'gloo'); "
              "from mlnet_jax.train import main; sys.exit(main(sys.argv))")
    for epochs in (1, 2):  # one epoch, then resumed for the second: each process's position
        outputs = run_two_processes(lambda address, k: [
            "-c", script, f"--config={TINY_CONFIG}", f"--workdir={workdir}",
            f"--config.num_epochs={epochs}", "--config.eval_max_images=5",
            f"--coordinator_address={address}", "--num_processes=2", f"--process_id={k}"])
    assert "resuming from" in outputs[0][0] + outputs[0][1]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]
    final = json.loads((workdir / "final_metrics.json").read_text())
    # The split's first 5 of 8 images, as one process scores them (not 3 + 3 of each shard).
    assert final["num_images"] == 5 and final["step"] == 6
    alone = subprocess.run([sys.executable, "-m", "mlnet_jax.evaluate", "--noprogress",
                            f"--checkpoint={workdir}", f"--output={tmp_path / 'alone.json'}"],
                           capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["num_images"] == 5
    assert alone["metrics"]["cc"]["mean"] == pytest.approx(final["cc"], rel=1e-5)
    assert "2 process(es)" in outputs[0][0] and "epoch 2:" in outputs[0][0]
    assert "epoch" not in outputs[1][0]  # one console report, from process 0
    # Saved by two processes, read by one (predict, evaluate, init_weights on a laptop).
    from mlnet_jax import load_model
    model, variables, info = load_model(workdir)
    maps = model.apply(variables, jnp.zeros((1, *info.input_size, 3)), train=False)
    assert maps.shape == (1, 4, 4, 1) and bool(jnp.isfinite(maps).all())


def test_compilation_cache_is_on_by_default_in_train_and_predict_and_can_be_turned_off():
    from mlnet_jax.configs import default, demo, salicon
    from mlnet_jax.predict import DEFAULT_CACHE, build_parser
    from mlnet_jax.compilation_cache import enable_compilation_cache
    for config in (default, demo, salicon):
        assert config.get_config().compilation_cache_dir == DEFAULT_CACHE
    assert build_parser().parse_args(["--checkpoint", "c", "--input", "i", "--output", "o"]
                                     ).compilation_cache == DEFAULT_CACHE
    # '' after no directory of ours leaves JAX's setting as it was (tests/test_compilation_cache
    # covers '' after one of ours).
    import mlnet_jax.compilation_cache as compilation_cache
    if compilation_cache._ours is None:
        before = jax.config.jax_compilation_cache_dir
        enable_compilation_cache("")
        assert jax.config.jax_compilation_cache_dir == before


def test_an_evaluation_split_without_ground_truth_is_refused_before_training(tmp_path,
                                                                          monkeypatch):
    import mlnet_jax.train as train_module
    from mlnet_jax.input_pipeline import RecordSource
    sys.path.insert(0, str(Path(__file__).parent / "configs"))
    import tiny
    config = tiny.get_config()
    train_source, eval_source = train_module.make_sources(config)
    bare = [dict(eval_source[i], saliency_map=b"", fixations=np.zeros((0, 2), np.int32))
            for i in range(len(eval_source))]
    monkeypatch.setattr(train_module, "make_sources",
                        lambda config: (train_source, RecordSource(bare, "no truth")))
    with pytest.raises(UserError, match=r"config.eval_split synthetic/validation has no ground "
                                        r"truth \(saliency maps or fixations\)"):
        train_module.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.timeout(300)
def test_a_resume_takes_the_model_from_the_checkpoint_not_init_weights_again(tmp_path):
    import shutil

    from mlnet_jax.train import train_and_evaluate
    sys.path.insert(0, str(Path(__file__).parent / "configs"))
    import tiny

    def config(**fields):
        c = tiny.get_config()
        for key, value in fields.items():
            setattr(c, key, value)
        return c

    train_and_evaluate(config(num_epochs=1), tmp_path / "first")
    run = config(num_epochs=1, init_weights=str(tmp_path / "first"))
    train_and_evaluate(run, tmp_path / "second")
    shutil.rmtree(tmp_path / "first")  # the weights it started from are gone
    run.num_epochs = 2
    final = train_and_evaluate(run, tmp_path / "second")
    assert final["step"] == 6


@pytest.mark.timeout(400)
def test_a_full_model_init_weights_file_is_taken_whole_and_frozen_convs_hold_it(tmp_path):
    """config.init_weights naming a full-model .npz starts the run with all of it: backbone,
    head and prior (a prior left at its zero init, or a backbone only shape-checked and not
    loaded, would start elsewhere), and 'auto' pooling/preprocessing take the file's (not the
    defaults standard/caffe, which would normalise and pool the images as the weights never
    saw them). Resumed with a positive learning rate, config.frozen_convs keeps the first
    convolutions at the file's values (frozen_convs not reaching the run would train them)."""
    from flax import traverse_util as tu

    from mlnet_jax.checkpointing import restore_for_inference
    from mlnet_jax.train import train_and_evaluate
    from mlnet_jax.weights_file import read_weights, save_weights
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny

    info = ModelInfo(input_size=(32, 32), preprocessing="torch", pooling="keras1",
                     source="a test file")
    params = initial_params(info.build(), info, jax.random.PRNGKey(7), None)  # the run's seed is 0
    params["prior"] = jnp.asarray(np.random.default_rng(3).normal(0, 0.3, params["prior"].shape),
                                  jnp.float32)  # the model's own init is zeros
    save_weights(tmp_path / "model.npz", jax.device_get(params), info.to_metadata())
    expected, _ = read_weights(tmp_path / "model.npz")  # the reference: what the file holds
    expected = tu.flatten_dict(expected, sep="/")
    assert {k.split("/")[0] for k in expected} == {"backbone", "head", "prior"}
    assert np.any(expected["prior"] != 0)

    config = tiny.get_config()
    for key, value in dict(preprocessing="auto", pooling="auto", frozen_convs=2, num_epochs=1,
                           learning_rate=0.0, init_weights=str(tmp_path / "model.npz")).items():
        setattr(config, key, value)
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir)
    saved, metadata = restore_for_inference(workdir / "checkpoints")  # the latest, step 3
    assert (metadata["preprocessing"], metadata["pooling"]) == ("torch", "keras1")
    saved = tu.flatten_dict(saved, sep="/")
    assert saved.keys() == expected.keys()
    for key, value in expected.items():  # learning rate 0: the file's values, every one
        np.testing.assert_array_equal(saved[key], value, err_msg=key)

    # A positive learning rate (a resumable change with --override_config): the 2 frozen
    # convolutions stay at the file's values, the next one trains.
    config.learning_rate, config.num_epochs = 1e-3, 2
    train_and_evaluate(config, workdir, override_config=True)
    trained, _ = restore_for_inference(workdir / "checkpoints")  # step 6, not best/
    trained = tu.flatten_dict(trained, sep="/")
    for key, value in expected.items():
        if key.startswith(("backbone/conv1_1/", "backbone/conv1_2/")):
            np.testing.assert_array_equal(trained[key], value, err_msg=key)
    assert not np.array_equal(trained["backbone/conv2_1/kernel"],
                              expected["backbone/conv2_1/kernel"])


def _tensorboard_scalars(folder: Path) -> dict:
    """{(tag, step): value} as TensorBoard shows them: event files in order, and a session
    start at step s discards what came before at steps ≥ s (the purge)."""
    import struct

    from tensorboardX.proto import event_pb2
    shown: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                shown = {k: v for k, v in shown.items() if k[1] < event.step}
            for value in event.summary.value:
                shown[(value.tag, event.step)] = round(value.simple_value, 5)
    return shown


@pytest.mark.timeout(400)
def test_stops_in_an_evaluation_and_off_a_log_step_leave_the_logs_of_an_unstopped_run(
        tmp_path, monkeypatch):
    import os
    import signal

    import mlnet_jax.input_pipeline as input_pipeline
    import mlnet_jax.train as train_module
    from mlnet_jax.checkpointing import RunCheckpoints
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    config = tiny.get_config()
    config.log_every_steps = 2  # steps 2, 4 and the epoch ends 3, 6 log
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_module.train_and_evaluate(config, straight)

    real_evaluate = train_module.evaluate_split

    def signalled_evaluation(*args, **kwargs):  # SIGTERM as the evaluation starts
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_split", signalled_evaluation)
    with pytest.raises(train_module.TrainingStopped, match="received signal 15 while "
                                                           "evaluating step 3"):
        train_module.train_and_evaluate(config, stopped)
    checkpoints = RunCheckpoints(stopped, 2)
    assert checkpoints.latest_step() == 3 and checkpoints.read_meta()["evaluation_pending"]
    checkpoints.close()
    monkeypatch.setattr(train_module, "evaluate_split", real_evaluate)

    real_prefetch = input_pipeline.prefetch_to_device
    # Resumed at 3: its 2nd batch is step 5's.
    monkeypatch.setattr(input_pipeline, "prefetch_to_device", _sigterm_at_batch(real_prefetch, 2))
    with pytest.raises(train_module.TrainingStopped, match="saved a checkpoint at step 5"):
        train_module.train_and_evaluate(config, stopped)
    monkeypatch.setattr(input_pipeline, "prefetch_to_device", real_prefetch)

    # A crash after epoch 2's eval record is written, before the checkpoint that records the
    # evaluation (step 6's is saved with evaluation_pending first): the resumed run evaluates
    # step 6 again. Its MetricWriter must be told so (evaluation_pending) and drop the eval
    # record already there; told otherwise it would keep it, and step 6 would be logged twice.
    class Crash(Exception):
        pass

    real_save = RunCheckpoints.save

    def crash_after_the_evaluation(self, step, state, data_state, meta, is_best=False):
        if step == 6 and not meta["evaluation_pending"]:
            raise Crash
        return real_save(self, step, state, data_state, meta, is_best)

    monkeypatch.setattr(RunCheckpoints, "save", crash_after_the_evaluation)
    with pytest.raises(Crash):
        train_module.train_and_evaluate(config, stopped)
    monkeypatch.setattr(RunCheckpoints, "save", real_save)
    assert [json.loads(line)["kind"] for line in
            (stopped / "metrics.jsonl").read_text().splitlines()][-1] == "eval"  # step 6's
    checkpoints = RunCheckpoints(stopped, 2)
    assert checkpoints.latest_step() == 6 and checkpoints.read_meta()["evaluation_pending"]
    checkpoints.close()
    train_module.train_and_evaluate(config, stopped)

    def records(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["kind"], r.get("loss")) for r in map(json.loads, lines)]

    # No step-5 record, no second eval of step 3 or 6, and the same losses to the last digit (the
    # losses carried over the stop were Python floats: their mean was float64 after a resume).
    assert records(stopped) == records(straight)
    assert [(s, k) for s, k, _ in records(straight)] == [
        (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (6, "train"), (6, "eval"),
        (6, "final")]
    shown = {k: v for k, v in _tensorboard_scalars(stopped / "tensorboard").items()
             if "images_per_second" not in k[0]}
    assert shown == {k: v for k, v in _tensorboard_scalars(straight / "tensorboard").items()
                     if "images_per_second" not in k[0]}
    assert ("train/loss", 4) in shown and ("eval/loss", 3) in shown
