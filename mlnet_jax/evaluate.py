"""Benchmark a model (or a baseline) on a split: ``python -m mlnet_jax.evaluate``.

    python -m mlnet_jax.evaluate --checkpoint DIR --config configs/X.py [--split validation]
        [--output FILE] [--baseline centre|spectral_residual] [--config.key=value ...]

``--checkpoint`` is a training workdir (its best, else latest, checkpoint), one checkpoint
directory, or a converted full-model ``.npz``. The config names the data (``dataset``,
``data_dir``; ``synthetic`` regenerates the demo's data from ``seed`` and
``synthetic_*_size``), the batch (``eval_batch_size``, per process, rounded up to the devices)
and ``eval_max_images``; the model's own input size and preprocessing come from the
checkpoint. With ``--baseline`` no checkpoint is needed: the baseline map is scored instead.

Every image is predicted in batches on all local devices, its map resized back to the image's
size and scored with CC, KLD, NSS, SIM, AUC-Judd, AUC-Borji and sAUC
(:mod:`mlnet_jax.evaluation`). Prints a table (mean, std, n per metric), writes a JSON summary
and, beside it, a CSV with one row per image. Default output, with ``D = <dataset>_<split>``:
``<workdir>/eval_D.json`` for a workdir; ``<workdir>/eval_D_<best|checkpoints><step>.json``
for a checkpoint directory of a workdir (``<parent>/eval_D_<name>.json`` for another
directory); ``<dir>/<stem>_eval_D.json`` beside an ``.npz``; with ``--baseline``,
``_<baseline>`` is appended, and without a checkpoint it is ``./eval_D_<baseline>.json``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
from pathlib import Path

import jax

from mlnet_jax.cli import run_absl
from mlnet_jax.errors import UserError
from mlnet_jax.evaluation import (ALL_METRICS, BACKENDS, SAUC_OTHER_IMAGES, check_data_fields,
                                  per_process_batch, require_ground_truth, resolve_backend,
                                  score_split)

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.py"
METRIC_LABELS = {"cc": "CC", "kld": "KLD", "nss": "NSS", "sim": "SIM", "auc_judd": "AUC-Judd",
                 "auc_borji": "AUC-Borji", "auc_shuffled": "sAUC"}
#: Lower is better for these; higher for the others.
LOWER_IS_BETTER = frozenset({"kld"})


# --------------------------------------------------------------------------- inputs

def split_source(config, split: str):
    """The records of ``split`` for ``config.dataset``: a prepared TFDS dataset, or the
    demo's synthetic data generated as :func:`mlnet_jax.train.make_sources` does (same seed
    and sizes, so ``validation`` is exactly the split training evaluated on)."""
    from mlnet_jax.input_pipeline import RecordSource, open_source  # noqa: PLC0415
    if config.dataset == "synthetic":
        from mlnet_jax.datasets.synthetic import SPLIT_SEEDS, synthetic_dataset  # noqa: PLC0415
        if split not in SPLIT_SEEDS:
            raise UserError(f"the synthetic dataset has splits {', '.join(SPLIT_SEEDS)}, "
                            f"not {split!r}")
        n = config.synthetic_train_size if split == "train" else config.synthetic_eval_size
        if n < 1:
            field = "synthetic_train_size" if split == "train" else "synthetic_eval_size"
            raise UserError(f"config.{field} is {n}: no synthetic {split} images to evaluate")
        return RecordSource(synthetic_dataset(split, n, tuple(config.input_size), config.seed),
                            f"synthetic {split}")
    return open_source(config.dataset, split, config.data_dir or None)


def load_checkpoint(path: str):
    """(model, variables, info, resolved path) from a workdir, checkpoint dir or ``.npz``."""
    from mlnet_jax.inference import load_model  # noqa: PLC0415
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--checkpoint {path}: no such file or directory")
    try:
        model, variables, info = load_model(p)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 — Orbax/NumPy errors on a damaged checkpoint
        raise UserError(f"--checkpoint {path}: cannot load a model from it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from e
    resolved = p
    if p.is_dir():
        from mlnet_jax.checkpointing import _step_dir_for  # noqa: PLC0415
        resolved = _step_dir_for(p.absolute())
    return model, variables, info, resolved


def default_output(checkpoint: str, dataset: str, split: str, baseline: str | None) -> Path:
    """Where the JSON goes without ``--output`` (see the module docstring)."""
    from mlnet_jax.checkpointing import BEST_DIR, LATEST_DIR  # noqa: PLC0415
    # The dataset is in every name: one model scored on SALICON, MIT1003 and CAT2000 keeps all.
    data, suffix = f"{dataset}_{split}", f"_{baseline}" if baseline else ""
    if not checkpoint:
        return Path(f"eval_{data}{suffix}.json")
    p = Path(checkpoint).expanduser()
    if p.is_file():
        return p.parent / f"{p.stem}_eval_{data}{suffix}.json"
    if (p / "state").is_dir() and (p / "meta").is_dir():  # one checkpoint directory
        parent = p.absolute().parent
        if parent.name in (BEST_DIR, LATEST_DIR):  # <workdir>/best/<step>
            return parent.parent / f"eval_{data}_{parent.name}{p.name}{suffix}.json"
        return parent / f"eval_{data}_{p.name}{suffix}.json"
    return p / f"eval_{data}{suffix}.json"


def _check_writable(json_path: Path) -> None:
    """Refuse an output that cannot be written, without creating anything yet."""
    if json_path.is_dir():
        raise UserError(f"--output {json_path}: is a folder; name the JSON file to write")
    if csv_path_for(json_path).is_dir():
        raise UserError(f"--output {json_path}: the per-image CSV beside it, "
                        f"{csv_path_for(json_path)}, is a folder")
    for path, is_csv in ((json_path, False), (csv_path_for(json_path), True)):
        if path.exists() and not _written_by_evaluate(path, is_csv):
            raise UserError(f"--output {json_path}: {path} exists and is not an earlier output "
                            "of evaluate; name another file (or move that one) so it is not "
                            "replaced")
    existing = next(p for p in json_path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"--output {json_path}: cannot write there ({existing} is a file)")
    try:  # a file made and removed: permissions alone do not tell (read-only mounts, /proc)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mlnet_write_test"):
            pass
    except OSError as e:
        raise UserError(f"--output {json_path}: cannot write there ({e.strerror or e} in "
                        f"{existing})") from None


def _written_by_evaluate(path: Path, is_csv: bool) -> bool:
    """An earlier summary (it names its per-image CSV) or per-image CSV (its header) of this
    command, which a rerun replaces; any other file (a training's metrics.jsonl, say) is not."""
    try:
        if path.stat().st_size == 0:  # a placeholder (mktemp): nothing to lose
            return True
        with open(path, encoding="utf-8") as f:
            if is_csv:
                return f.readline().startswith(",".join(CSV_HEADER))
            return "per_image_csv" in json.load(f)
    except (OSError, ValueError, TypeError):  # unreadable, not text, not a JSON object
        return False


def csv_path_for(json_path: Path) -> Path:
    path = json_path.with_suffix(".csv")
    return path if path != json_path else json_path.with_name(json_path.name + ".csv")


# --------------------------------------------------------------------------- outputs

CSV_HEADER = ("index", "file_name", "num_fixations")  # then one column per metric

def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def format_table(metrics: dict[str, dict], title: str) -> str:
    """Fixed-width table: metric, mean, std, n (n = images with a finite value)."""
    lines = [title, f"{'metric':<12} {'mean':>8} {'std':>8} {'n':>7}"]
    for name, stats in metrics.items():
        label = METRIC_LABELS.get(name, name)
        arrow = "↓" if name in LOWER_IS_BETTER else "↑"
        lines.append(f"{label + ' ' + arrow:<12} {stats['mean']:>8.4f} {stats['std']:>8.4f} "
                     f"{stats['n']:>7d}")
    return "\n".join(lines)


def write_outputs(json_path: Path, summary: dict, rows: list[dict], columns: list[str]) -> Path:
    """The per-image CSV and the JSON summary beside it, each written atomically."""
    from mlnet_jax.atomic import atomic_path  # noqa: PLC0415
    csv_path = csv_path_for(json_path)
    summary = dict(summary, per_image_csv=csv_path.name)
    header = [*CSV_HEADER, *columns]
    with atomic_path(csv_path) as tmp:  # first: the JSON must never name a CSV not written
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in rows:
                writer.writerow([repr(float(row[c])) if isinstance(row[c], float) else row[c]
                                 for c in header])
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return csv_path


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


# --------------------------------------------------------------------------- evaluation

def evaluate(config, *, checkpoint: str = "", split: str = "", output: str = "",
             baseline: str | None = None, metrics_backend: str = "auto",
             sauc_others: int = SAUC_OTHER_IMAGES, seed: int = 0, config_file: str = "",
             progress: bool = True) -> dict:
    """Score the model at ``checkpoint`` (or ``baseline``) on ``split`` (default
    ``config.eval_split``); print the table, write JSON and CSV; return the JSON summary."""
    from mlnet_jax.baselines import BASELINES  # noqa: PLC0415
    if jax.process_count() > 1:
        raise UserError("evaluate runs in one process (it uses every local device)")
    baseline = baseline or None
    if baseline is not None and baseline not in BASELINES:
        raise UserError(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline is None and not checkpoint:
        raise UserError("pass --checkpoint (a training workdir, a checkpoint directory or a "
                        "converted .npz), or --baseline centre|spectral_residual")
    if metrics_backend not in BACKENDS:
        raise UserError(f"--metrics_backend must be one of {', '.join(BACKENDS)}")
    if sauc_others < 1:
        raise UserError(f"--sauc_others must be at least 1, got {sauc_others}")
    check_data_fields(config)
    split = split or config.eval_split
    json_path = Path(output).expanduser() if output else default_output(
        checkpoint, config.dataset, split, baseline)
    if json_path.suffix == ".csv":
        raise UserError(f"--output {output}: name the JSON file; the CSV is written beside it")
    _check_writable(json_path)  # before scoring a whole split, not after

    predict = None
    model_meta = resolved = None
    model_size = tuple(config.input_size)
    if baseline is None:
        from mlnet_jax.evaluation import model_predictor  # noqa: PLC0415
        from mlnet_jax.sharding import data_mesh, replicated  # noqa: PLC0415
        from mlnet_jax.train import compile_steps  # noqa: PLC0415
        model, variables, info, resolved = load_checkpoint(checkpoint)
        mesh = data_mesh()
        _, evaluate_fn = compile_steps(model, None, info.preprocessing, mesh)  # no optimiser
        params = jax.device_put(variables["params"], replicated(mesh))
        predict = model_predictor(params, evaluate_fn, mesh)
        model_size, model_meta = info.input_size, info.to_metadata()
    source = split_source(config, split)
    total = len(source) if config.eval_max_images < 0 else min(len(source),
                                                                config.eval_max_images)
    require_ground_truth(source, total, f"{config.dataset}/{split}")
    from tqdm import tqdm  # noqa: PLC0415
    with tqdm(total=total, unit="img", disable=None if progress else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        scores = score_split(
            source, model_size=model_size, batch_size=per_process_batch(config.eval_batch_size),
            predict=predict, baselines={"": baseline} if baseline else None,
            metric_names=ALL_METRICS, max_images=config.eval_max_images,
            sauc_others=sauc_others, seed=seed, backend=metrics_backend, progress=bar.update)
    if scores.num_images == 0:
        raise UserError(f"{config.dataset}/{split} has no images to evaluate")
    metrics = {name: scores.summary[name] for name in ALL_METRICS}

    what = f"baseline {baseline}" if baseline else f"ML-Net {resolved}"
    summary = {
        "what": what,
        "checkpoint": str(checkpoint) if checkpoint and baseline is None else None,
        "checkpoint_resolved": str(resolved) if resolved is not None else None,
        "baseline": baseline,
        "model": model_meta,
        "config_file": config_file or None,
        "config": _jsonable(config.to_dict()),
        "dataset": config.dataset,
        "split": split,
        "num_images": scores.num_images,
        "metrics": {name: {"mean": _number(s["mean"]), "std": _number(s["std"]), "n": s["n"]}
                    for name, s in metrics.items()},
        "loss": ({k: _number(v) if isinstance(v, float) else v
                  for k, v in scores.summary["loss"].items()} if baseline is None else None),
        "metrics_backend": resolve_backend(metrics_backend),
        "seed": seed,
        "sauc_other_images": sauc_others,
        "sauc_negatives": (f"per image, the union of the fixations of up to {sauc_others} other "
                           f"images of the split that have fixations, drawn without "
                           f"replacement by numpy default_rng([{seed}, image index]), each "
                           "fixation scaled to this image's size"),
    }
    title = f"{what} on {config.dataset}/{split}: {scores.num_images} images"
    print(format_table(metrics, title), flush=True)  # first: shown even if writing fails
    try:
        csv_path = write_outputs(json_path, summary, scores.rows, scores.columns)
    except OSError as e:
        raise UserError(f"--output {json_path}: cannot write it ({e.strerror or e}); the "
                        "means above were not saved") from None
    print(f"wrote {json_path} and {csv_path}")
    summary["per_image_csv"] = csv_path.name
    return summary


# --------------------------------------------------------------------------- command line

def _config_for(FLAGS):
    """``--config`` if given; else the config the checkpoint was trained with (so a SALICON
    checkpoint is scored on SALICON), with any ``--config.key=value`` overrides applied; else
    the demo config."""
    checkpoint = Path(FLAGS.checkpoint).expanduser()  # '--checkpoint=~/run': no shell expansion
    if FLAGS["config"].present or not FLAGS.checkpoint or not checkpoint.is_dir():
        return FLAGS.config
    from mlnet_jax.checkpointing import stored_config  # noqa: PLC0415
    stored = stored_config(checkpoint)
    if stored is None:
        return FLAGS.config
    import ml_collections  # noqa: PLC0415

    from mlnet_jax.configs import default  # noqa: PLC0415
    fields = default.get_config()  # a field an older version (or a typo) saved is not read
    config = ml_collections.ConfigDict({k: v for k, v in stored.items() if k in fields})
    for name in FLAGS:
        if name.startswith("config.") and FLAGS[name].present:
            node, *path = config, *name.split(".")[1:]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = FLAGS[name].value
    return config


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    def define() -> None:
        flags.DEFINE_string("checkpoint", "", "Training workdir (best, else latest checkpoint), one "
                            "checkpoint directory, or a converted full-model .npz.")
        flags.DEFINE_string("split", "", "Split to score (default: config.eval_split).")
        flags.DEFINE_string("output", "", "JSON summary path (CSV beside it); default beside the "
                            "checkpoint: <workdir>/eval_<dataset>_<split>.json.")
        flags.DEFINE_enum("baseline", "none", ["none", "centre", "spectral_residual"],
                          "Score a baseline map instead of the model (no checkpoint needed).")
        flags.DEFINE_enum("metrics_backend", "auto", list(BACKENDS),
                          "numpy: exact MATLAB semantics per image (float64); jax: batched on the "
                          "device (float32); auto: jax on accelerators, numpy on CPU.")
        flags.DEFINE_integer("sauc_others", SAUC_OTHER_IMAGES,
                             "Other images whose fixations are sAUC's negatives.")
        flags.DEFINE_integer("seed", 0, "Seed of the random metrics and of sAUC's other images.")
        flags.DEFINE_bool("progress", True, "Show a progress bar (on a terminal).")
        flags.DEFINE_bool("debug", False, "Show tracebacks for errors.")

    def run() -> int:
        from absl import logging
        FLAGS = flags.FLAGS
        # TFDS and Orbax log warnings through absl (e.g. when probing an unprepared data_dir);
        # errors are reported as one line, so only --debug shows them.
        logging.set_verbosity(logging.WARNING if FLAGS.debug else logging.ERROR)
        if not 0 <= FLAGS.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32), got {FLAGS.seed}")
        config = _config_for(FLAGS)
        config_file = (config_flags.get_config_filename(FLAGS["config"])
                       if config is FLAGS.config else
                       f"the config stored with {Path(FLAGS.checkpoint).expanduser()}")
        evaluate(config, checkpoint=FLAGS.checkpoint, split=FLAGS.split, output=FLAGS.output,
                 baseline=None if FLAGS.baseline == "none" else FLAGS.baseline,
                 metrics_backend=FLAGS.metrics_backend, sauc_others=FLAGS.sauc_others,
                 seed=FLAGS.seed, config_file=config_file, progress=FLAGS.progress)
        return 0

    return run_absl(run, argv, config=(str(DEMO_CONFIG), "Configuration file naming the "
                                       "dataset (as for training)."), define=define)


if __name__ == "__main__":
    sys.exit(main())
