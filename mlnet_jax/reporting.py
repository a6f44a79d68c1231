"""What a training run writes for people: JSON lines, TensorBoard events and PNG figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mlnet_jax.atomic import atomic_path
from mlnet_jax.overlay import heatmap


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch
    whenever it is installed (as on Colab and the GPU image), which costs a training start
    seconds (1.4 s on a 2-core CPU with the CPU wheel) for tensors this package never passes."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes its ``import torch`` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard event files (tensorboardX: no TensorFlow needed).

    A run resumed at ``resume_step`` replays the steps after it, so records past that step
    (written before a crash, or torn by it) are dropped, not duplicated: ``replayed`` counts
    the records of steps that run again. A ``final`` record is dropped too (not counted): the
    run writes it again when it ends (it is not mirrored to TensorBoard), and so is the
    ``eval`` record of ``resume_step`` when ``evaluation_pending`` (that evaluation runs
    again). TensorBoard is then rebuilt from the records kept: its writer queues events in a
    thread, so those of the last seconds before a kill may never have reached the file.
    Non-finite values are written as JSON ``null``.
    """

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: int = 0,
                 evaluation_pending: bool = False):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.replayed = 0
        self.unreadable: list[int] = []  # line numbers of damaged records dropped on resume
        self._tb = None
        if enabled:
            SummaryWriter = _summary_writer_class()
            self.replayed, self.unreadable = _keep_records_up_to(
                self.path, resume_step, resume_step if evaluation_pending else None)
            if resume_step == 0:
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            else:  # everything from step 1 purged, then written again from metrics.jsonl
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=1)
                for line in self.path.read_text().splitlines() if self.path.exists() else ():
                    record = json.loads(line)
                    self._mirror(record.pop("step"), record.pop("kind"), {
                        k: float("nan") if v is None else v for k, v in record.items()})
                self._tb.flush()

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float, np.number)) and k not in ("step", "kind")}
        strict = {k: v if np.isfinite(v) else None for k, v in clean.items()}  # no bare NaN
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **strict}, allow_nan=False) + "\n")
        self._mirror(step, kind, clean)
        self._tb.flush()

    def _mirror(self, step: int, kind: str, values: dict) -> None:
        if kind == "final":  # in final_metrics.json; a rerun would plot it twice at one step
            return
        for key, value in values.items():
            if np.isfinite(value):  # a NaN point plots nothing (and tensorboardX warns)
                self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _keep_records_up_to(path: Path, last_step: int,
                        evaluated_again: int | None = None) -> tuple[int, list[int]]:
    """Rewrite the JSON-lines file at ``path`` without records after ``last_step``, ``final``
    records, the ``eval`` record of step ``evaluated_again`` and lines that are no record;
    returns how many records of later steps went, and the numbers of the unreadable lines
    before the last one (a crash cuts only the last line short: others were damaged some
    other way, which the caller reports)."""
    if not path.exists():
        return 0, []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept, dropped, changed, unreadable = [], 0, False, []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            later = int(record["step"]) > last_step
            again = record.get("kind") == "eval" and int(record["step"]) == evaluated_again
            keep = not later and not again and record.get("kind") != "final"
        except (ValueError, KeyError, TypeError, AttributeError):
            later, keep = i == last, False  # the last line cut short: a record of a later step
            if line.strip() and i != last:
                unreadable.append(i + 1)
        if keep:
            kept.append(line + "\n")
        else:
            changed = True
            dropped += later
    if changed:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))
    return dropped, unreadable


def save_prediction_grid(path: Path, images: list[np.ndarray], truths: list[np.ndarray],
                         predictions: list[np.ndarray], cell: int = 160) -> None:
    """One row per image: the image, its ground truth, the prediction (maps in [0, 1])."""
    rows = []
    for image, truth, pred in zip(images, truths, predictions):
        scale = cell / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        cells = [Image.fromarray(image).resize(size, Image.BILINEAR),
                 Image.fromarray(heatmap(truth)).resize(size, Image.BILINEAR),
                 Image.fromarray(heatmap(pred)).resize(size, Image.BILINEAR)]
        row = Image.new("RGB", (3 * cell, cell))
        for i, c in enumerate(cells):
            row.paste(c, (i * cell + (cell - c.width) // 2, (cell - c.height) // 2))
        rows.append(row)
    grid = Image.new("RGB", (3 * cell, cell * max(len(rows), 1)))
    for i, row in enumerate(rows):
        grid.paste(row, (0, i * cell))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def save_training_curves(path: Path, metrics_jsonl: Path) -> None:
    """PNG with the training and validation loss and the validation CC against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [{k: np.nan if v is None else v for k, v in json.loads(line).items()}
               for line in Path(metrics_jsonl).read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and "loss" in r]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_cc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation loss")
        ax_cc.plot([r["step"] for r in evals], [r.get("cc", np.nan) for r in evals], "o-", color="C2")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("loss"), ax_loss.legend()
    ax_cc.set_xlabel("step"), ax_cc.set_ylabel("validation CC")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
