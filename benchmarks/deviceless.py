"""Compile the headline steps for a GPU that is not here: what a lease would compile, checked
without one.

XLA compiles for a CUDA card it is only told about (a target config: compute capability, SMs,
bandwidth, memory), through JAX's CUDA plugin on a machine with no GPU: the real
``train_step`` and ``predict`` (by default at bfloat16 32×480×640), for the code and each
``throughput.py`` variant, Pallas kernels included, which Triton compiles and ptxas assembles
for sm_90a. So before a lease spends minutes on them this says, per executable: whether it
compiles at all (a Triton kernel that fails, fails here), each Triton kernel's launch grid,
registers and spilled bytes (ptxas), XLA's memory for the executable, and the bytes each kind
of operation moves (``kernel_profile.hlo_traffic``), against the code's. It does not time anything: cuDNN's
algorithms are chosen by heuristics instead of autotuning, and a fusion decision can differ
from the card's (2026-11-28: the card split pool1's forward into two fusions, this keeps one;
the card's own description, which ``throughput.py`` on the card saves beside its JSON as
``topology-<card>.pb``, should settle it).

    pip install "jax[cuda13]==0.11.2" flax optax orbax-checkpoint pillow  # a separate venv
    python benchmarks/deviceless.py --card h200 --variants v3,cand_all --output OUT.json

``--card`` is a name of ``gpu_specs/`` (approximate descriptions) or a ``topology-*.pb`` file.
``--card tpu:v5e:2x2`` (or ``tpu:v2:2x2`` with ``--devices 8``, Colab's TPU v2-8) compiles for a
TPU instead, through libtpu (``pip install "jax[tpu]==0.11.2"``, no TPU needed): whether the
steps compile there and the memory they take per device (conv1_1 takes XLA's convolution there).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is no package
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(1, str(HERE.parent))
import kernel_profile  # noqa: E402
import throughput  # noqa: E402

SPECS = HERE / "gpu_specs"
NO_PLUGIN = ("no CUDA compiler here: install JAX's CUDA plugin in this environment "
             "(pip install \"jax[cuda13]==0.11.2\"); no GPU is needed")
NO_TPU = ("no TPU compiler here: install libtpu in this environment "
          "(pip install \"jax[tpu]==0.11.2\"); no TPU is needed")


def target_devices(card: str):
    """Compile-only devices of ``card``: a ``topology-*.pb`` saved on the card itself, a
    description in gpu_specs/ (``h200``, ``h100``), or ``tpu:<topology>`` (libtpu's names, e.g.
    ``tpu:v5e:2x2``, ``tpu:v2:2x2``: a host's chips)."""
    import jax
    from jax.experimental import topologies
    if card.startswith("tpu:"):
        try:
            return topologies.get_topology_desc(topology_name=card[4:], platform="tpu").devices
        except Exception as e:  # noqa: BLE001 — no libtpu, or a name it does not know
            if "not installed" in str(e):
                raise SystemExit(f"{NO_TPU} ({_first_line(e)})") from None
            raise SystemExit(f"--card {card}: libtpu made no topology of it (a name like "
                             f"tpu:v5e:2x2 expected): {_first_line(e)}") from None
    path = Path(card)
    if path.suffix == ".pb":
        if not path.is_file():
            raise SystemExit(f"--card {card}: no such file")
        jax.devices()  # loads the CUDA plugin, which reads the topology
        try:
            return topologies.TopologyDescription.deserialize(path.read_bytes()).devices
        except Exception as e:  # noqa: BLE001 — any failure is this file's
            raise SystemExit(f"--card {card}: not a topology saved by throughput.py on a GPU "
                             f"with this JAX's CUDA plugin ({_first_line(e)})") from None
    spec = SPECS / f"nvidia-{card}.txtpb"
    if not spec.is_file():
        names = sorted(p.stem.removeprefix("nvidia-") for p in SPECS.glob("*.txtpb"))
        raise SystemExit(f"--card {card}: expected a topology .pb file, tpu:<topology> or one "
                         f"of {', '.join(names)}")
    try:
        return topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=spec.read_text()).devices
    except Exception as e:  # noqa: BLE001 — no plugin, or a description XLA refuses
        if isinstance(e, NotImplementedError) or "not implemented" in str(e):
            raise SystemExit(f"{NO_PLUGIN} ({_first_line(e)})") from None
        raise SystemExit(f"--card {card}: {spec} is not a target config XLA accepts "
                         f"({_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def as_on_the_card(mesh):
    """Trace as the code would on the mesh's devices: conv1_1's 'auto' takes its kernels on a
    lone Hopper GPU (as on the card), the kernels are not interpreted, and Pallas lowers for
    the card's compute capability."""
    import jax

    from mlnet_jax import first_conv
    capability = str(getattr(mesh.devices.flat[0], "compute_capability", ""))
    lone_hopper = capability.split(".")[0] == "9" and mesh.devices.size == 1
    patches = [(first_conv, "_lone_hopper_gpu", lambda: lone_hopper),
               (first_conv, "interpreted", lambda: False)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def stderr_to(lines: list):
    """File descriptor 2 (where XLA's C++ logging and ptxas's report go) into ``lines``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.append(f.read().decode(errors="replace"))


def ptxas_kernels(log: str) -> dict[str, dict]:
    """Kernel name → registers, stack and spilled bytes, from ptxas's ``-v`` report."""
    out = {}
    for chunk in re.split(r"Compiling entry function '", log)[1:]:
        name = chunk.split("'", 1)[0]
        registers = re.search(r"Used (\d+) registers", chunk)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", chunk)
        if registers:
            out[name] = {"registers": int(registers.group(1)),
                         "stack_bytes": int(frame.group(1)) if frame else None,
                         "spill_bytes": (int(frame.group(2)) + int(frame.group(3))
                                         if frame else None)}
    return out


def triton_calls(hlo_text: str) -> list[dict]:
    """The Triton kernels (Pallas calls) of an optimised HLO module: name, grid, warps, stages."""
    calls = []
    for line in hlo_text.splitlines():
        if '"__gpu$xla.gpu.triton"' not in line:
            continue
        grid = re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", line)
        meta = re.search(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+)', line)
        if grid and meta:
            calls.append({"name": meta.group(1), "grid": [int(g) for g in grid.groups()],
                          "num_stages": int(meta.group(2)), "num_warps": int(meta.group(3))})
    return calls


def summarize(hlo_text: str, compiled, kernels: dict[str, dict]) -> dict:
    """What one executable would do on the card, read off its optimised HLO. A Triton kernel
    called several times under one name is compiled once per call (ptxas sees ``name``,
    ``name__1``, …): each call gets the most registers and spilled bytes of them."""
    traffic: dict[str, float] = {}
    for row in kernel_profile.hlo_traffic(hlo_text):
        moved = (row["read"] + row["written"]) / 1e9
        traffic[row["category"]] = traffic.get(row["category"], 0) + moved
    memory = throughput.executable_memory(compiled)
    triton = [{**call, **_worst_instance(kernels, call["name"])} for call in triton_calls(hlo_text)]
    return {"status": "compiled", "traffic_gb": {k: round(v, 6) for k, v in traffic.items()},
            "executable_gib": memory and round(memory["peak_estimate_bytes"] / 2**30, 2),
            "triton": triton,
            "spilling_kernels": {k: v for k, v in kernels.items() if v.get("spill_bytes")}}


def _worst_instance(kernels: dict[str, dict], name: str) -> dict:
    instances = [v for k, v in kernels.items() if re.fullmatch(rf"{re.escape(name)}(__\d+)?", k)]
    if not instances:
        return {}
    return {key: max((v[key] for v in instances if v[key] is not None), default=None)
            for key in ("registers", "stack_bytes", "spill_bytes")}


def _parameter_shapes(info) -> dict:
    """The model's parameters as shapes: nothing is initialised."""
    import jax
    import jax.numpy as jnp
    return jax.eval_shape(info.build().init, jax.random.key(0),
                          jnp.zeros((1, *info.input_size, 3)))["params"]


def lowered_train(mesh, b: int, h: int, w: int, dtype: str = "bfloat16"):
    import jax
    import jax.numpy as jnp

    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.sharding import batch_sharding, replicated
    from mlnet_jax.train import compile_steps, create_train_state
    info = ModelInfo(input_size=(h, w), preprocessing="caffe")
    tx = throughput._optimizer()  # the one throughput.py measures with
    rep, data = replicated(mesh), batch_sharding(mesh)
    params = _parameter_shapes(info)
    state = jax.eval_shape(lambda p: create_train_state(p, tx, 0, seed=0), params)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state)
    batch = {"image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=data),
             "target": jax.ShapeDtypeStruct((b, h // throughput.OUTPUT_STRIDE,
                                             w // throughput.OUTPUT_STRIDE, 1), jnp.float32,
                                            sharding=data)}
    train_fn, _ = compile_steps(info.build(jnp.dtype(dtype)), tx, info.preprocessing, mesh)
    return train_fn.lower(state, batch)


def lowered_predict(mesh, b: int, h: int, w: int, variant: str | None,
                    dtype: str = "bfloat16"):
    """(lowered predict, ``prepared_weights``' function where the variant prepares them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mlnet_jax.inference import ModelInfo, make_predict_fn
    from mlnet_jax.sharding import batch_sharding, replicated
    info = ModelInfo(input_size=(h, w), preprocessing="caffe")
    rep = replicated(mesh)
    params = _parameter_shapes(info)
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                             {"params": params})
    images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=batch_sharding(mesh))
    predict = make_predict_fn(info.build(jnp.dtype(dtype)), info.preprocessing, mesh)
    prepared = None
    if variant in throughput.PREPARED_VARIANTS:  # casts them: host zeros, only shapes count
        predict, variables = throughput.sibling("prepared_weights").prepare(
            predict, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables),
            jnp.dtype(dtype))
        prepared = predict
    return predict.lower(variables, images), prepared


def compile_one(mesh, task: str, variant: str | None, case: tuple[int, int, int],
                dtype: str = "bfloat16") -> dict:
    """Lower and compile one executable for the card; its summary, or why it failed."""
    t = time.perf_counter()
    log: list[str] = []
    try:
        with throughput.patched(variant) as patch:
            with as_on_the_card(mesh):
                lowered, prepared = ((lowered_train(mesh, *case, dtype), None) if task == "train"
                                     else lowered_predict(mesh, *case, variant, dtype))
            options = dict(patch.compiler_options)
            if mesh.devices.flat[0].platform != "tpu":
                options["xla_gpu_ptx_compiler_extra_flags"] = "-v"
            with stderr_to(log):
                compiled = lowered.compile(options)
            extra = prepared and {"prepared_parameters": throughput.sibling(
                "prepared_weights").prepared_parameters(prepared, compiled)}
    except Exception as e:  # noqa: BLE001 — a failure is the finding
        traceback.print_exc()  # XLA's, Triton's or this script's: the whole story, here
        return {"status": f"failed: {type(e).__name__}: {_first_line(e)}",
                "log_tail": "".join(log)[-3000:], "seconds": round(time.perf_counter() - t, 1)}
    text = compiled.as_text()
    out = {**summarize(text, compiled, ptxas_kernels("".join(log))), **(extra or {})}
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["hlo"] = text
    return out


def print_table(rows: list[dict]) -> None:
    """One line per executable: the bytes it moves, in all and outside the convolutions,
    against the code's."""
    base = {r["task"]: r for r in rows if r["variant"] is None and r["status"] == "compiled"}
    print(f"{'variant':24} {'task':8} {'GiB':>5} {'GB moved':>8} {'vs code':>7} {'non-conv':>8} "
          f"{'vs code':>7}  Triton kernels (registers/spilled bytes) or failure")
    for r in rows:
        name = r["variant"] or "code"
        if r["status"] != "compiled":
            print(f"{name:24} {r['task']:8} {'':>42}  {r['status']}")
            continue
        code = base.get(r["task"])
        moved, other = _moved_gb(r), _moved_gb(r, convolutions=False)
        deltas = ((f"{moved - _moved_gb(code):+7.2f}", f"{other - _moved_gb(code, False):+7.2f}")
                  if code else ("", ""))
        names = list(dict.fromkeys(k["name"] for k in r["triton"]))
        kernels = ", ".join(_kernel_label([k for k in r["triton"] if k["name"] == n])
                            for n in names) or "-"
        gib = "" if r["executable_gib"] is None else r["executable_gib"]
        print(f"{name:24} {r['task']:8} {gib:>5} {moved:8.2f} {deltas[0]:>7} {other:8.2f} "
              f"{deltas[1]:>7}  {kernels}")


def _kernel_label(calls: list[dict]) -> str:
    """``name[ ×calls] registers/spilled bytes`` (the most of any call)."""
    worst = {key: max((c.get(key) or 0 for c in calls), default=0)
             for key in ("registers", "spill_bytes")}
    count = f" ×{len(calls)}" if len(calls) > 1 else ""
    return f"{calls[0]['name']}{count} {worst['registers'] or '?'}/{worst['spill_bytes']}"


def _moved_gb(row: dict, convolutions: bool = True) -> float:
    return sum(v for k, v in row["traffic_gb"].items() if convolutions or not k.startswith("conv "))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", default="h200", help="gpu_specs/ name or a topology-*.pb file")
    p.add_argument("--variants", default="", help="comma-separated throughput.py variants; "
                   "the code itself is always compiled first")
    p.add_argument("--case", default="32x480x640", help="batch x rows x cols, the batch split "
                   "over --devices")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--devices", type=int, default=1, help="how many of the target's devices the "
                   "steps are data-parallel over (a TPU v2-8: 8)")
    p.add_argument("--output", help="JSON file for the summaries")
    p.add_argument("--dump-dir", help="where to write each executable's optimised HLO (gzipped)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in throughput.VARIANTS]
    if unknown:
        p.exit(2, f"--variants: unknown {', '.join(unknown)}; expected names of "
               "throughput.VARIANTS\n")
    try:
        (args.case_shape,) = throughput.parse_cases(args.case)
    except (ValueError, SystemExit):
        p.exit(2, f"--case {args.case!r}: expected one BxHxW, rows and cols multiples of 8, "
               "e.g. 32x480x640\n")
    if args.devices < 1 or args.case_shape[0] % args.devices:
        p.exit(2, f"--devices {args.devices}: expected a count of devices that divides the "
               f"batch of {args.case_shape[0]}\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # ptxas's -v report reaches stderr only through XLA's verbose logging, set before JAX loads
    # (a parent that imported JAX passes on TF_CPP_MIN_LOG_LEVEL=1): from a ptxas process
    # (JAX 0.11) or from nvJitLink (JAX 0.12).
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    os.environ["TF_CPP_VMODULE"] = "subprocess_compilation=3,nvjitlink=3"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only: libtpu may be shared
    import numpy as np
    from jax.sharding import Mesh

    from mlnet_jax.sharding import DATA_AXIS
    devices = target_devices(args.card)
    if args.devices > len(devices):
        raise SystemExit(f"--devices {args.devices}: {args.card} has {len(devices)}")
    mesh = Mesh(np.asarray(devices[:args.devices]), (DATA_AXIS,))
    case = args.case_shape
    rows = []
    for variant in [None, *args.variants]:
        for task in ("train", "predict"):
            if (task == "train" and variant in throughput.PREDICT_ONLY_VARIANTS) or (
                    task == "predict" and variant and variant not in throughput.FORWARD_VARIANTS):
                continue
            row = {"variant": variant, "task": task,
                   **compile_one(mesh, task, variant, case, args.dtype)}
            hlo = row.pop("hlo", None)
            if hlo and args.dump_dir:
                path = Path(args.dump_dir) / f"hlo_{task}_{variant or 'code'}.txt.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(gzip.compress(hlo.encode()))
            print(f"{variant or 'code'} {task}: {row['status']} ({row['seconds']} s)", flush=True)
            rows.append(row)
    if args.output:
        throughput._atomic_write_json(Path(args.output), {
            "card": devices[0].device_kind, "card_source": args.card, "case": args.case,
            "devices": args.devices, "dtype": args.dtype,
            "date": datetime.date.today().isoformat(),
            "software": throughput.software_versions(), "rows": rows})
    print_table(rows)
    return 0 if all(r["status"] == "compiled" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
