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

BASE_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw", "power.limit",
               "temperature.gpu")
# Why the clock is below its maximum, as NVML's bit mask (drivers ≥ 535; older ones reject the
# field, and the monitor then samples BASE_FIELDS alone). The 2026-11-27 H200 run timed
# prediction at 1665 MHz while drawing 340 W of 700: power.draw, a one-second average, could
# not say what held the clock.
FIELDS = (*BASE_FIELDS, "clocks_event_reasons.active")
CLOCK_EVENT_REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "SW power cap",
                       0x8: "HW slowdown", 0x10: "sync boost", 0x20: "SW thermal",
                       0x40: "HW thermal", 0x80: "HW power brake", 0x100: "display clock"}
POWER_CAPPED = 0.97  # a sample at ≥ 97 % of the power limit counts as capped


class GpuMonitor:
    """Context manager: ``with GpuMonitor() as m: ...``, then ``m.summary`` (None without
    ``nvidia-smi`` or without samples). Samples GPU ``gpu`` every ``interval_ms`` from its first
    sample on, which ``__enter__`` waits for (at most ``start_timeout_s``) so that a short
    measurement is covered; that first sample, taken before the block, is left out."""

    def __init__(self, interval_ms: int = 50, gpu: int = 0, command: str = "nvidia-smi",
                 start_timeout_s: float = 5.0):
        self.command, self.gpu, self.interval_ms = command, gpu, interval_ms
        self.start_timeout_s = start_timeout_s
        self.fields = FIELDS
        self.process = None
        self.summary = None

    def __enter__(self) -> "GpuMonitor":
        if shutil.which(self.command):
            self._start(FIELDS)
            if self.lines:
                rejected = len(self.lines[0].split(",")) != len(FIELDS)
            else:  # no line yet: it ended silently, or it is slow (then keep it)
                try:
                    self.process.wait(timeout=1)
                    rejected = True
                except subprocess.TimeoutExpired:
                    rejected = False
            if rejected:  # "Field … is not a valid field to query", or it ended silently
                self._stop()
                self._start(BASE_FIELDS)
        return self

    def _start(self, fields: tuple[str, ...]) -> None:
        self.fields, self.lines, self.started = fields, [], threading.Event()
        self.process = subprocess.Popen(
            [self.command, "-i", str(self.gpu), f"--query-gpu={','.join(fields)}",
             "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.started.wait(self.start_timeout_s)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.started.set()
        self.started.set()  # it ended without a line: do not keep __enter__ waiting

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self._stop()
        self.summary = summarize("".join(self.lines[1:]), self.fields)

    def _stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.reader.join(timeout=5)


def summarize(csv_text: str, fields: tuple[str, ...] = FIELDS) -> dict | None:
    """Medians and extremes of ``nvidia-smi --query-gpu=fields`` lines; fields it reports as
    ``[N/A]`` (or cannot parse) are left out, lines of the wrong length skipped. The clock
    event reasons become the share of samples each was active in."""
    columns = {field: [] for field in fields}
    for line in csv_text.splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            continue
        for field, value in zip(fields, values):
            try:
                columns[field].append(int(value, 16) if field.startswith("clocks_event")
                                      else float(value))
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
    if reasons := columns.get("clocks_event_reasons.active"):
        summary["clock_event_reasons"] = {
            name: sum(bool(mask & bit) for mask in reasons) / len(reasons)
            for bit, name in CLOCK_EVENT_REASONS.items() if any(mask & bit for mask in reasons)}
    return summary


def describe(summary: dict | None) -> str:
    """One line for the printed table: '1755 MHz (max 1980), 688 W of 700, 12 % of samples
    capped, held by SW power cap 80 %'."""
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
    held = {k: v for k, v in summary.get("clock_event_reasons", {}).items() if k != "idle"}
    if held:
        text += ", held by " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in
                                         sorted(held.items(), key=lambda kv: -kv[1]))
    return text
