"""The bad-input matrix for weights, checkpoints and the runtime: each gets one clear line
naming the file or field and what was expected, and nothing already written is harmed.
(Images and datasets have their rows in test_predict_cli.py and test_datasets.py.)"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlnet_jax.atomic import atomic_path
from mlnet_jax.errors import UserError, WeightsError

TESTS = Path(__file__).parent
TINY = TESTS / "configs" / "tiny.py"


def tiny_config(**overrides):
    sys.path.insert(0, str(TESTS / "configs"))
    import tiny
    config = tiny.get_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=TESTS.parent)


def test_truncated_converted_weights_are_named(tmp_path):
    from mlnet_jax.weights_file import save_weights, load_vgg16
    path = tmp_path / "vgg.npz"
    save_weights(path, {"backbone": {"conv1_1": {"kernel": np.zeros((3, 3, 3, 64))}}},
                 {"model": "vgg16", "source": "x", "preprocessing": "torch", "pooling": "standard"})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match=str(path)):
        load_vgg16(path)


def test_truncated_hdf5_is_named(tmp_path):
    h5py = pytest.importorskip("h5py")
    src = tmp_path / "vgg16_weights.h5"
    with h5py.File(src, "w") as f:
        f["layer_1/param_0"] = np.zeros((64, 3, 3, 3), np.float32)
    src.write_bytes(src.read_bytes()[:300])
    one_line_error(cli("mlnet_jax.convert_weights", src, tmp_path / "out.npz"), str(src))


def test_weights_of_another_model_name_the_first_misfit(tmp_path):
    """A ResNet-like state_dict is refused with the first VGG key it lacks."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "resnet.safetensors"
    safetensors_numpy.save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, str(src))
    one_line_error(cli("mlnet_jax.convert_weights", src, tmp_path / "out.npz"),
                   "missing key features.0.weight", "first keys: conv1.weight")


@pytest.mark.timeout(300)
def test_checkpoint_from_an_incompatible_config_is_refused(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "mlnet_jax.train", f"--config={TINY}", f"--workdir={run}",
                    "--config.num_epochs=1"], check=True, capture_output=True, timeout=300,
                   cwd=TESTS.parent)
    result = cli("mlnet_jax.train", f"--config={TINY}", f"--workdir={tmp_path / 'other'}",
                 f"--config.init_weights={run}", "--config.width_multiplier=0.5")
    one_line_error(result, "config.init_weights: parameter backbone/conv1_1/bias has shape "
                           "(64,), this config's model needs (32,)")


def test_config_files_that_are_not_configs_are_named(tmp_path):
    (tmp_path / "no_get_config.py").write_text("x = 1\n")
    (tmp_path / "partial.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'dataset': 'synthetic'})\n")
    one_line_error(cli("mlnet_jax.train", f"--config={tmp_path / 'no_get_config.py'}",
                       f"--workdir={tmp_path / 'run'}"),
                   f"--config {tmp_path / 'no_get_config.py'}: defines no get_config()")
    one_line_error(cli("mlnet_jax.evaluate", f"--config={tmp_path / 'partial.py'}",
                       "--baseline=centre"),
                   f"--config {tmp_path / 'partial.py'}: has no field checkpoint_every_steps, ",
                   "mlnet_jax.configs.default.get_config()")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, message", [
    ('config.global_batch_size = "4"', "config.global_batch_size must be int, got 4 (str)"),
    ("config.input_size = 32", "config.input_size must be tuple, got 32 (int)"),
    ("config.dropout_rate = None", "config.dropout_rate must be a number, got None"),
])
def test_a_config_file_setting_a_value_of_the_wrong_type_is_named(tmp_path, line, message):
    """ml_collections' refusal came as absl's error with a 16-line traceback embedded; None,
    which it lets through, as a TypeError from the range checks."""
    config = tmp_path / "wrong.py"
    config.write_text("from mlnet_jax.configs import demo\n\n\ndef get_config():\n"
                      f"    config = demo.get_config()\n    {line}\n    return config\n")
    result = cli("mlnet_jax.train", f"--config={config}", f"--workdir={tmp_path / 'run'}")
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = cli("mlnet_jax.train", f"--config={TINY}", f"--workdir={blocker / 'run'}")
    one_line_error(result, f"--workdir {blocker / 'run'}: cannot write there")


def test_an_empty_workdir_is_refused_not_the_current_folder(tmp_path):
    from mlnet_jax.train import train_and_evaluate
    with pytest.raises(UserError, match="--workdir is empty"):
        train_and_evaluate(tiny_config(), "")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    # What tensorstore (Orbax's array writer) raises on a full disk.
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/abc\": No space left on "
               "device [os_error_code='28'] [source locations='tensorstore/...']"),
])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, caplog,
                                                              error):
    """... and is the one line said about it: Orbax's threads each log the failure with its
    traceback, and tensorstore's late writes print 'Event loop is closed' (as unraisable
    exceptions), during the save and after it; other messages still get through."""
    import logging

    import orbax.checkpoint as ocp
    from absl import logging as absl_logging
    from mlnet_jax.train import train_and_evaluate
    from test_train import latest_state

    class LateWrite:  # its __del__'s error goes to sys.unraisablehook, as tensorstore's do
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    real_save, calls, unraisable = ocp.CheckpointManager.save, [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
    for name in ("absl", "asyncio"):  # what the run adds to their filters goes with the test
        monkeypatch.setattr(logging.getLogger(name), "filters",
                            list(logging.getLogger(name).filters))
    caplog.set_level(logging.INFO)

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) > 1:
            absl_logging.error("_SignalingThread.run() raised an exception: %s", error,
                               exc_info=error)
            absl_logging.warning("an unrelated warning")
            logging.getLogger("asyncio").error("Future exception was never retrieved",
                                               exc_info=(type(error), error, None))
            LateWrite("Event loop is closed")
            raise error
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=r"could not write the checkpoint of step \d+ in \S+ \(No "
                                        r"space left on device\); checkpoints/ holds step 2, "
                                        r"intact: free space and rerun to resume$"):
        train_and_evaluate(tiny_config(num_epochs=1), workdir)
    LateWrite("Event loop is closed")  # after the report too
    LateWrite("another error")
    absl_logging.error("a later failure", exc_info=error)
    assert unraisable == ["another error"]
    logged = [r.getMessage() for r in caplog.records if r.name in ("absl", "asyncio")]
    assert "an unrelated warning" in logged and not [m for m in logged if "failure" in m or
                                                     "exception" in m], logged
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    step, state, _ = latest_state(workdir)
    assert step == 2 and all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(state))


def test_a_best_checkpoint_that_cannot_be_written_is_named_as_such(tmp_path, monkeypatch):
    """The message said 'could not write the checkpoint of step 2 … the previous checkpoint
    (step 2) is intact' when it was best/'s copy of step 2 that failed."""
    import numpy as np

    from mlnet_jax.checkpointing import RunCheckpoints
    checkpoints = RunCheckpoints(tmp_path, 2)
    checkpoints.save(2, {"w": np.zeros(3, np.float32)}, {}, {"evaluation_pending": True})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.best, "save", full)
    with pytest.raises(UserError) as raised:
        checkpoints.save(2, {"w": np.zeros(3, np.float32)}, {}, {"best_step": 2}, is_best=True)
    assert str(raised.value) == (
        f"could not write the best checkpoint of step 2 in {(tmp_path / 'best').absolute()} (No "
        "space left on device); checkpoints/ holds step 2, intact: free space and rerun to resume")
    checkpoints.close()


def test_failed_output_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "final_metrics.json"
    target.write_text("previous")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new conte")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["final_metrics.json"]  # no temp file left


def test_outputs_get_the_mode_a_plain_open_gives_not_owner_only(tmp_path):
    # The umask is read at import; a subprocess sets it first, as a user's shell would.
    script = ("import os, stat, sys; os.umask(0o027); from mlnet_jax.atomic import atomic_path\n"
              "for name in ('new.png', 'old.png'):\n"
              "    with atomic_path(sys.argv[1] + '/' + name) as tmp: tmp.write_bytes(b'x')\n"
              "    print(oct(stat.S_IMODE(os.stat(sys.argv[1] + '/' + name).st_mode)))")
    (tmp_path / "old.png").write_bytes(b"previous")
    os.chmod(tmp_path / "old.png", 0o600)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["0o640", "0o640"]  # 0o666 & ~0o027, replaced file too


@pytest.mark.parametrize("stem", ["x" * 243, "中" * 77, "é" * 117], ids=["ascii", "cjk", "accents"])
def test_a_long_legal_output_name_gets_a_legal_temporary_name(tmp_path, stem):
    from mlnet_jax.atomic import atomic_path
    target = tmp_path / (stem + "_overlay.png")  # 243–255 bytes: legal, barely
    assert len(os.fsencode(target.name)) <= 255
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"written")
    assert target.read_bytes() == b"written" and [p.name for p in tmp_path.iterdir()] == [
        target.name]


def test_nan_image_array_is_refused_by_the_predictor(tmp_path):
    from mlnet_jax.inference import to_rgb_array
    image = np.random.default_rng(0).uniform(0, 1, (8, 8, 3)).astype(np.float32)
    image[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_array(image)


@pytest.mark.timeout(120)
def test_batch_not_divisible_by_the_devices(tmp_path):
    script = ("import jax, sys; jax.config.update('jax_num_cpu_devices', 2); "
              "from mlnet_jax.train import main; sys.exit(main(sys.argv))")
    result = subprocess.run([sys.executable, "-c", script, f"--config={TINY}",
                             f"--workdir={tmp_path / 'run'}", "--config.global_batch_size=5"],
                            capture_output=True, text=True, timeout=120, cwd=TESTS.parent)
    one_line_error(result, "config.global_batch_size=5 cannot be split over 2 devices; use a "
                           "multiple of 2 (e.g. 6)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override, message", [
    ("--config.compute_dtype=float16", "config.compute_dtype='float16': expected one of float32, "
                                       "bfloat16"),
    ("--config.frozen_convs=23", "config.frozen_convs must be in 0..13 (VGG-16 convolutions; the "
                                 "report's setup is 10), got 23"),
    ("--config.keep_checkpoints=0", "config.keep_checkpoints must be at least 1, got 0"),
    ("--config.checkpoint_every_steps=0", "config.checkpoint_every_steps must be at least 1"),
    ("--config.learning_rat=0.1", "--config.learning_rat: the config has no field 'learning_rat' "
                                  "(did you mean learning_rate?)"),
    ("--config=no_such_config.py", "--config no_such_config.py: cannot load it ([Errno 2] No "
                                   "such file or directory"),
    # absl's own parse errors (two lines, exit 1 by itself), and a missing file with an override.
    ("--config.num_epochs=abc", "error: flag --config.num_epochs=abc: invalid literal for int()"),
    ("--no_such_flag", "error: Unknown command line flag 'no_such_flag'"),
    (("--config=no_such_config.py", "--config.num_epochs=1"),
     "--config no_such_config.py: cannot load it ([Errno 2] No such file or directory"),
    (("--coordinator_address=localhost:1", "--num_processes=2", "--process_id=5"),
     "--process_id must be in [0, --num_processes=2), got 5"),
    # Without a coordinator, every host trained alone; outside a cluster, a traceback.
    ("--num_processes=2", "--num_processes and --process_id need --coordinator_address=HOST:PORT"),
    ("--distributed", "cannot start the multi-process run (coordinator_address should be "
                      "defined.); --distributed detects the processes only on TPU pod slices"),
])
def test_out_of_range_config_values_are_named(tmp_path, override, message):
    overrides = override if isinstance(override, tuple) else (override,)
    one_line_error(cli("mlnet_jax.train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                       *overrides), message)


@pytest.mark.parametrize("field, value, expected", [
    ("dropout_rate", 1.0, "in [0, 1)"), ("dropout_rate", -0.1, "in [0, 1)"),
    ("learning_rate", -0.1, "finite and at least 0"), ("lr_decay", -1.0, "finite and at least 0"),
    ("learning_rate", float("inf"), "finite and at least 0"),
    ("momentum", 2.0, "in [0, 1)"), ("width_multiplier", 0.0, "positive"),
    ("input_size", (48, 64, 3), "(rows, cols), each a positive multiple of 8"),
    ("input_size", (0, 64), "(rows, cols), each a positive multiple of 8"),
    ("input_size", (50, 64), "(rows, cols), each a positive multiple of 8"),
    ("pooling", "foo", "auto or standard or keras1"),
    ("preprocessing", "foo", "auto or caffe or torch"), ("seed", -1, "in [0, 2**32)"),
    ("first_conv", "gpu", "auto or xla or pallas"),
    ("steps_per_epoch", 0, "-1 (the default) or at least 1"),
    ("eval_max_images", 0, "-1 (the default) or at least 1"),
    ("worker_count", -5, "-1 (the default) or at least 0"),
    ("early_stopping_patience", -1, "at least 0 (0 disables it)"),
    ("grid_images", -1, "at least 0 (0: no grid)"),
    ("synthetic_train_size", 0, "at least 1 with config.dataset='synthetic'"),
    ("eval_batch_size", 0, "at least 1"),
    ("num_epochs", True, "an integer"),  # a bool is an int to Python: 1 epoch
    ("dataset", "salicon", "one of salicon2015, salicon2017, mit1003, cat2000, folder or "
                           "synthetic"),
])
def test_every_config_field_is_checked_before_anything_runs(tmp_path, field, value, expected):
    from mlnet_jax.train import train_and_evaluate
    config = tiny_config()
    with config.unlocked():
        config[field] = value
    with pytest.raises(UserError) as raised:
        train_and_evaluate(config, tmp_path / "run")
    assert str(raised.value) == f"config.{field} must be {expected}, got {value!r}"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_misspelled_field_set_from_python_is_refused(tmp_path):
    """train_and_evaluate trained with it ignored and saved it with the run, whose resume from
    the command line was then refused as a changed config."""
    from mlnet_jax.train import train_and_evaluate
    config = tiny_config()
    with config.unlocked():
        config.num_epoch = 3
    with pytest.raises(UserError, match=r"^config.num_epoch: the config has no field 'num_epoch' "
                                        r"\(did you mean num_epochs\?\)$"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_wrong_config_field_without_a_config_file_is_named(tmp_path):
    # Here the demo config is the default and the override is applied while flags are defined.
    one_line_error(cli("mlnet_jax.evaluate", "--baseline", "centre", "--config.eval_max_image=3"),
                   "--config.eval_max_image: the config has no field 'eval_max_image'")


def test_a_refused_start_leaves_no_workdir_it_made_but_keeps_one_that_was_there(tmp_path):
    """A dataset not prepared left the new workdir behind with its .lock (and, with a damaged
    dataset, empty best/ and checkpoints/)."""
    from mlnet_jax.train import train_and_evaluate
    config = tiny_config(dataset="folder", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(UserError, match="dataset folder is not prepared"):
        train_and_evaluate(config, tmp_path / "new" / "run")
    assert (tmp_path / "new").exists() and not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="dataset folder is not prepared"):
        train_and_evaluate(config, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's: kept


def test_a_second_training_in_a_busy_workdir_is_refused(tmp_path, monkeypatch):
    import fcntl

    from mlnet_jax.train import train_and_evaluate
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with open(workdir / ".lock", "a") as held:  # as the first training holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=f"--workdir {workdir}: another training is running"):
            train_and_evaluate(tiny_config(num_epochs=1), workdir)
        # '--workdir=~/run' (no shell expansion in that form) is the same workdir.
        with pytest.raises(UserError, match=f"--workdir {workdir}: another training is running"):
            train_and_evaluate(tiny_config(num_epochs=1), "~/run")
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing else touched
    assert not (tmp_path / "~").exists()


@pytest.mark.timeout(300)
def test_a_training_split_that_changed_size_is_named_on_resume(tmp_path):
    from mlnet_jax.train import train_and_evaluate
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config(num_epochs=1), workdir)
    with pytest.raises(UserError, match=f"{workdir}: the training split is not the one this run "
                                        r"was reading \(config.synthetic_train_size 32 then, 48 "
                                        r"now; grain: .+\); use another --workdir to start over$"):
        train_and_evaluate(tiny_config(num_epochs=2, synthetic_train_size=48), workdir,
                           override_config=True)
    # A field the saved state's shape depends on is named as such at once (the message for
    # other fields suggested --override_config, which was then refused too).
    with pytest.raises(UserError, match=f"{workdir}: config.input_size cannot change when "
                       "resuming, not even with --override_config"):
        train_and_evaluate(tiny_config(num_epochs=2, input_size=(48, 48)), workdir)


@pytest.mark.timeout(300)
def test_a_dataset_prepared_again_from_other_images_of_the_same_count_is_named_on_resume(
        tmp_path):
    """Only a changed count was caught: other images of the same count resumed silently, and
    best/ then compared losses over two different validation sets."""
    from fake_datasets import write_folder
    from mlnet_jax.datasets.prepare import prepare
    from mlnet_jax.train import train_and_evaluate
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    config = tiny_config(dataset="folder", data_dir=str(data_dir), num_epochs=1)
    for seed in (1, 2):
        write_folder(tmp_path / f"photos{seed}", n=8, seed=seed)
    prepare("folder", str(tmp_path / "photos1"), str(data_dir), validation_fraction=0.25)
    train_and_evaluate(config, workdir)
    config.num_epochs = 2
    prepare("folder", str(tmp_path / "photos2"), str(data_dir), validation_fraction=0.25,
            overwrite=True)
    with pytest.raises(UserError, match=rf"{workdir}: the dataset was prepared again since this "
                       r"run started, from other images \(config.train_split [\d,]+ bytes in 6 "
                       r"records → [\d,]+ bytes in 6 records; config.eval_split .* in 2 records\)"):
        train_and_evaluate(config, workdir)
    # Continued anyway on a training split of another size: the sizes, not only grain's words.
    write_folder(tmp_path / "photos3", n=12, seed=3)
    prepare("folder", str(tmp_path / "photos3"), str(data_dir), validation_fraction=0.25,
            overwrite=True)
    with pytest.raises(UserError, match=rf"{workdir}: the training split is not the one this "
                       r"run was reading \([\d,]+ bytes in 6 records then, [\d,]+ bytes in 9 "
                       r"records now: the dataset was prepared again; grain: "):
        train_and_evaluate(config, workdir, override_config=True)
    prepare("folder", str(tmp_path / "photos1"), str(data_dir), validation_fraction=0.25,
            overwrite=True)  # the run's own files prepared again: it resumes
    assert train_and_evaluate(config, workdir)["step"] == 2 * config.steps_per_epoch


@pytest.mark.timeout(600)
def test_damaged_checkpoints_are_named_and_a_missing_checkpoints_folder_resumes_from_best(
        tmp_path):
    """A checkpoint with a data file gone or its progress record deleted gave Orbax's and
    tensorstore's tracebacks (train, evaluate) or a 400-character error (predict); a workdir
    whose checkpoints/ was deleted (to free space, say) started over, replacing best/ with a
    worse model and cutting the log."""
    import shutil

    from mlnet_jax import checkpointing
    from mlnet_jax.train import train_and_evaluate
    run = tmp_path / "run"
    config = tiny_config(num_epochs=1, learning_rate=1e-3, steps_per_epoch=4)
    train_and_evaluate(config, run)
    best_step = int(next((run / "best").iterdir()).name)
    log = (run / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]

    # checkpoints/ gone: the run resumes from best/ and nothing of it is replaced.
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)
    shutil.rmtree(kept / "checkpoints")
    assert checkpointing.RunCheckpoints(kept, 2).resume_dir == (kept / "best").absolute()
    train_and_evaluate(config, kept)
    assert [p.name for p in (kept / "best").iterdir()] == [str(best_step)]
    assert (kept / "metrics.jsonl").read_text() == log

    # The latest checkpoint's arrays gone: named, with the one to resume from instead.
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    for data in (damaged / "checkpoints" / "4" / "state").rglob("d"):
        shutil.rmtree(data)
    with pytest.raises(UserError) as raised:
        train_and_evaluate(config, damaged)
    message = str(raised.value)
    assert message.startswith(f"{(damaged / 'checkpoints' / '4').absolute()}: cannot read this "
                              "checkpoint (") and "\n" not in message and "tensorstore_spec" not in message
    assert message.endswith(f"it is damaged or incomplete: move it out of "
                            f"{(damaged / 'checkpoints').absolute()} and rerun to resume from step 2")

    # Prediction and evaluation read best/: its progress record gone, then its arrays.
    (damaged / "best" / str(best_step) / "meta" / "metadata").unlink()
    for read in (checkpointing.stored_config, checkpointing.restore_for_inference):
        with pytest.raises(UserError, match=rf"^{damaged.absolute() / 'best' / str(best_step)}: "
                                            r"cannot read this checkpoint \(.*metadata.*\); it is "
                                            rf"damaged or incomplete; another one: "
                                            rf"{damaged.absolute() / 'checkpoints' / '4'}$"):
            read(damaged)
    from PIL import Image
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "images" / "a.jpg")
    result = cli("mlnet_jax.predict", "--checkpoint", damaged, "--input", tmp_path / "images",
                 "--output", tmp_path / "maps")
    one_line_error(result, f"{damaged.absolute() / 'best' / str(best_step)}: cannot read this "
                           "checkpoint")


@pytest.mark.timeout(600)
def test_a_resume_from_an_earlier_checkpoint_scores_and_names_the_best_on_disk(tmp_path, capsys):
    """With the last checkpoint moved away (the remedy for a damaged one), the resumed run's
    record said best step 3 while best/ held step 6 of the abandoned continuation:
    final_metrics.json scored step 6's weights under step 3's name. A resume with nothing left
    to train (num_epochs lowered, or early stopping reached) finished silently."""
    import json
    import shutil

    from mlnet_jax.train import train_and_evaluate
    run = tmp_path / "run"
    config = tiny_config(num_epochs=2, learning_rate=1e-3)
    first = train_and_evaluate(config, run)
    assert [p.name for p in (run / "best").iterdir()] == ["6"] and first["checkpoint_step"] == 6
    replay = tmp_path / "replay"
    shutil.copytree(run, replay)
    shutil.move(run / "checkpoints" / "6", tmp_path / "set_aside")
    capsys.readouterr()
    train_and_evaluate(tiny_config(num_epochs=1, learning_rate=1e-3), run)
    assert ("the run is at step 4, and config.num_epochs 1 × 3 steps ends at 3: nothing more is "
            "trained; a larger num_epochs continues the run") in capsys.readouterr().out
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["checkpoint_step"] == 6 and final["step"] == 4
    assert final["loss"] == pytest.approx(first["loss"], rel=1e-6)  # step 6's weights, named so

    # The same resume replaying to the end is the uninterrupted run: best/ (step 6, from
    # after the checkpoint) is not taken as the record, or the replayed step 6 would tie it
    # and count as an epoch without improvement.
    shutil.rmtree(replay / "checkpoints" / "6")
    again = train_and_evaluate(config, replay)
    assert again["checkpoint_step"] == 6 and again["loss"] == pytest.approx(first["loss"], rel=1e-6)
    from test_train import latest_state
    assert latest_state(replay)[0] == 6
    meta = json.loads((replay / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["best_step"] == 6 and meta["epochs_without_improvement"] == 0

    # best/ deleted before a resume whose epochs do not beat it: the latest checkpoint is what
    # is scored, and it is named so (it was called "best", with the latest's step).
    gone = tmp_path / "gone"
    train_and_evaluate(tiny_config(num_epochs=2, learning_rate=0.0), gone)  # epoch 1 the best
    shutil.rmtree(gone / "best")
    capsys.readouterr()
    final = train_and_evaluate(tiny_config(num_epochs=3, learning_rate=0.0), gone)
    assert (final["checkpoint"], final["checkpoint_step"], final["step"]) == ("last", 9, 9)
    assert (f"{gone / 'best'} holds no checkpoint: the held-out split is scored with the "
            "latest (step 9)") in capsys.readouterr().out

    # Early stopping reached on resume (a lower patience): said, not a silent run of no steps.
    stopped = tmp_path / "stopped"
    train_and_evaluate(tiny_config(num_epochs=3, learning_rate=0.0), stopped)  # no better epoch
    capsys.readouterr()
    resumed = train_and_evaluate(tiny_config(num_epochs=5, learning_rate=0.0,
                                             early_stopping_patience=1, steps_per_epoch=4),
                                 stopped, override_config=True)
    out = capsys.readouterr().out
    assert ("early stopping: 2 epochs without a better validation loss (early_stopping_patience "
            "1; the best is step 3): nothing more is trained") in out
    assert ("warning: config.steps_per_epoch 3 → 4: epochs are counted from step 0 with 4 steps "
            "each, so this one ends at step 12") in out
    assert resumed["step"] == 9


def test_a_read_that_fails_for_another_reason_than_the_files_is_not_called_damaged(tmp_path,
                                                                                   monkeypatch):
    """Every error reading a checkpoint was 'damaged or incomplete: move it out', an intact
    one running out of memory too."""
    import numpy as np
    import orbax.checkpoint as ocp

    from mlnet_jax.checkpointing import RunCheckpoints
    checkpoints = RunCheckpoints(tmp_path, 2)
    checkpoints.save(2, {"w": np.zeros(3, np.float32)}, {}, {"best_step": None})

    def exhausted(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64 bytes.")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", exhausted)
    with pytest.raises(ValueError, match="^RESOURCE_EXHAUSTED"):
        checkpoints.read_meta()
    checkpoints.close()


def test_what_trains_but_not_as_one_may_think_is_said(tmp_path, capsys):
    """A split smaller than one batch with an explicit steps_per_epoch trained on batches that
    repeat images (refused without it); a steps_per_epoch changed with --override_config
    renumbered the epochs silently."""
    from mlnet_jax.train import steps_per_epoch
    assert steps_per_epoch(tiny_config(steps_per_epoch=3), 3) == 3
    assert ("warning: the training split has 3 records, fewer than one global batch (4): every "
            "batch repeats images") in capsys.readouterr().out
    with pytest.raises(UserError, match="fewer than one global batch"):
        steps_per_epoch(tiny_config(steps_per_epoch=-1), 3)
    assert steps_per_epoch(tiny_config(steps_per_epoch=3), 8) == 3
    assert "warning" not in capsys.readouterr().out
    # -1 is "N // global_batch_size steps" (mlnet_jax/configs/default.py); the evaluation's
    # batch size in its place would make an epoch 10 // 3 = 3 steps, not 10 // 4 = 2.
    config = tiny_config(steps_per_epoch=-1, global_batch_size=4, eval_batch_size=3)
    assert steps_per_epoch(config, 10) == 10 // config.global_batch_size


def test_sigterm_is_raised_like_ctrl_c_and_every_command_says_it_in_one_line(tmp_path,
                                                                               monkeypatch, capsys):
    """SIGTERM killed evaluate, convert_weights and prepare where they stood (their temporary
    files left, prepare --overwrite's old dataset set aside); Ctrl-C in evaluate and
    convert_weights was a KeyboardInterrupt traceback."""
    import os
    import signal

    from mlnet_jax import convert_weights, evaluate
    from mlnet_jax.interrupts import Terminated, sigterm_raises
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # put back

    for error, status, word in ((KeyboardInterrupt(), 130, "interrupted"),
                                (Terminated(), 143, "terminated")):
        def stop(*args, **kwargs):
            raise error

        monkeypatch.setattr(convert_weights, "convert", stop)
        assert convert_weights.main([str(tmp_path / "a.pth"), str(tmp_path / "b.npz")]) == status
        assert capsys.readouterr().err == (f"{word}; the destination is as it was (nothing "
                                           "half-written)\n")
        monkeypatch.setattr(evaluate, "evaluate", stop)
        assert evaluate.main(["evaluate", "--baseline=centre"]) == status
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"{word}; what was written is complete, none of it half-written")
