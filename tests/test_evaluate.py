"""``python -m mlnet_jax.evaluate``: JSON/CSV/table on a prepared fake SALICON, every checkpoint
form, the baselines, one-line errors, and a briefly trained demo model beating the centre bias
on the demo data; plus the shared scoring loop in-process (NaN handling, sAUC negatives,
numpy vs jax metric backends)."""

import csv
import errno
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
DEMO_CONFIG = ROOT / "configs" / "demo.py"
SALICON_CONFIG = ROOT / "configs" / "salicon.py"
METRICS = ("cc", "kld", "nss", "sim", "auc_judd", "auc_borji", "auc_shuffled")
# The demo config, cut to ~45 s of training on a 2-core CPU (CC ≈ 0.92 on its validation).
SHORT_DEMO = ("--config.num_epochs=1", "--config.steps_per_epoch=20",
              "--config.global_batch_size=8", "--config.synthetic_train_size=160",
              "--config.synthetic_eval_size=16", "--config.compilation_cache_dir=")


def run(*args, cwd=ROOT, check=True, timeout=300, env=None):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def evaluate_cli(*args, **kwargs):
    return run("-m", "mlnet_jax.evaluate", "--noprogress", *args, **kwargs)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    run("-m", "mlnet_jax.train", f"--config={DEMO_CONFIG}", f"--workdir={workdir}", *SHORT_DEMO,
        timeout=480)
    return workdir


@pytest.fixture(scope="module")
def salicon(tmp_path_factory):
    from fake_datasets import prepared_salicon
    return prepared_salicon(tmp_path_factory.mktemp("salicon"),
                            counts={"train": 2, "validation": 6, "test": 0})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_outputs(json_path, num_images, with_loss):
    """JSON has every metric with finite mean/std and n; the CSV's column means equal them."""
    summary = json.loads(Path(json_path).read_text())
    assert summary["num_images"] == num_images
    assert set(summary["metrics"]) == set(METRICS)
    rows = read_csv(Path(json_path).with_suffix(".csv"))
    assert summary["per_image_csv"] == Path(json_path).with_suffix(".csv").name
    assert len(rows) == num_images and len({r["file_name"] for r in rows}) == num_images
    for name in METRICS:
        stats = summary["metrics"][name]
        assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"]), name
        values = np.asarray([float(r[name]) for r in rows])
        finite = values[np.isfinite(values)]
        assert stats["n"] == finite.size
        assert stats["mean"] == pytest.approx(finite.mean(), rel=1e-9, abs=1e-12), name
        assert stats["std"] == pytest.approx(finite.std(), rel=1e-6, abs=1e-9), name
    assert (summary["loss"] is not None) == with_loss
    if with_loss:
        losses = np.asarray([float(r["loss"]) for r in rows])
        assert summary["loss"]["mean"] == pytest.approx(losses.mean(), rel=1e-6)
    return summary


def check_table(stdout, num_images):
    lines = stdout.splitlines()
    assert any(line.split()[:4] == ["metric", "mean", "std", "n"] for line in lines), stdout
    for label in ("CC", "KLD", "NSS", "SIM", "AUC-Judd", "AUC-Borji", "sAUC"):
        row = next(line for line in lines if line.split()[:1] == [label])
        assert row.split()[-1] == str(num_images), row
    assert f"{num_images} images" in stdout


@pytest.mark.timeout(600)
def test_evaluate_a_checkpoint_on_a_prepared_salicon(demo_run, salicon, tmp_path):
    """Workdir, checkpoint directory and converted .npz give the same scores; outputs agree."""
    data = f"--config.data_dir={salicon}"
    out = evaluate_cli("--checkpoint", demo_run, "--config", SALICON_CONFIG, data,
                       "--output", tmp_path / "workdir.json")
    check_table(out.stdout, 6)
    by_workdir = check_outputs(tmp_path / "workdir.json", 6, with_loss=True)
    assert by_workdir["split"] == "validation" and by_workdir["dataset"] == "salicon2015"
    assert by_workdir["checkpoint_resolved"].endswith("best/20")
    assert by_workdir["model"]["input_size"] == [96, 128]

    # One checkpoint directory: default output in its workdir, named after it.
    step_dir = demo_run / "checkpoints" / "20"
    evaluate_cli("--checkpoint", step_dir, "--config", SALICON_CONFIG, data)
    by_step = check_outputs(demo_run / "eval_salicon2015_validation_checkpoints20.json", 6, with_loss=True)

    # A full-model .npz (what convert_weights writes): default output beside it.
    from mlnet_jax.checkpointing import restore_for_inference
    from mlnet_jax.weights_file import save_weights
    params, metadata = restore_for_inference(demo_run)
    save_weights(tmp_path / "model.npz", params, metadata)
    evaluate_cli("--checkpoint", tmp_path / "model.npz", "--config", SALICON_CONFIG, data)
    by_npz = check_outputs(tmp_path / "model_eval_salicon2015_validation.json", 6, with_loss=True)
    for name in METRICS:  # best and latest are both step 20 here
        assert by_step["metrics"][name] == pytest.approx(by_workdir["metrics"][name], rel=1e-5)
        assert by_npz["metrics"][name] == pytest.approx(by_workdir["metrics"][name], rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("baseline", ["centre", "spectral_residual"])
def test_baselines_need_no_checkpoint(salicon, tmp_path, baseline):
    out = evaluate_cli("--baseline", baseline, "--config", SALICON_CONFIG,
                       f"--config.data_dir={salicon}", cwd=tmp_path)
    check_table(out.stdout, 6)
    summary = check_outputs(tmp_path / f"eval_salicon2015_validation_{baseline}.json", 6,
                            with_loss=False)
    assert summary["baseline"] == baseline and summary["checkpoint"] is None


@pytest.mark.timeout(600)
def test_trained_demo_model_beats_the_centre_bias_on_the_demo_data(demo_run, tmp_path):
    args = ("--config", DEMO_CONFIG, "--config.synthetic_eval_size=16")
    out = evaluate_cli("--checkpoint", demo_run, *args)
    check_table(out.stdout, 16)
    model = check_outputs(demo_run / "eval_synthetic_validation.json", 16, with_loss=True)["metrics"]
    evaluate_cli("--baseline", "centre", "--output", tmp_path / "centre.json", *args)
    centre = check_outputs(tmp_path / "centre.json", 16, with_loss=False)["metrics"]
    # Training's own evaluation of the same split and checkpoint agrees on the shared metrics.
    final = json.loads((demo_run / "final_metrics.json").read_text())
    for name in ("cc", "kld", "nss", "sim"):
        assert model[name]["mean"] == pytest.approx(final[name], rel=1e-4), name
        assert centre[name]["mean"] == pytest.approx(final[f"centre_bias_{name}"], rel=1e-4)
    assert model["cc"]["mean"] > centre["cc"]["mean"] + 0.3
    assert model["kld"]["mean"] < centre["kld"]["mean"]
    for name in ("nss", "sim", "auc_judd", "auc_borji", "auc_shuffled"):
        assert model[name]["mean"] > centre[name]["mean"], name


@pytest.mark.timeout(300)
def test_errors_are_one_line_with_exit_code_2(salicon, tmp_path):
    cases = {
        "not prepared": ("--baseline", "centre", "--config", SALICON_CONFIG,
                         f"--config.data_dir={tmp_path / 'empty'}"),
        "no such file": ("--checkpoint", tmp_path / "missing", "--config", SALICON_CONFIG,
                         f"--config.data_dir={salicon}"),
        "--checkpoint": ("--config", SALICON_CONFIG, f"--config.data_dir={salicon}"),
        "is a folder; name the JSON file": ("--baseline", "centre", "--config", SALICON_CONFIG,
                                            f"--config.data_dir={salicon}", "--output", tmp_path),
        "cannot write there": ("--baseline", "centre", "--config", SALICON_CONFIG,
                               f"--config.data_dir={salicon}", "--output",
                               tmp_path / "a_file" / "eval.json"),
        "config.eval_batch_size must be at least 1, got 0": (
            "--baseline", "centre", "--config", SALICON_CONFIG, f"--config.data_dir={salicon}",
            "--config.eval_batch_size=0"),
        "the per-image CSV beside it": ("--baseline", "centre", "--config", SALICON_CONFIG,
                                        f"--config.data_dir={salicon}", "--output",
                                        tmp_path / "res.json"),
    }
    if Path("/proc/self").is_dir():  # writable by permissions, yet no file can be made there
        cases["cannot write there (No such file or directory in /proc)"] = (
            "--baseline", "centre", "--config", SALICON_CONFIG, f"--config.data_dir={salicon}",
            "--output", "/proc/eval.json")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "res.csv").mkdir()
    for expected, args in cases.items():
        result = evaluate_cli(*args, check=False, cwd=tmp_path)
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
            result.stderr
        assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------- in-process

def _synthetic_records(n, size=(24, 32)):
    from mlnet_jax.datasets.synthetic import synthetic_dataset
    return synthetic_dataset("validation", n, size, seed=3)


def test_images_without_fixations_are_nan_and_excluded_from_means():
    from mlnet_jax.evaluation import score_split
    records = _synthetic_records(5)
    records[1] = dict(records[1], fixations=np.zeros((0, 2), np.int32))
    scores = score_split(records, model_size=(32, 32), batch_size=2,
                         baselines={"": "centre"}, metric_names=METRICS, backend="numpy")
    assert scores.num_images == 5 and [r["index"] for r in scores.rows] == list(range(5))
    row = scores.rows[1]
    assert row["num_fixations"] == 0
    for name in ("nss", "auc_judd", "auc_borji", "auc_shuffled"):
        assert math.isnan(row[name]) and scores.summary[name]["n"] == 4
        assert scores.summary[name]["mean"] == pytest.approx(
            np.mean([r[name] for i, r in enumerate(scores.rows) if i != 1]))
    for name in ("cc", "kld", "sim"):
        assert math.isfinite(row[name]) and scores.summary[name]["n"] == 5
    # The per-image seeds make the random metrics independent of the batch size.
    again = score_split(records, model_size=(32, 32), batch_size=3, baselines={"": "centre"},
                        metric_names=METRICS, backend="numpy", max_images=4)
    assert again.num_images == 4
    for a, b in zip(again.rows, scores.rows):
        for name in METRICS:
            np.testing.assert_equal(a[name], b[name])


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_images_without_a_saliency_map_are_nan_for_the_continuous_metrics(backend):
    # A missing map is not an all-zero one (finite KLD and SIM, counted in the means): both
    # backends give NaN and leave the image out of the means.
    from mlnet_jax.evaluation import FAST_METRICS, score_split
    records = _synthetic_records(4)
    records[2] = dict(records[2], saliency_map=b"")
    kwargs = dict(model_size=(32, 32), batch_size=4, baselines={"": "centre"},
                  metric_names=FAST_METRICS)
    scores = score_split(records, backend=backend, **kwargs)
    with_truth = [i for i in range(4) if i != 2]
    reference = score_split([records[i] for i in with_truth], backend="numpy", **kwargs)
    assert scores.num_images == 4
    for name in ("cc", "kld", "sim"):
        assert math.isnan(scores.rows[2][name]), name
        assert scores.summary[name]["n"] == 3, name
        for i, ref in zip(with_truth, reference.rows):
            assert scores.rows[i][name] == pytest.approx(ref[name], rel=1e-4, abs=1e-5), name
        assert scores.summary[name]["mean"] == pytest.approx(
            np.mean([r[name] for r in reference.rows]), rel=1e-4), name
    # NSS needs only the fixations, which the image still has.
    assert math.isfinite(scores.rows[2]["nss"]) and scores.summary["nss"]["n"] == 4


def test_an_image_without_a_saliency_map_has_no_loss():
    """The model's loss needs the ground-truth map: an image without one (fixations only) has
    a NaN loss, left out of the mean and of n. Kept, the loss of its empty target would be
    averaged into the split's validation loss."""
    from mlnet_jax.evaluation import score_split
    records = _synthetic_records(4)
    records[2] = dict(records[2], saliency_map=b"")
    losses = np.asarray([0.1, 0.2, 0.3, 0.4], np.float32)  # the predictor's, per image

    def predict(batch):
        n = len(batch["image"])
        return {"pred": np.ones((n, 4, 4), np.float32), "loss": losses[:n]}

    scores = score_split(records, model_size=(32, 32), batch_size=4, predict=predict,
                         backend="numpy")
    assert math.isnan(scores.rows[2]["loss"])
    assert [r["loss"] for i, r in enumerate(scores.rows) if i != 2] == pytest.approx(
        [float(losses[i]) for i in (0, 1, 3)])
    assert scores.summary["loss"]["n"] == len(records) - 1
    assert scores.summary["loss"]["mean"] == pytest.approx(np.mean(losses[[0, 1, 3]]))


def test_a_split_without_ground_truth_is_refused_before_anything_is_predicted(monkeypatch,
                                                                              tmp_path):
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    from mlnet_jax.errors import UserError
    from mlnet_jax.input_pipeline import RecordSource

    records = [dict(r, saliency_map=b"", fixations=np.zeros((0, 2), np.int32))
               for r in _synthetic_records(4)]

    def must_not_score(*args, **kwargs):
        raise AssertionError("the split was scored before its ground truth was checked")

    monkeypatch.setattr(evaluate_module, "split_source",
                        lambda config, split: RecordSource(records, "no truth"))
    monkeypatch.setattr(evaluate_module, "score_split", must_not_score)
    with pytest.raises(UserError, match="has no ground truth"):
        evaluate_module.evaluate(get_config(), baseline="centre", split="test",
                                 output=str(tmp_path / "e.json"), progress=False)
    # One image with fixations is enough to score the split.
    records[3] = dict(records[3], fixations=np.array([[1, 2]], np.int32))
    with pytest.raises(AssertionError, match="was scored"):
        evaluate_module.evaluate(get_config(), baseline="centre", split="test",
                                 output=str(tmp_path / "e.json"), progress=False)


def test_a_failed_write_after_scoring_still_shows_the_scores(monkeypatch, tmp_path, capsys):
    """The output checked writable at the start can still fail at the end (a full disk): the
    means are printed first, then one line says they were not saved."""
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    from mlnet_jax.errors import UserError
    from mlnet_jax.input_pipeline import RecordSource

    records = _synthetic_records(3)
    monkeypatch.setattr(evaluate_module, "split_source",
                        lambda config, split: RecordSource(records, "synthetic"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_module, "write_outputs", disk_full)
    with pytest.raises(UserError, match=r"e\.json: cannot write it \(No space left on device\); "
                                        "the means above were not saved"):
        evaluate_module.evaluate(get_config(), baseline="centre", split="validation",
                                 output=str(tmp_path / "e.json"), progress=False)
    table = capsys.readouterr().out
    assert "baseline centre on" in table and "3 images" in table and "CC" in table, table


def test_an_output_that_is_not_an_earlier_evaluation_is_not_replaced(monkeypatch, tmp_path,
                                                                     capsys):
    """--output run/metrics.jsonl replaced the training log (and wrote metrics.csv beside it)
    with exit status 0; a rerun still replaces its own earlier outputs."""
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    from mlnet_jax.errors import UserError
    from mlnet_jax.input_pipeline import RecordSource

    monkeypatch.setattr(evaluate_module, "split_source",
                        lambda config, split: RecordSource(_synthetic_records(3), "synthetic"))

    def run(output):
        return evaluate_module.evaluate(get_config(), baseline="centre", split="validation",
                                        output=str(output), progress=False)

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(UserError, match=rf"^--output {log}: {log} exists and is not an earlier "
                                        "output of evaluate; name another file"):
        run(log)
    notes = tmp_path / "e.csv"
    notes.write_text("my,own,table\n")
    with pytest.raises(UserError, match=rf"^--output {tmp_path / 'e.json'}: {notes} exists"):
        run(tmp_path / "e.json")
    assert log.read_text() == '{"step": 1, "loss": 0.5}\n' and not (tmp_path / "metrics.csv").exists()
    assert notes.read_text() == "my,own,table\n"
    notes.unlink()
    (tmp_path / "e.json").touch()  # an empty placeholder (mktemp) is replaced
    run(tmp_path / "e.json")
    first = (tmp_path / "e.json").read_text()
    assert "\"centre\"" in first
    (tmp_path / "e.json").write_text(first.replace('"centre"', '"an older run"'))
    run(tmp_path / "e.json")  # its own outputs: replaced
    assert (tmp_path / "e.json").read_text() == first


def test_the_split_asked_for_is_scored_not_the_configs(tmp_path):
    # evaluate(split="train") (the command's --split) scores that split, not config.eval_split.
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    from mlnet_jax.datasets.synthetic import synthetic_dataset
    config = get_config()
    config.input_size = (24, 32)
    config.synthetic_train_size, config.synthetic_eval_size = 3, 2
    assert config.eval_split != "train"
    summary = evaluate_module.evaluate(config, baseline="centre", split="train",
                                       output=str(tmp_path / "e.json"), progress=False)
    assert summary["split"] == "train" and summary["num_images"] == 3
    train = synthetic_dataset("train", 3, (24, 32), config.seed)
    assert [r["file_name"] for r in read_csv(tmp_path / "e.csv")] == [
        r["file_name"] for r in train]


def test_evaluate_scores_with_the_seed_and_sauc_others_it_is_given(monkeypatch, tmp_path):
    """evaluate(seed=1, sauc_others=2) (the command's --seed, --sauc_others) scores as
    score_split does with them; dropped on the way, the random metrics would be those of
    seed 0 and 10 other images, whatever was asked for (and the JSON would say otherwise)."""
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    from mlnet_jax.evaluation import ALL_METRICS, score_split
    from mlnet_jax.input_pipeline import RecordSource

    records = _synthetic_records(6)
    monkeypatch.setattr(evaluate_module, "split_source",
                        lambda config, split: RecordSource(records, "synthetic"))
    config = get_config()
    config.input_size = (24, 32)
    summary = evaluate_module.evaluate(config, baseline="centre", split="validation",
                                       output=str(tmp_path / "e.json"), progress=False,
                                       metrics_backend="numpy", seed=1, sauc_others=2)
    assert (summary["seed"], summary["sauc_other_images"]) == (1, 2)

    def means(**kwargs):
        scores = score_split(records, model_size=(24, 32), batch_size=config.eval_batch_size,
                             baselines={"": "centre"}, metric_names=ALL_METRICS,
                             backend="numpy", **kwargs)
        return {name: scores.summary[name]["mean"] for name in ("auc_borji", "auc_shuffled")}

    asked = means(seed=1, sauc_others=2)
    got = {name: summary["metrics"][name]["mean"] for name in asked}
    assert got == pytest.approx(asked, rel=1e-12)
    assert got["auc_borji"] != pytest.approx(means(seed=0, sauc_others=2)["auc_borji"], rel=1e-6)
    assert got["auc_shuffled"] != pytest.approx(means(seed=1, sauc_others=10)["auc_shuffled"],
                                                rel=1e-6)


def test_the_prediction_grid_shows_image_truth_and_prediction_in_that_order(tmp_path):
    # Columns are the image, its ground truth, then the prediction (swapped, the figure would
    # show the model's map as the truth).
    import matplotlib
    from PIL import Image

    from mlnet_jax.reporting import save_prediction_grid
    cell = 16
    image = np.zeros((8, 8, 3), np.uint8)
    image[:] = (10, 200, 30)
    save_prediction_grid(tmp_path / "grid.png", [image], [np.zeros((8, 8), np.float32)],
                         [np.ones((8, 8), np.float32)], cell=cell)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape == (cell, 3 * cell, 3)
    jet = matplotlib.colormaps["jet"]
    for column, want in enumerate([image[0, 0],
                                   np.round(np.asarray(jet(0.0)[:3]) * 255),    # truth: zeros
                                   np.round(np.asarray(jet(1.0)[:3]) * 255)]):  # prediction: ones
        np.testing.assert_array_equal(grid[cell // 2, column * cell + cell // 2], want,
                                      err_msg=f"column {column}")


def test_sauc_negatives_are_other_images_fixations_scaled_to_this_image():
    from mlnet_jax.evaluation import FixationTable
    records = [{"image": b"", "fixations": np.asarray([[i, 2 * i]]), "image_size": (10, 20),
                "file_name": f"{i}", "saliency_map": b""} for i in range(6)]
    records[2] = dict(records[2], fixations=np.zeros((0, 2), np.int32))
    records[5] = dict(records[5], fixations=np.asarray([[2, 3]]), image_size=(5, 10))
    table = FixationTable(records)
    others = table.others(0, n_others=3, seed=7)
    assert len(others) == 3 and 0 not in others and 2 not in others
    np.testing.assert_array_equal(others, table.others(0, n_others=3, seed=7))  # fixed
    assert sorted(table.others(0, n_others=10, seed=7)) == [1, 3, 4, 5]  # all there are
    m = table.other_fixation_map(0, (10, 20), n_others=10, seed=7)
    # Image 5's (2, 3) of 5×10 lands on ((2 + ½)·2, (3 + ½)·2) = (5, 7) of 10×20.
    assert sorted(zip(*np.nonzero(m))) == [(1, 2), (3, 6), (4, 8), (5, 7)]
    m = table.other_fixation_map(5, (5, 10), n_others=10, seed=7)  # from 10×20 to 5×10
    assert sorted(zip(*np.nonzero(m))) == [(0, 0), (0, 1), (1, 3), (2, 4)]


def test_each_image_draws_its_own_sauc_others_with_the_documented_generator():
    """README: up to N other images with fixations, "drawn without replacement with
    default_rng([seed, image index])". One generator for every image (default_rng(seed))
    would give each image the same draw from its pool, not an independent one per image."""
    from mlnet_jax.evaluation import FixationTable
    n, k, seed = 20, 3, 7
    records = [{"image": b"", "fixations": np.asarray([[i % 10, i % 20]]), "image_size": (10, 20),
                "file_name": f"{i}", "saliency_map": b""} for i in range(n)]
    records[4] = dict(records[4], fixations=np.zeros((0, 2), np.int32))  # never drawn
    table = FixationTable(records)
    draws = []
    for index in (0, 1):
        pool = [j for j in range(n) if j != index and len(records[j]["fixations"])]
        want = np.random.default_rng([seed, index]).choice(pool, size=k, replace=False)
        got = table.others(index, n_others=k, seed=seed)
        assert sorted(got) == sorted(want), index
        draws.append(sorted(got))
    assert draws[0] != draws[1]


def test_numpy_and_jax_metric_backends_agree():
    """Deterministic metrics to float32 precision, with images of two sizes in one batch; the
    random ones in distribution (close on average). Compiling every batched metric takes
    seconds per image size on a CPU, so those run on one size."""
    from mlnet_jax.evaluation import FAST_METRICS, score_split
    mixed = _synthetic_records(4) + _synthetic_records(3, size=(32, 24))
    for records, names in ((mixed, FAST_METRICS), (mixed[:4], METRICS)):
        kwargs = dict(model_size=(32, 32), batch_size=7, baselines={"": "spectral_residual"},
                      metric_names=names)
        a = score_split(records, backend="numpy", **kwargs)
        b = score_split(records, backend="jax", **kwargs)
        assert [r["file_name"] for r in a.rows] == [r["file_name"] for r in b.rows]
        for ra, rb in zip(a.rows, b.rows):
            for name in FAST_METRICS:
                assert rb[name] == pytest.approx(ra[name], rel=1e-4, abs=1e-5), name
    for ra, rb in zip(a.rows, b.rows):
        assert rb["auc_judd"] == pytest.approx(ra["auc_judd"], abs=0.02)
    for name in ("auc_borji", "auc_shuffled"):
        assert b.summary[name]["mean"] == pytest.approx(a.summary[name]["mean"], abs=0.05)
    # Each image draws from its own key: the batch (and so the device count, which rounds it
    # up) does not change the random metrics.
    again = score_split(mixed[:4], backend="jax", **dict(kwargs, batch_size=3))
    for rb, rc in zip(b.rows, again.rows):
        for name in ("auc_judd", "auc_borji", "auc_shuffled"):
            assert rc[name] == pytest.approx(rb[name], rel=1e-6), name


@pytest.mark.timeout(300)
def test_without_config_the_checkpoints_training_config_is_used(salicon, tmp_path):
    """A model trained on SALICON is scored on SALICON when --config is left out; overrides
    such as --config.eval_max_images still apply."""
    workdir = tmp_path / "run"
    run("-m", "mlnet_jax.train", f"--config={TESTS / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
        "--config.dataset=salicon2015", f"--config.data_dir={salicon}", "--config.num_epochs=1",
        "--config.steps_per_epoch=1", "--config.global_batch_size=2")
    import os
    # '--checkpoint=~/run' (no shell expansion in that form) finds the same training config.
    out = evaluate_cli("--checkpoint=~/run", "--config.eval_max_images=4",
                       "--output", tmp_path / "eval.json", env=dict(os.environ, HOME=str(tmp_path)))
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["dataset"] == "salicon2015" and summary["num_images"] == 4
    assert "salicon2015/validation: 4 images" in out.stdout
    assert summary["config_file"] == f"the config stored with {workdir}"  # not the demo's file
    # --help lists --config (it is defined in mlnet_jax.cli, not in the command's module).
    assert "--config: Configuration file" in evaluate_cli("--help", check=False).stdout


def test_the_commands_split_seed_and_sauc_others_reach_evaluate(tmp_path):
    """``main([... --split=train --seed=1 --sauc_others=2])`` scores as evaluate() does with
    them; a flag not passed on would score config.eval_split, seed 0 or 10 other images (and
    the JSON would say so)."""
    from mlnet_jax import evaluate as evaluate_module
    from mlnet_jax.configs.demo import get_config
    sizes = ("--config.input_size=24,32", "--config.synthetic_train_size=5",
             "--config.synthetic_eval_size=2", "--config.compilation_cache_dir=")
    assert evaluate_module.main(
        ["evaluate", "--noprogress", "--baseline=centre", f"--config={DEMO_CONFIG}", *sizes,
         "--split=train", "--seed=1", "--sauc_others=2", "--metrics_backend=numpy",
         f"--output={tmp_path / 'cli.json'}"]) == 0
    got = json.loads((tmp_path / "cli.json").read_text())
    config = get_config()
    config.input_size, config.synthetic_train_size, config.synthetic_eval_size = (24, 32), 5, 2
    config.compilation_cache_dir = ""
    assert config.eval_split != "train"
    want = evaluate_module.evaluate(config, baseline="centre", split="train", seed=1,
                                    sauc_others=2, metrics_backend="numpy",
                                    output=str(tmp_path / "direct.json"), progress=False)
    assert (got["split"], got["seed"], got["sauc_other_images"]) == ("train", 1, 2)
    assert got["num_images"] == config.synthetic_train_size
    for name, stats in want["metrics"].items():
        assert got["metrics"][name]["mean"] == pytest.approx(stats["mean"], rel=1e-12), name
