"""Training survives SIGKILL at any moment: restarted with the same command, it ends with
exactly the parameters of an uninterrupted run."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

TESTS = Path(__file__).parent
COMMAND = [sys.executable, "-m", "mlnet_jax.train", f"--config={TESTS / 'configs' / 'tiny.py'}",
           "--config.num_epochs=4", "--config.checkpoint_every_steps=2"]


def final_state(workdir: Path):
    from test_train import latest_state
    step, state, _ = latest_state(workdir)
    return step, state


@pytest.mark.timeout(900)
def test_sigkill_at_three_random_moments_then_restart_gives_identical_parameters(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*COMMAND, f"--workdir={straight}"], check=True, capture_output=True,
                   timeout=300, cwd=TESTS.parent)
    rng = random.Random(1234)
    metrics = killed / "metrics.jsonl"

    def records() -> int:
        return metrics.read_text().count("\n") if metrics.exists() else 0

    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen([*COMMAND, f"--workdir={killed}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=TESTS.parent)
        # A seeded moment: after 1-3 more logged steps/evaluations, plus up to 0.6 s, so the kill
        # lands mid-step, mid-checkpoint or mid-evaluation (the first may land in start-up).
        target = records() + rng.randint(0 if attempt == 0 else 1, 3)
        deadline = time.time() + 120
        while records() < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
    assert kills == 3  # every moment fell inside the run
    result = subprocess.run([*COMMAND, f"--workdir={killed}"], capture_output=True, text=True,
                            timeout=300, cwd=TESTS.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    step_a, state_a = final_state(straight)
    step_b, state_b = final_state(killed)
    assert step_a == step_b == 12
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state_a)[0], jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not [p for p in (killed / "checkpoints").iterdir() if not p.name.isdigit()]
    assert (killed / "final_metrics.json").exists()
    # The log tells the same story: replayed steps are not logged twice, losses are the same.
    assert logged_losses(killed) == logged_losses(straight)


def logged_losses(workdir: Path) -> list[tuple[int, str, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["kind"], r["loss"]) for r in map(json.loads, lines) if r["kind"] != "final"]


def test_closing_waits_for_the_clean_up_thread_orbax_starts(tmp_path, monkeypatch):
    """An early error (a missing config.init_weights) closes the managers just made and exits:
    Orbax's clean-up of unfinished saves, still running in its thread, then printed a
    traceback after the one-line error in about half the runs. Closing waits for it."""
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths

    from mlnet_jax.checkpointing import RunCheckpoints
    finished = []

    async def slow_clean_up(*args, **kwargs):
        await asyncio.sleep(0.5)
        finished.append(args[0])

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_clean_up)
    RunCheckpoints(tmp_path, 2).close()
    assert sorted(Path(p).name for p in finished) == ["best", "checkpoints"]


def test_a_checkpoint_retired_while_being_read_is_replaced_by_the_newer_one(tmp_path, monkeypatch):
    """Predict or evaluate on a workdir a training is writing to: the best checkpoint found can
    be retired (deleted) before it is read; the newer one is read instead."""
    from mlnet_jax import checkpointing
    checkpoints = checkpointing.RunCheckpoints(tmp_path, 2)
    state = {"trainable": {"w": np.arange(3.0, dtype=np.float32)}, "frozen": {}}
    checkpoints.save(7, state, {}, {"model": {"input_size": [32, 32]}}, is_best=True)
    checkpoints.close()
    real, calls = checkpointing._step_dir_for, []

    def resolved_then_retired(path):
        calls.append(path)
        return path / "best" / "5" if len(calls) == 1 else real(path)  # 5: already deleted

    monkeypatch.setattr(checkpointing, "_step_dir_for", resolved_then_retired)
    params, model = checkpointing.restore_for_inference(tmp_path)
    assert len(calls) == 2 and model == {"input_size": [32, 32]}
    np.testing.assert_array_equal(params["w"], [0, 1, 2])


def test_a_best_checkpoint_left_by_a_killed_run_is_replaced_when_its_step_is_saved_again(
        tmp_path):
    import orbax.checkpoint as ocp

    from mlnet_jax.checkpointing import RunCheckpoints
    killed = {"w": np.full((3,), 1.0, np.float32)}
    replayed = {"w": np.full((3,), 2.0, np.float32)}
    checkpoints = RunCheckpoints(tmp_path, 2)
    meta = {"best_step": 6}
    # As a kill between the two saves of step 6 leaves it: best/6 written, checkpoints/6 not.
    checkpoints.best.save(6, args=ocp.args.Composite(
        state=ocp.args.StandardSave(killed), data=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave(meta)), force=True)
    assert checkpoints.latest.latest_step() is None
    # The resumed run reaches step 6 again with its own (here different) state.
    checkpoints.save(6, replayed, {}, meta, is_best=True)
    for manager in (checkpoints.best, checkpoints.latest):
        restored = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        np.testing.assert_array_equal(restored.state["w"], replayed["w"])
    # Saving a step again after its evaluation: checkpoints/ only gets the new progress record
    # (its state is this run's); best/ is written whole (its state may be another run's).
    # (A different state is passed only to tell the two apart.)
    checkpoints.save(6, killed, {}, {"best_step": 6, "evaluated": True}, is_best=True)
    for manager, state in ((checkpoints.latest, replayed), (checkpoints.best, killed)):
        restored = manager.restore(6, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        np.testing.assert_array_equal(restored.state["w"], state["w"])
        assert restored.meta["evaluated"] is True
    checkpoints.close()


def test_a_best_checkpoint_of_another_run_at_the_same_step_is_replaced(tmp_path):
    """A best/ that is not this run's (copied in from another run, say; a workdir whose
    checkpoints/ is gone now resumes from its best/ instead) at a step this run reaches: its
    epoch end saves checkpoints/ first, then best/ after the evaluation, and best/ must get
    this run's state, not keep the other's with the new progress record."""
    import shutil

    import orbax.checkpoint as ocp

    from mlnet_jax.checkpointing import RunCheckpoints
    old_run = {"w": np.full((3,), 1.0, np.float32)}
    new_run = {"w": np.full((3,), 2.0, np.float32)}
    checkpoints = RunCheckpoints(tmp_path, 2)
    checkpoints.save(5, old_run, {}, {"best_step": 5}, is_best=True)
    checkpoints.close()
    shutil.rmtree(tmp_path / "checkpoints")

    checkpoints = RunCheckpoints(tmp_path, 2)
    checkpoints.save(5, new_run, {}, {"evaluation_pending": True})  # the epoch's state
    checkpoints.save(5, new_run, {}, {"best_step": 5, "run": "new"}, is_best=True)
    restored = checkpoints.best.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(restored.state["w"], new_run["w"])
    assert restored.meta == {"best_step": 5, "run": "new"}
    checkpoints.close()
