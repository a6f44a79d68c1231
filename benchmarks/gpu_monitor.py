"""The GPU's clocks, power and temperature, sampled by ``nvidia-smi`` while a measurement runs.

A step can be slower because the card ran slower (power cap, heat), not because the program
changed: the levers run's prediction profile had the device "idle" 9 % of a timed step, which
is either time between kernels or kernels running slower back to back than in the trace. The
samples beside each timing say which, and make runs on different days comparable.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading

FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw", "power.limit",
          "temperature.gpu")
POWER_CAPPED = 0.97  # a sample at ≥ 97 % of the power limit counts as capped


class GpuMonitor:
    """Context manager: ``with GpuMonitor() as m: ...``, then ``m.summary`` (None without
    ``nvidia-smi`` or without samples). Samples GPU ``gpu`` every ``interval_ms`` from its first
    sample on, which ``__enter__`` waits for (at most ``start_timeout_s``) so that a short
    measurement is covered; that first sample, taken before the block, is left out."""

    def __init__(self, interval_ms: int = 50, gpu: int = 0, command: str = "nvidia-smi",
                 start_timeout_s: float = 5.0):
        self.args = [command, "-i", str(gpu), f"--query-gpu={','.join(FIELDS)}",
                     "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
        self.start_timeout_s = start_timeout_s
        self.process = None
        self.lines: list[str] = []
        self.started = threading.Event()
        self.summary = None

    def __enter__(self) -> "GpuMonitor":
        if shutil.which(self.args[0]):
            self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
            self.started.wait(self.start_timeout_s)
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.started.set()
        self.started.set()  # it ended without a line: do not keep __enter__ waiting

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.reader.join(timeout=5)
        self.summary = summarize("".join(self.lines[1:]))


def summarize(csv_text: str) -> dict | None:
    """Medians and extremes of ``nvidia-smi --query-gpu=FIELDS`` lines; fields it reports as
    ``[N/A]`` (or cannot parse) are left out, lines of the wrong length skipped."""
    columns = {field: [] for field in FIELDS}
    for line in csv_text.splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(FIELDS):
            continue
        for field, value in zip(FIELDS, values):
            try:
                columns[field].append(float(value))
            except ValueError:
                pass
    if not columns["clocks.sm"]:
        return None
    sm, power, limit = columns["clocks.sm"], columns["power.draw"], columns["power.limit"]
    summary = {"samples": len(sm), "sm_mhz_median": statistics.median(sm), "sm_mhz_min": min(sm)}
    if columns["clocks.max.sm"]:
        summary["sm_mhz_max_supported"] = max(columns["clocks.max.sm"])
    if columns["clocks.mem"]:
        summary["mem_mhz_median"] = statistics.median(columns["clocks.mem"])
    if power:
        summary.update(power_w_mean=statistics.fmean(power), power_w_max=max(power))
        if limit:
            summary["power_limit_w"] = max(limit)
            summary["power_capped_fraction"] = (
                sum(p >= POWER_CAPPED * max(limit) for p in power) / len(power))
    if columns["temperature.gpu"]:
        summary["temperature_c_max"] = max(columns["temperature.gpu"])
    return summary


def describe(summary: dict | None) -> str:
    """One line for the printed table: '1755 MHz (max 1980), 688 W of 700, 12 % capped'."""
    if not summary:
        return "no GPU samples"
    text = f"{summary['sm_mhz_median']:.0f} MHz"
    if "sm_mhz_max_supported" in summary:
        text += f" (max {summary['sm_mhz_max_supported']:.0f})"
    if "power_w_mean" in summary:
        text += f", {summary['power_w_mean']:.0f} W"
        if "power_limit_w" in summary:
            text += (f" of {summary['power_limit_w']:.0f}, "
                     f"{100 * summary['power_capped_fraction']:.0f} % of samples capped")
    return text
