"""Where a step's device time goes: its kernels, timed by the profiler, grouped by what they do.

``throughput.py --profile DIR`` traces a few steps of the headline train step and of ``predict``
(``jax.profiler.trace``, CUPTI on a GPU), keeps each trace's ``perfetto_trace.json.gz`` in DIR
for later reading, and summarises it here: milliseconds per step by category (cuDNN
convolution forward / input gradient / weight gradient, element-wise loop fusions, reduction
fusions, copies, memory operations), the busy fraction of the step, and the kernels that take
most time. This replaces estimates read off the HLO ("Where the time goes" in NOTES.md) with
measurement.

Read a trace again, here, at no device time (HLO from ``--dump-dir``), or count the bytes each
instruction of an optimised HLO reads and writes (the lower bound on its time that "Where the
time goes" in NOTES.md is built from; also how to check a candidate lever's mechanism in its
dumped HLO before its timing):

    python benchmarks/kernel_profile.py trace TRACE_DIR HLO.txt.gz --steps 5 [--step-ms 47]
    python benchmarks/kernel_profile.py traffic HLO.txt.gz [--tb-per-s 4.3]

Kernels are named to HLO instructions two ways, whichever the trace allows: XLA names the kernel
of a fusion after the instruction (``loop_add_fusion.2`` launches ``loop_add_fusion_2``), and
CUPTI tags kernels with the ``hlo_op`` they ran for (inside a CUDA graph that is the command
buffer, so the kernel name decides). cuDNN's own kernels say ``fprop``/``dgrad``/``wgrad``.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
from pathlib import Path

CONV_FORWARD, CONV_INPUT_GRAD, CONV_WEIGHT_GRAD = "conv forward", "conv input grad", "conv weight grad"
_CUSTOM_CALLS = {
    "__cudnn$convForward": CONV_FORWARD,
    "__cudnn$convBiasActivationForward": CONV_FORWARD,
    "__cudnn$convBackwardInput": CONV_INPUT_GRAD,
    "__cudnn$convBackwardFilter": CONV_WEIGHT_GRAD,
    "__cublas$gemm": "gemm",
    "__cublas$lt$matmul": "gemm",
    "__gpu$xla.gpu.triton": "Pallas kernel",  # mlnet_jax/first_conv.py's conv1_1 kernels
}
_FUSION_KINDS = {"kLoop": "element-wise fusion", "kInput": "reduction fusion",
                 "kOutput": "output fusion"}
# One HLO instruction: `[ROOT] %name = shape opcode(operands), attributes`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")


def kernel_name(instruction: str) -> str:
    """The name XLA gives the kernel it emits for ``instruction`` ('.' and '-' become '_')."""
    return re.sub(r"[^\w]", "_", instruction)


def _dims(shape: str) -> list[int]:
    """Dimensions of an HLO shape (of a tuple's first element): 'bf16[32,60,80,512]{…}' → […]."""
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction, from the text after 'opcode('."""
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def conv_flops(category: str, result: str, operands: list[str], rest: str) -> int | None:
    """2·MAC of a cuDNN convolution call, from the forward convolution it stands for:
    2 × (batch and spatial size of the forward output) × (filter elements), padding included
    (the convention of ``throughput.py``). ``operands`` are their shapes. XLA's calls are
    forward (x, w) → y, input gradient (dy, w) → dx, weight gradient (x, dy) → dw."""
    labels = re.search(r"dim_labels=\w+_\w+->(\w+)", rest)
    if not labels or len(operands) < 2:
        return None
    output, filt = {CONV_FORWARD: (result, operands[1]),
                    CONV_INPUT_GRAD: (operands[0], operands[1]),
                    CONV_WEIGHT_GRAD: (operands[1], result)}.get(category, (None, None))
    if output is None:
        return None
    out_dims, label = _dims(output), labels.group(1)
    if len(out_dims) != len(label):
        return None
    batch_and_space = math.prod(d for d, c in zip(out_dims, label) if c != "f")
    return 2 * batch_and_space * math.prod(_dims(filt))


def hlo_categories(hlo_text: str) -> dict[str, dict]:
    """Instruction name → {"category", "shape", "flops"} for every instruction of an optimised
    HLO module (``flops`` for cuDNN convolutions, else None); kernel names
    (:func:`kernel_name`) map to the same entries."""
    out: dict[str, dict] = {}
    shapes: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = shape
        flops = None
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            category = _CUSTOM_CALLS.get(target.group(1) if target else "", "custom call")
            operands = [shapes.get(o, "") for o in _operands(rest)]
            flops = conv_flops(category, shape, operands, rest)
        elif opcode == "fusion":
            category = _fusion_category(name, rest)
        elif opcode == "convolution":
            category = "convolution"
        elif opcode in ("copy", "transpose"):
            category = "copy/transpose"
        else:
            category = opcode
        entry = {"category": category, "shape": shape[:120], "flops": flops}
        out[name] = entry
        out.setdefault(kernel_name(name), entry)
    return out


def _fusion_category(name: str, rest: str) -> str:
    """What a fusion does, from its name (XLA names fusions after their root: loop_…,
    input_reduce_…, input_transpose_…, gemm_fusion_…) or else its kind. Triton emits several
    of these (kind=kCustom), so the emitter does not decide."""
    if "__cudnn$fusion" in rest:
        return "cuDNN fusion"
    if "gemm" in name or "__triton_gemm" in rest:
        return "gemm"
    if "transpose" in name:
        return "copy/transpose"
    if "reduce" in name and not name.startswith("loop_"):
        return "reduction fusion"
    if name.startswith("loop_"):
        return "element-wise fusion"
    kind = re.search(r"kind=(k\w+)", rest)
    return _FUSION_KINDS.get(kind.group(1) if kind else "", "fusion")


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def shape_bytes(shape: str, workspace: bool = True) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed); ``workspace=False``
    leaves out the u8 scratch buffer a cuDNN call returns last."""
    arrays = re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape)
    if not workspace and len(arrays) > 1 and arrays[-1][0] == "u8":
        arrays = arrays[:-1]
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in arrays)


def hlo_traffic(hlo_text: str) -> list[dict]:
    """Per instruction of the entry computation that touches memory: bytes read (its operands,
    whole) and written (its result, without cuDNN's workspace), and its category. A fusion that
    reads part of an operand is over-counted; nothing is counted twice otherwise."""
    names = hlo_categories(hlo_text)
    entry = hlo_text[hlo_text.index("\nENTRY"):] if "\nENTRY" in hlo_text else hlo_text
    sizes: dict[str, int] = {}
    rows = []
    for line in entry.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        written = shape_bytes(shape, workspace=opcode != "custom-call")
        sizes[name] = written
        if opcode in _NO_TRAFFIC:
            continue
        read = sum(sizes.get(o, 0) for o in _operands(rest))
        rows.append({"instruction": name, "category": names[name]["category"], "read": read,
                     "written": written})
    return rows


def print_traffic(rows: list[dict], tb_per_s: float, top: int = 25) -> None:
    by_category = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        by_category[r["category"]][0] += r["read"] + r["written"]
        by_category[r["category"]][1] += 1
    print(f"bytes read + written per step (ms at {tb_per_s} TB/s: a lower bound on the time)")
    for category, (total, count) in sorted(by_category.items(), key=lambda kv: -kv[1][0]):
        print(f"  {category:22} {count:4d} instructions {total / 1e9:8.2f} GB "
              f"{total / tb_per_s / 1e9:7.2f} ms")
    print(f"  top {top} instructions other than convolutions:")
    others = [r for r in rows if not r["category"].startswith("conv ")]
    for r in sorted(others, key=lambda r: -(r["read"] + r["written"]))[:top]:
        print(f"  {(r['read'] + r['written']) / 1e9:8.2f} GB {r['category']:22} {r['instruction']}")


def _category_from_kernel(name: str) -> str:
    """A kernel no HLO instruction names: cuDNN/CUTLASS and driver kernels by their names."""
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "memory operation"
    if "dgrad" in low:
        return CONV_INPUT_GRAD
    if "wgrad" in low:
        return CONV_WEIGHT_GRAD
    if "fprop" in low or "conv" in low:
        return CONV_FORWARD
    if "gemm" in low or "xmma" in low or "cutlass" in low:
        return "gemm"
    return "unmapped"


def load_trace(trace_dir: str | Path) -> list[dict]:
    """The events of the newest ``perfetto_trace.json.gz`` under ``trace_dir``."""
    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework", "Source", "TensorFlow",
                  "Launch Stats", "Host")


def device_lines(events: list[dict]) -> dict[tuple, str]:
    """(pid, tid) → line name, for the lines of device processes ('/device:…')."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    return {key: name for key, name in thread.items() if key[0] in devices}


def device_kernels(events: list[dict], lines: dict[tuple, str] | None = None) -> list[dict]:
    """Complete ('X') events on the device's stream lines: one per kernel or copy run. The
    derived lines the profiler adds ('XLA Ops', 'XLA Modules', 'Steps', …) repeat the same
    time and are left out; a device whose lines are not called 'Stream …' keeps every line
    that is not a derived one."""
    lines = device_lines(events) if lines is None else lines
    streams = {key for key, name in lines.items() if name.startswith("Stream")}
    if not streams:
        streams = {key for key, name in lines.items() if not name.startswith(_DERIVED_LINES)}
    return [e for e in events
            if e.get("ph") == "X" and "dur" in e and (e.get("pid"), e.get("tid")) in streams]


def summarize(events: list[dict], hlo_text: str, steps: int, step_ms: float | None = None,
              top: int = 40) -> dict:
    """Per-step device time by category and the ``top`` kernels; ``step_ms`` (the measured
    step) gives the busy fraction, i.e. how much of the step the device spends in kernels."""
    lines = device_lines(events)
    kernels = device_kernels(events, lines)
    # Events per device line, kept in the summary: to adapt this reader should it miss.
    seen = dict(collections.Counter(lines[(e.get("pid"), e.get("tid"))] for e in events
                                    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in lines))
    if not kernels:
        return {"kernels_traced": 0, "device_lines": seen,
                "note": "no device kernel events in the trace (CPU backend, or CUPTI unavailable)"}
    names = hlo_categories(hlo_text)
    by_category: collections.Counter = collections.Counter()
    by_kernel: dict[tuple[str, str], dict] = {}
    mapped_by = collections.Counter()
    for e in kernels:
        name = str(e.get("name", ""))
        hlo_op = str(e.get("args", {}).get("hlo_op", ""))
        entry = names.get(name) or names.get(kernel_name(name))
        if entry:
            mapped_by["kernel name"] += 1
        elif hlo_op in names and not hlo_op.startswith("command_buffer"):
            entry = names[hlo_op]
            mapped_by["hlo_op"] += 1
        category = entry["category"] if entry else _category_from_kernel(name)
        if not entry:
            mapped_by["kernel name heuristics"] += 1
        us = float(e["dur"])
        by_category[category] += us
        # One row per kernel and instruction: cuDNN runs the same kernel for several layers.
        k = by_kernel.setdefault((name, hlo_op), {
            "kernel": name[:100], "category": category, "hlo_op": hlo_op,
            "shape": entry["shape"] if entry else "", "flops": entry["flops"] if entry else None,
            "us": 0.0, "count": 0})
        k["us"] += us
        k["count"] += 1
    busy_ms = sum(by_category.values()) / 1e3 / steps
    flops = collections.Counter()  # per step, from the HLO: each instruction once
    for entry in {id(e): e for e in names.values()}.values():
        flops[entry["category"]] += entry["flops"] or 0
    categories = [{"category": c, "ms_per_step": us / 1e3 / steps,
                   "share_of_busy": us / 1e3 / steps / busy_ms if busy_ms else None,
                   "tflops": _tflops(flops[c], us / steps)}
                  for c, us in by_category.most_common()]
    ranked = sorted(by_kernel.values(), key=lambda k: -k["us"])[:top]
    for k in ranked:
        k["ms_per_step"] = k["us"] / 1e3 / steps
        k["per_step"] = k.pop("count") / steps
        k["tflops"] = _tflops((k.pop("flops") or 0) * k["per_step"], k.pop("us") / steps)
    return {"kernels_traced": len(kernels), "steps": steps, "busy_ms_per_step": busy_ms,
            "step_ms": step_ms, "busy_fraction": busy_ms / step_ms if step_ms else None,
            **idle_gaps(kernels, steps), "mapped_by": dict(mapped_by), "device_lines": seen,
            "categories": categories, "top_kernels": ranked}


def idle_gaps(kernels: list[dict], steps: int, top: int = 8) -> dict:
    """Where the device waits: the traced span per step (first kernel's start to the last's
    end) and the longest gaps between one kernel's end and the next one's start, with the
    kernels on either side (between steps: host dispatch or a sync; inside one: a launch)."""
    runs = sorted(kernels, key=lambda e: float(e["ts"]))
    gaps, end, before = [], None, None
    for e in runs:
        start = float(e["ts"])
        if end is not None and start > end:
            gaps.append({"us": start - end, "after": before, "before": str(e.get("name", ""))[:60]})
        if end is None or start + float(e["dur"]) > end:
            end, before = start + float(e["dur"]), str(e.get("name", ""))[:60]
    span_us = end - float(runs[0]["ts"])
    return {"traced_ms_per_step": span_us / 1e3 / steps,
            "idle_ms_per_step": sum(g["us"] for g in gaps) / 1e3 / steps,
            "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:top]}


def _tflops(flops: float, us: float) -> float | None:
    return flops / us / 1e6 if flops and us else None


def trace_steps(run_step, steps: int, trace_dir: str | Path) -> list[dict]:
    """Trace ``steps`` calls of ``run_step`` (already compiled and warm), dispatched as the
    timed loop dispatches them, without a host sync in between, so the gaps between steps in
    the trace are the timed loop's; ``run_step`` returns what to block on after the last."""
    import jax

    trace_dir = Path(trace_dir)
    trace_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            out = run_step()
        jax.block_until_ready(out)
    for copy in [*trace_dir.rglob("*.xplane.pb"), *trace_dir.rglob("*.trace.json.gz")]:
        copy.unlink()  # other encodings of the same trace: the perfetto file is what we read
    return load_trace(trace_dir)


def print_summary(label: str, summary: dict, rows: int = 12) -> None:
    if not summary.get("kernels_traced"):
        print(f"profile {label}: {summary.get('note') or summary.get('skipped')}")
        return
    frac = summary.get("busy_fraction")
    print(f"profile {label}: {summary['busy_ms_per_step']:.2f} ms of kernels per step"
          + (f" = {100 * frac:.1f} % of the {summary['step_ms']:.2f} ms step" if frac else "")
          + f"; traced {summary['traced_ms_per_step']:.2f} ms per step, "
            f"{summary['idle_ms_per_step']:.2f} ms of it idle")
    for gap in summary["largest_gaps"][:3]:
        print(f"  idle {gap['us']:8.1f} us  {gap['after']} -> {gap['before']}")

    def rate(entry):
        return f"{entry['tflops']:6.0f} TFLOP/s" if entry.get("tflops") else " " * 14

    for c in summary["categories"]:
        print(f"  {c['category']:22} {c['ms_per_step']:8.3f} ms {100 * c['share_of_busy']:5.1f} % "
              f"{rate(c)}")
    print(f"  top kernels ({rows}):")
    for k in summary["top_kernels"][:rows]:
        print(f"  {k['ms_per_step']:8.3f} ms x{k['per_step']:<3.0f} {rate(k)} {k['category']:19} "
              f"{k['kernel'][:56]} {k['shape'][:40]}")


def _read_hlo(path: str) -> str:
    hlo = Path(path)
    return gzip.open(hlo, "rt").read() if hlo.suffix == ".gz" else hlo.read_text()


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    trace = commands.add_parser("trace", help="summarise a kept profiler trace")
    trace.add_argument("trace_dir", help="a directory holding perfetto_trace.json.gz (searched below)")
    trace.add_argument("hlo", help="the executable's optimised HLO text (.txt or .txt.gz)")
    trace.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
    trace.add_argument("--step-ms", type=float, default=None, help="the measured step time")
    trace.add_argument("--rows", type=int, default=25)
    traffic = commands.add_parser("traffic", help="bytes each instruction of an HLO moves")
    traffic.add_argument("hlo", help="an optimised HLO text (.txt or .txt.gz)")
    traffic.add_argument("--tb-per-s", type=float, default=4.3,
                         help="memory bandwidth for the time bound (H200 copy: 4.3; H100: 3.0)")
    traffic.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    text = _read_hlo(args.hlo)
    if args.command == "traffic":
        print_traffic(hlo_traffic(text), args.tb_per_s, args.rows)
        return 0
    summary = summarize(load_trace(args.trace_dir), text, args.steps, args.step_ms)
    print_summary(str(Path(args.trace_dir).name), summary, rows=args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
