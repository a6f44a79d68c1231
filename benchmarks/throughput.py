"""Training-step and prediction throughput of mlnet_jax's own code paths on one device.

What it times is what users run: the jitted ``train_step`` from ``compile_steps`` (NamedSharding,
state donated, Keras-1 Nesterov SGD, max-normalised loss, prior penalty, non-finite guard) and
``make_predict_fn``. For each case (batch × rows × cols), compute dtype (float32, or bfloat16 with
float32 master weights) and mode (``full`` fine-tuning, or ``frozen``: the report's setup with
conv1_1…conv4_3 fixed) it reports images/s (median over repeats), achieved TFLOP/s (convolution
FLOPs counted analytically, equal to a count over the step's jaxpr) against a matmul ceiling
measured on the same device, compile time and the executable's memory. It also measures a cold
and a warm start with the persistent compilation cache (two subprocesses sharing a fresh cache
directory), a batch-size sweep, and end-to-end training through the real grain input pipeline
on fake SALICON-like 640×480 JPEG/PNG records, against the synthetic-batch rate; with
``--profile`` it traces the headline steps and says which kernels take the time
(``kernel_profile.py``), and ``--variants`` measures candidate levers (``cand_*``, from the
other modules of benchmarks/) and earlier versions beside the code as it is.

The JSON is rewritten after every measurement, so a run cut short by ``--deadline`` (no new
measurement starts after it) or by a kill keeps what it measured; a table is printed last.
Work runs in priority order: the headline case (bfloat16, last case) first, float32 last.

    python benchmarks/throughput.py --cases 16x240x320,32x480x640 --dtypes bfloat16,float32 \\
        --modes full,frozen --batch-sweep --pipeline --deadline 300 --output OUT.json
    python benchmarks/throughput.py --cases 2x32x32 --quick          # CPU smoke run
    python benchmarks/throughput.py --floors                          # analytic floors only

Only ``--pipeline`` needs grain (it imports ``mlnet_jax.input_pipeline``); everything else needs
jax, flax, optax, numpy and Pillow, which the GPU image has.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: the probes' process time starts here

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing (the device machine)
    sys.path.insert(0, str(REPO))

# --------------------------------------------------------------------------- FLOP model
# ML-Net as the torch peer counts it: VGG-16 (pool4 stride 1, no pool5) + 1280→64 3×3 + 64→1 1×1.
VGG_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))  # (convs, channels) per block
POOL_STRIDES = (2, 2, 2, 1)        # the pools after blocks 1-4
HEAD_CHANNELS = 64
REPORT_FROZEN_CONVS = 10           # configs/salicon_report.py: conv1_1…conv4_3 frozen
OUTPUT_STRIDE = 8

# Ceilings measured on this workplace's machines (KINDS.md, ANCHORS.md), for --floors only;
# a run measures its own matmul ceiling.
REFERENCE_CARDS = {"H200": {"bf16_tflops": 790.0, "copy_tb_s": 4.3},
                   "H100": {"bf16_tflops": 798.0, "copy_tb_s": 3.0}}


def conv_layers(rows: int, cols: int, width_multiplier: float = 1.0) -> list[dict]:
    """Every convolution of ML-Net at input rows×cols, in network order.

    Each: name, cin, cout, k (kernel side), rows, cols (output), index (0-based).
    """
    def width(c):
        return max(1, round(c * width_multiplier))

    layers, cin, r, c = [], 3, rows, cols
    taps = {}
    for b, (n, channels) in enumerate(VGG_BLOCKS):
        for i in range(n):
            layers.append({"name": f"conv{b + 1}_{i + 1}", "cin": cin, "cout": width(channels),
                           "k": 3, "rows": r, "cols": c})
            cin = width(channels)
        if b < len(POOL_STRIDES):
            r, c = -(-r // POOL_STRIDES[b]), -(-c // POOL_STRIDES[b])
        if b >= 2:
            taps[b] = cin
    head_in = sum(taps.values())  # pool3 + pool4 + conv5_3
    layers.append({"name": "head_conv", "cin": head_in, "cout": HEAD_CHANNELS, "k": 3,
                   "rows": r, "cols": c})
    layers.append({"name": "head_readout", "cin": HEAD_CHANNELS, "cout": 1, "k": 1,
                   "rows": r, "cols": c})
    for i, layer in enumerate(layers):
        layer["index"] = i
        layer["macs"] = layer["rows"] * layer["cols"] * layer["cin"] * layer["cout"] * layer["k"] ** 2
    return layers


def forward_flops(rows: int, cols: int, width_multiplier: float = 1.0) -> int:
    """Convolution FLOPs (2·MAC, padding included) of one image's forward pass."""
    return 2 * sum(layer["macs"] for layer in conv_layers(rows, cols, width_multiplier))


def train_flops(rows: int, cols: int, frozen_convs: int = 0, width_multiplier: float = 1.0) -> int:
    """Convolution FLOPs of one image's training step, as JAX differentiates it.

    Forward of every conv; a weight gradient (= forward MACs) for every trainable conv (the
    first ``frozen_convs`` VGG convs are not); an input gradient (= forward MACs) wherever the
    conv's input depends on a trainable parameter. So full fine-tuning is 3× forward minus
    conv1_1's input gradient (0.4 %), and the frozen setup skips conv1_1…conv4_3's backward but
    still computes the head conv's input gradient for all 1280 channels (JAX transposes the
    concatenation after the conv), though only conv5_3's 512 reach a trainable parameter.
    """
    layers = conv_layers(rows, cols, width_multiplier)
    num_backbone = sum(n for n, _ in VGG_BLOCKS)
    macs = 0
    for layer in layers:
        i = layer["index"]
        trainable = i >= frozen_convs or i >= num_backbone
        input_depends_on_trainable = any(j >= frozen_convs for j in range(min(i, num_backbone))) \
            or i > num_backbone
        macs += layer["macs"] * (1 + trainable + input_depends_on_trainable)
    return 2 * macs


def num_params(rows: int, cols: int, width_multiplier: float = 1.0) -> int:
    """Parameters (convs + biases + the prior grid h'/10 × w'/10)."""
    n = sum(layer["cin"] * layer["cout"] * layer["k"] ** 2 + layer["cout"]
            for layer in conv_layers(rows, cols, width_multiplier))
    mr, mc = rows // OUTPUT_STRIDE, cols // OUTPUT_STRIDE
    return n + max(mr // 10, 1) * max(mc // 10, 1)


def activation_bytes(rows: int, cols: int, dtype_bytes: int, width_multiplier: float = 1.0) -> int:
    """One image's forward activation traffic if every conv reads its input and writes its
    output once (pools and ReLUs fused in): a realistic lower bound, not the strict floor."""
    return dtype_bytes * sum(layer["rows"] * layer["cols"] * layer["cout"]
                             + _input_elements(layer, rows, cols)
                             for layer in conv_layers(rows, cols, width_multiplier))


def _input_elements(layer: dict, rows: int, cols: int) -> int:
    if layer["index"] == 0:
        return rows * cols * 3
    return layer["rows"] * layer["cols"] * layer["cin"] * (4 if layer["name"] in (
        "conv2_1", "conv3_1", "conv4_1") else 1)  # before a stride-2 pool: 4× the positions


def floors(batch: int, rows: int, cols: int, frozen_convs: int, ceiling_tflops: float,
           bandwidth_tb_s: float, dtype_bytes: int = 2) -> dict:
    """The two times METHOD.md asks for, per step: FLOPs over the ceiling, and the strict byte
    floor (inputs, targets, outputs, parameters and momentum read/written once) over bandwidth;
    plus the layer-by-layer activation traffic estimate."""
    p = num_params(rows, cols)
    f_fwd = batch * forward_flops(rows, cols)
    f_train = batch * train_flops(rows, cols, frozen_convs)
    io_bytes = batch * (rows * cols * 3 + (rows // 8) * (cols // 8) * 4 * 2)
    train_bytes = io_bytes + 4 * p * 4  # params + momentum, read and written, float32
    predict_bytes = batch * rows * cols * 3 + batch * (rows // 8) * (cols // 8) * 4 + 4 * p
    act = batch * activation_bytes(rows, cols, dtype_bytes)
    return {
        "forward_gflop": f_fwd / 1e9, "train_gflop": f_train / 1e9,
        "train_floor_ms": 1e3 * max(f_train / (ceiling_tflops * 1e12), train_bytes / (bandwidth_tb_s * 1e12)),
        "predict_floor_ms": 1e3 * max(f_fwd / (ceiling_tflops * 1e12), predict_bytes / (bandwidth_tb_s * 1e12)),
        "train_bytes_floor_mb": train_bytes / 1e6, "predict_bytes_floor_mb": predict_bytes / 1e6,
        "forward_activation_mb": act / 1e6,
        "forward_activation_ms": 1e3 * act / (bandwidth_tb_s * 1e12),
        "forward_intensity_flop_per_byte": f_fwd / act,
        "train_images_per_s_ceiling": batch / max(f_train / (ceiling_tflops * 1e12), 1e-12),
        "predict_images_per_s_ceiling": batch / max(f_fwd / (ceiling_tflops * 1e12), 1e-12),
    }


def jaxpr_flops(closed_jaxpr) -> dict:
    """FLOPs the program asks for, counted over a jaxpr (nested ones included): ``conv`` =
    2 · output elements · contraction length (rhs input features × kernel window) of every
    ``conv_general_dilated``; ``dot`` likewise for ``dot_general``. Independent of the
    analytic model above, so each checks the other."""
    totals = {"conv": 0, "dot": 0}

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                window = math.prod(rhs[d] for d in spec[2:])
                out = math.prod(eqn.outvars[0].aval.shape)
                totals["conv"] += times * 2 * out * rhs[spec[1]] * window
            elif name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = math.prod(eqn.outvars[0].aval.shape)
                totals["dot"] += times * 2 * out * math.prod(lhs[d] for d in lhs_contract)
            repeat = eqn.params.get("length", 1) if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner, times * repeat)
                    elif hasattr(sub, "eqns"):
                        walk(sub, times * repeat)

    walk(closed_jaxpr.jaxpr, 1)
    return totals


# --------------------------------------------------------------------------- small helpers

def parse_cases(text: str) -> list[tuple[int, int, int]]:
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        b, h, w = (int(v) for v in item.lower().split("x"))
        if h % OUTPUT_STRIDE or w % OUTPUT_STRIDE or min(b, h, w) < 1:
            raise SystemExit(f"--cases: {item}: rows and cols must be positive multiples of 8")
        cases.append((b, h, w))
    return cases


def case_name(b: int, h: int, w: int) -> str:
    return f"{b}x{h}x{w}"


def card_slug(card: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in card.lower()).strip("-") or "unknown"


def elapsed() -> float:
    return time.perf_counter() - T0


def _median(values):
    return statistics.median(values) if values else None


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def software_versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "pillow", "grain",
                 "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- variants
# Other versions of the levers (earlier ones re-created, or candidates), for a side-by-side
# measurement in the same run; each patch lives only while the step is traced. Rows measured
# under one carry "variant".
# v4: the package with nothing adopted of second_conv, bias_gradients, head_kernel and
# first_conv.READS_THE_IMAGE (the code until a lease adopts one: then the code before it);
# v3 / v2.1 / v1 / v0: earlier versions of the package's levers, re-created in
# benchmarks/versions.py (v3: conv1_1 by cuDNN and its ReLU apart, not mlnet_jax/first_conv.py's
# kernel, the code measured on 2026-11-28; v2.1: v3 with the ReLU and the pool as two
# operations, the code measured on 2026-11-27; v1: autodiff's gradients for both; v0: v1 with
# pool4 by reduce_window and one random word per dropout element; v0_pool4 / v0_dropout: v1
# with one of the two undone). cand_* put in levers not adopted, the package's own where it has
# them (its modules' ADOPTED parts or switches set while traced, so that the program measured is
# the one a winner becomes), else from modules of benchmarks/:
# cand_rgb8 conv1_1 with its input padded to 8 channels (benchmarks/candidates.py);
# cand_conv1_direct conv1_1's Pallas kernels reading the image instead of its column copies
# (mlnet_jax.first_conv.READS_THE_IMAGE);
# cand_prepared_weights (prediction only) the kernels converted and laid out once
# (benchmarks/prepared_weights.py); cand_pooled_bias the stride-2 pools' gradient spread and
# their conv's bias gradient as one Pallas kernel, cand_bias_kernels that and the wide
# unpooled layers' ReLU mask and bias gradient as another (mlnet_jax/bias_gradients.py);
# cand_pool_argmax the pools' winner masks by a pairwise argmax (benchmarks/pool_argmax.py);
# cand_conv12t_pool(_s2) conv1_2, its ReLU and pool1 as one Pallas kernel, with the pool's winner
# mask in training, each product transposed (channels × pixels: m64n256 wgmma; _s2 with two
# pipeline stages), cand_conv12t_dgrad with conv1_2's input gradient so too, cand_conv12t_bwd and
# its weight gradient (their forward is cand_conv12t_pool's: prediction not measured again)
# (mlnet_jax/second_conv.py);
# cand_head_kernel (prediction only) the head's convolution, ReLU and readout as one Pallas kernel
# reading pool3, pool4 and conv5_3 without their concatenation (mlnet_jax/head_kernel.py);
# cand_all the Pallas candidates together (conv12t_bwd's, bias_kernels', conv1_direct's and
# head_kernel's).
# xla_* compile the code as it is with other XLA options (this executable only).

def _sibling_function(module: str, name: str):
    """A stand-in for a package function: ``<module>.<name>`` of benchmarks/, loaded on first
    use."""
    def call(*args, **kwargs):
        return getattr(sibling(module), name)(*args, **kwargs)
    return call


def _version(name: str):
    """A stand-in for a package function: ``versions.<name>`` (an earlier version)."""
    return _sibling_function("versions", name)


def _second_conv(*parts: str, stages: int | None = None) -> dict:
    """The patches that make ``mlnet_jax.second_conv`` take ``parts`` (its ``ADOPTED``), with
    ``stages`` pipeline stages if given, its calls counted: the program measured is the
    package's as it would be with those parts adopted."""
    patches = {("mlnet_jax.second_conv", "ADOPTED"): frozenset(parts),
               ("mlnet_jax.second_conv", "conv_bias_relu_pool"): COUNTED}
    if stages is not None:
        patches[("mlnet_jax.second_conv", "FORWARD_STAGES")] = stages
    return patches


def _bias_gradients(*parts: str) -> dict:
    """The patches that make ``mlnet_jax.bias_gradients`` take ``parts`` (its ``ADOPTED``), its
    layers counted."""
    return {("mlnet_jax.bias_gradients", "ADOPTED"): frozenset(parts),
            ("mlnet_jax.bias_gradients", "conv_relu_pool"): COUNTED,
            ("mlnet_jax.bias_gradients", "conv_relu"): COUNTED}


def _conv_candidate(factory: str, **options):
    """A stand-in for ``lax.conv_general_dilated``: ``candidates.<factory>`` wrapped around the
    original (with ``options``), built on first use."""
    key = (factory, *sorted(options.items()))

    def conv(*args, **kwargs):
        if key not in _LOADED:
            _LOADED[key] = getattr(sibling("candidates"), factory)(_LOADED["conv"], **options)
        return _LOADED[key](*args, **kwargs)
    return conv


def sibling(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package), loaded once."""
    if name not in _SIBLINGS:
        spec = importlib.util.spec_from_file_location(f"_mlnet_bench_{name}", HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up
        spec.loader.exec_module(module)
        _SIBLINGS[name] = module
    return _SIBLINGS[name]


_SIBLINGS: dict = {}
_LOADED: dict = {}  # the original conv, and the candidates wrapping it
COUNTED = object()  # a patch: the attribute's own value, its calls counted while traced
_COUNTS: dict = {}  # (module, attribute) -> calls of a COUNTED patch
SECOND_CONV_PARTS = ("forward", "input_gradient", "weight_gradient")  # mlnet_jax.second_conv's
BIAS_GRADIENT_PARTS = ("pooled", "unpooled")  # mlnet_jax.bias_gradients'
# the head as one kernel (mlnet_jax.head_kernel.ADOPTED), its calls counted
_HEAD_KERNEL = {("mlnet_jax.head_kernel", "ADOPTED"): True,
                ("mlnet_jax.head_kernel", "multilevel_head"): COUNTED}
# conv1_1's kernels reading the image (mlnet_jax.first_conv.READS_THE_IMAGE), its calls counted
_READS_THE_IMAGE = {("mlnet_jax.first_conv", "READS_THE_IMAGE"): True,
                    ("mlnet_jax.first_conv", "image_reader"): COUNTED}
_V1 = {("mlnet_jax.first_conv", "kernel_applies"): _version("v3_kernel_applies"),
       ("mlnet_jax.vgg", "relu"): _version("v1_relu"),
       ("mlnet_jax.head", "relu"): _version("v1_relu"),
       ("mlnet_jax.vgg", "relu_max_pool_2x2"): _version("v1_relu_max_pool")}
VARIANTS = {  # name -> {(module, attribute): replacement}
    # v4: the package with none of the measured-later kernels adopted (the code until they are)
    "v4": {("mlnet_jax.second_conv", "ADOPTED"): frozenset(),
           ("mlnet_jax.bias_gradients", "ADOPTED"): frozenset(),
           ("mlnet_jax.head_kernel", "ADOPTED"): False,
           ("mlnet_jax.first_conv", "READS_THE_IMAGE"): False},
    "v3": {("mlnet_jax.first_conv", "kernel_applies"): _version("v3_kernel_applies")},
    "v2.1": {("mlnet_jax.first_conv", "kernel_applies"): _version("v3_kernel_applies"),
             ("mlnet_jax.vgg", "relu_max_pool_2x2"): _version("v2_1_relu_max_pool")},
    "v1": _V1,
    "v0": {**_V1, ("mlnet_jax.vgg", "relu_max_pool_2x2"): _version("v0_relu_max_pool"),
           ("mlnet_jax.head", "dropout_keep_mask"): _version("v0_dropout_keep_mask")},
    "v0_pool4": {**_V1, ("mlnet_jax.vgg", "relu_max_pool_2x2"): _version("v0_relu_max_pool")},
    "v0_dropout": {**_V1, ("mlnet_jax.head", "dropout_keep_mask"):
                   _version("v0_dropout_keep_mask")},
    "cand_rgb8": {("jax.lax", "conv_general_dilated"):
                  _conv_candidate("conv_with_padded_colour_channels")},
    "cand_conv1_direct": _READS_THE_IMAGE,
    "cand_prepared_weights": {},  # measure_predict prepares the variables
    "cand_pooled_bias": _bias_gradients("pooled"),
    "cand_bias_kernels": _bias_gradients(*BIAS_GRADIENT_PARTS),
    "cand_pool_argmax": {("mlnet_jax.vgg", "relu_max_pool_2x2"): _sibling_function(
        "pool_argmax", "relu_max_pool_2x2")},
    "cand_conv12t_pool": _second_conv("forward"),
    "cand_conv12t_pool_s2": _second_conv("forward", stages=2),
    "cand_conv12t_dgrad": _second_conv("forward", "input_gradient"),
    "cand_conv12t_bwd": _second_conv(*SECOND_CONV_PARTS),
    "cand_head_kernel": _HEAD_KERNEL,
    "cand_all": {**_second_conv(*SECOND_CONV_PARTS), **_bias_gradients(*BIAS_GRADIENT_PARTS),
                 **_HEAD_KERNEL,
                 **_READS_THE_IMAGE},
}
COMPILER_OPTIONS = {  # variant -> XLA debug options, passed to this executable's compile only
    "xla_no_command_buffers": {"xla_gpu_enable_command_buffer": ""},  # no CUDA graphs
    "xla_runtime_fusion": {"xla_gpu_use_runtime_fusion": True},  # cuDNN runtime-compiled fusions
    # Convolutions and their element-wise users as cuDNN graphs (dgrad + the next ReLU mask).
    "xla_conv_fusion": {"xla_gpu_experimental_enable_conv_fusion": True},
    "xla_autotune_0": {"xla_gpu_autotune_level": 0},  # cuDNN's heuristic choice: compile time
}
for _name in COMPILER_OPTIONS:  # the rest: the code as it is, other options
    VARIANTS.setdefault(_name, {})
PREPARED_VARIANTS = {"cand_prepared_weights"}  # predict's parameters cast and laid out once
PREDICT_ONLY_VARIANTS = {*PREPARED_VARIANTS, "cand_head_kernel"}
# The others change gradients only.
FORWARD_VARIANTS = {"v4", "v3", "v0", "v0_pool4", "cand_rgb8", "cand_conv1_direct", "cand_conv12t_pool",
                    "cand_conv12t_pool_s2", "cand_all",
                    *PREDICT_ONLY_VARIANTS, *COMPILER_OPTIONS}


class patched:
    """Context manager applying one of VARIANTS (None: the code as it is) while tracing;
    ``compiler_options`` are the variant's XLA options for ``compile_timed``."""

    def __init__(self, variant: str | None):
        self.variant = variant
        self.patches = VARIANTS[variant] if variant else {}
        self.compiler_options = COMPILER_OPTIONS.get(variant, {})
        self.saved = []

    def __enter__(self):
        import importlib

        import jax
        _LOADED.setdefault("conv", jax.lax.conv_general_dilated)
        for (module_name, attribute), replacement in self.patches.items():
            module = importlib.import_module(module_name)
            self.saved.append((module, attribute, getattr(module, attribute)))
            if replacement is COUNTED:
                replacement = _counting((module_name, attribute), getattr(module, attribute))
            setattr(module, attribute, replacement)
        self.rewrites_before = _conv_rewrites()
        return self

    def __exit__(self, exc_type, *exc):
        for module, attribute, value in reversed(self.saved):
            setattr(module, attribute, value)
        self.saved.clear()
        if (exc_type is None and (self.variant or "").startswith("cand_")
                and _conv_rewrites() == self.rewrites_before):
            raise RuntimeError(f"{self.variant} changed no convolution of the program traced "
                               "(its rewrite matched none): it would measure the code as it is")


def _conv_rewrites() -> int:
    """Convolutions the candidates loaded so far have rewritten (``candidates._intercept``,
    a sibling module's ``rewritten``, the calls of a ``COUNTED`` package function)."""
    return (sum(getattr(conv, "rewritten", 0) for conv in _LOADED.values())
            + sum(getattr(module, "rewritten", 0) for module in _SIBLINGS.values())
            + sum(_COUNTS.values()))


def _counting(key: tuple[str, str], function):
    """``function``, its calls counted in ``_COUNTS[key]``."""
    @functools.wraps(function)
    def call(*args, **kwargs):
        _COUNTS[key] = _COUNTS.get(key, 0) + 1
        return function(*args, **kwargs)
    return call


# --------------------------------------------------------------------------- JAX parts

def _jax():
    import jax
    import jax.numpy as jnp
    return jax, jnp


def random_params(h: int, w: int, width_multiplier: float, seed: int = 0) -> dict:
    """Host-made LeCun-normal weights with ``initial_params``' shapes and zero biases and prior:
    no compile of ``model.init`` per size, which on a GPU costs seconds of the lease."""
    jax, jnp = _jax()
    from mlnet_jax.inference import ModelInfo

    model = ModelInfo(input_size=(h, w), width_multiplier=width_multiplier).build()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))["params"]
    rng = np.random.default_rng(seed)

    def make(path, spec):
        leaf = jax.tree_util.keystr(path)
        if "kernel" in leaf:
            fan_in = math.prod(spec.shape[:-1])
            return (rng.standard_normal(spec.shape) / math.sqrt(fan_in)).astype(np.float32)
        return np.zeros(spec.shape, np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def synthetic_batch(b: int, h: int, w: int, sharding, seed: int = 0) -> dict:
    """Random uint8 images and [0, 1] targets on the devices (never zeros: METHOD.md)."""
    jax, _ = _jax()
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    target = rng.uniform(0, 1, (b, h // OUTPUT_STRIDE, w // OUTPUT_STRIDE, 1)).astype(np.float32)
    return {"image": jax.device_put(image, sharding), "target": jax.device_put(target, sharding)}


def device_memory() -> dict:
    """The allocator's counters (GPU/TPU); None where the backend keeps none (CPU).
    ``peak_bytes_in_use`` is the process's peak so far: it never goes down between cases."""
    jax, _ = _jax()
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 — backends without stats raise or return None
        stats = None
    stats = stats or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}


def executable_memory(compiled) -> dict | None:
    """XLA's own account of one executable: arguments, outputs, aliased (donated), temporaries;
    ``peak_estimate_bytes`` = arguments + outputs − aliased + temporaries. Per case, unlike the
    process-wide peak."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}
    out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) + out.get("output_size_in_bytes", 0)
                                  - out.get("alias_size_in_bytes", 0) + out.get("temp_size_in_bytes", 0))
    return out


def xla_cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_timed(jitted, *args, compiler_options: dict | None = None):
    """(compiled, lower seconds, compile seconds) — ahead of time, so the executable's memory
    and cost analyses come with it and the timed calls skip jit's cache lookup."""
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    t_lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    return compiled, t_lower, time.perf_counter() - t


class Bench:
    """Shared state of one run: the mesh, the measured ceilings, parameters per size, results."""

    def __init__(self, args):
        jax, _ = _jax()
        from mlnet_jax.sharding import batch_sharding, data_mesh, replicated

        self.args = args
        self.mesh = data_mesh()
        self.rep = replicated(self.mesh)
        self.data = batch_sharding(self.mesh)
        self.platform = jax.devices()[0].platform
        self.card = jax.devices()[0].device_kind
        self.on_accelerator = self.platform != "cpu"
        self._params: dict = {}
        self.ceilings: dict = {}
        self.kept: dict = {}  # (case, dtype, mode or "predict") -> [compiled, state or inputs, rate]
        self.profiles: dict = {}  # "case dtype mode" -> kernel_profile.summarize
        q = args.quick
        self.warmup = 1 if q else 3
        self.steps = 2 if q else 10
        self.repeats = 2 if q else 5

    def params(self, h: int, w: int):
        """A fresh device copy (the train step donates its state) of this size's weights."""
        jax, _ = _jax()
        if (h, w) not in self._params:
            self._params[(h, w)] = jax.device_put(
                random_params(h, w, self.args.width_multiplier), self.rep)
        return jax.tree.map(lambda x: x.copy(), self._params[(h, w)])

    def ceiling(self, dtype: str) -> float | None:
        """The measured one-device matmul rate times the devices a step is split over."""
        jax, _ = _jax()
        entry = self.ceilings.get(dtype)
        return entry["tflops"] * jax.device_count() if entry else None


def measure_matmul(bench: Bench, dtype: str) -> dict:
    """The device's dense matmul rate in ``dtype`` at default precision (random operands)."""
    jax, jnp = _jax()
    n = bench.args.matmul_size or (8192 if bench.on_accelerator else (256 if bench.args.quick else 512))
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(k2, (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.matmul)
    compiled, _, _ = compile_timed(f, a, b)
    out = compiled(a, b)
    out.block_until_ready()
    iters = 10 if bench.on_accelerator else 2
    times = []
    for _ in range(3 if bench.args.quick else 5):
        t = time.perf_counter()
        for _ in range(iters):
            out = compiled(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / iters)
    tflops = 2 * n ** 3 / _median(times) / 1e12
    return {"dtype": dtype, "n": n, "ms": 1e3 * _median(times), "tflops": tflops,
            "precision": str(getattr(jax.config, "jax_default_matmul_precision", None))}


def time_steps(bench: Bench, step) -> tuple[list[float], dict | None]:
    """Seconds per step of ``bench.repeats`` repeats of ``bench.steps`` calls of ``step`` (which
    returns what to wait for), with no host sync inside a repeat, so dispatch runs ahead of the
    device; and the GPU's clocks and power meanwhile (``gpu_monitor``; None off a GPU)."""
    jax, _ = _jax()
    per_step = []
    with sibling("gpu_monitor").GpuMonitor() as monitor:
        for _ in range(bench.repeats):
            t = time.perf_counter()
            for _ in range(bench.steps):
                out = step()
            jax.block_until_ready(out)
            per_step.append((time.perf_counter() - t) / bench.steps)
    return per_step, monitor.summary


def _row(bench: Bench, task: str, dtype: str, mode: str | None, b: int, h: int, w: int,
         per_step: list[float], first_step_s: float, t_lower: float, t_compile: float,
         flops_per_image: int, compiled, sweep: bool, gpu: dict | None) -> dict:
    step_s = _median(per_step)
    tflops = flops_per_image * b / step_s / 1e12
    ceiling = bench.ceiling(dtype)
    return {
        "task": task, "dtype": dtype, "mode": mode, "batch": b, "rows": h, "cols": w,
        "case": case_name(b, h, w), "sweep": sweep,
        "images_per_s": b / step_s, "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(per_step),
        "step_ms_repeats": [round(1e3 * t, 4) for t in per_step],
        "spread_pct": 100 * (max(per_step) - min(per_step)) / step_s,
        "steps_per_repeat": bench.steps, "repeats": bench.repeats,
        "flops_per_image": flops_per_image, "tflops": tflops,
        "ceiling_tflops": ceiling, "ceiling_fraction": tflops / ceiling if ceiling else None,
        "xla_cost_flops_per_step": xla_cost_flops(compiled),
        "lower_s": t_lower, "compile_s": t_compile, "first_step_s": first_step_s,
        "gpu_during_timing": gpu,
        "executable_memory": executable_memory(compiled), "device_memory": device_memory(),
    }


def dump_hlo(bench: Bench, compiled, name: str, variant: str | None, sweep: bool) -> None:
    """The optimised HLO (fusions, cuDNN calls, layouts) of each non-sweep executable, gzipped
    into --dump-dir: what to read, at no device time, before choosing the next lever."""
    if not bench.args.dump_dir or sweep:
        return
    import gzip
    path = Path(bench.args.dump_dir) / f"hlo_{name}{'_' + variant if variant else ''}.txt.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_bytes(gzip.compress(compiled.as_text().encode()))
    except Exception as e:  # noqa: BLE001 — a dump must never cost the measurement
        print(f"HLO dump {path.name} failed: {e!r}", flush=True)


def _optimizer():
    from mlnet_jax.optim import make_optimizer
    return make_optimizer(1e-3, 5e-4, 0.9)  # the paper's optimiser (configs/default.py)


def fresh_state(bench: Bench, h: int, w: int, frozen: int):
    """The train state every measurement of this size starts from, on the devices."""
    jax, _ = _jax()
    from mlnet_jax.train import create_train_state
    return jax.device_put(create_train_state(bench.params(h, w), _optimizer(), frozen, seed=0),
                          bench.rep)


def relative_difference(got, expected) -> dict:
    """How far a variant's result is from the code's, leaf by leaf, the worst leaf: ``max``,
    the largest |got − expected| over the largest |expected|, and ``l2``, ‖got − expected‖
    over ‖expected‖ (an error confined to small values shows there). bfloat16 summed in
    another order gives ~1e-2, a wrong kernel ~1; anything not finite, or a leaf of zeros
    that the variant made non-zero, is inf."""
    got, expected = _leaves(got), _leaves(expected)
    if [g.shape for g in got] != [e.shape for e in expected]:
        raise ValueError(f"results of other shapes: {[g.shape for g in got][:4]} against "
                         f"{[e.shape for e in expected][:4]}")
    worst = {"max": 0.0, "l2": 0.0}
    for g, e in zip(got, expected):
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(e))):
            return {"max": math.inf, "l2": math.inf}
        d = g - e
        for key, size in (("max", lambda a: np.max(np.abs(a), initial=0.0)),
                          ("l2", np.linalg.norm)):
            scale, off = float(size(e)), float(size(d))
            ratio = off / scale if scale else (0.0 if off == 0 else math.inf)
            worst[key] = max(worst[key], ratio)
    return worst


def _leaves(tree) -> list:
    jax, _ = _jax()
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


DIFFERENT_DROPOUT = {"v0", "v0_dropout"}  # variants drawing other dropout masks: other steps


def train_agreement(bench: Bench, code_step, variant_step, b: int, h: int, w: int,
                    frozen: int) -> dict:
    """One step of the variant's executable and two of the code's from the same state and batch,
    on the card: the losses and how far the variant's parameter update is from the code's,
    beside how far the code's is from itself (the card's own noise: atomics, algorithms)."""
    batch = synthetic_batch(b, h, w, bench.data)
    outcomes = []
    for step in (code_step, code_step, variant_step):
        state = fresh_state(bench, h, w, frozen)
        before = _leaves(state.trainable)  # host copies: the step donates the state
        state, metrics = step(state, batch)
        update = [new - old for new, old in zip(_leaves(state.trainable), before)]
        outcomes.append((float(metrics["loss"]), update))
    (code_loss, code_update), (_, code_again), (loss, update) = outcomes
    return {"loss": loss, "code_loss": code_loss,
            "update_difference": relative_difference(update, code_update),
            "code_update_difference": relative_difference(code_again, code_update)}


def predict_agreement(code, code_inputs, variant, inputs) -> dict:
    """The variant's maps against the code's on the same images, beside the code's against
    themselves."""
    expected = code(*code_inputs)
    return {"maps_difference": relative_difference(variant(*inputs), expected),
            "code_maps_difference": relative_difference(code(*code_inputs), expected)}


def _agreement(check, *args) -> dict:
    """``check(*args)``, or why it failed: a comparison must never cost the measured rate."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": repr(e)[:300]}


def measure_train(bench: Bench, b: int, h: int, w: int, dtype: str, mode: str,
                  sweep: bool = False, keep: bool = False, variant: str | None = None) -> dict:
    """images/s of the real jitted train step on a fixed device-resident batch; for a variant
    of a kept case, also how its step's result compares with the code's."""
    jax, jnp = _jax()
    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.train import compile_steps

    frozen = REPORT_FROZEN_CONVS if mode == "frozen" else 0
    info = ModelInfo(input_size=(h, w), preprocessing="caffe",
                     width_multiplier=bench.args.width_multiplier)
    model = info.build(jnp.dtype(dtype))
    tx = _optimizer()
    state = fresh_state(bench, h, w, frozen)
    batch = synthetic_batch(b, h, w, bench.data)
    train_fn, _ = compile_steps(model, tx, info.preprocessing, bench.mesh)
    with patched(variant) as patch:
        compiled, t_lower, t_compile = compile_timed(train_fn, state, batch,
                                                     compiler_options=patch.compiler_options)

    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - t
    for _ in range(bench.warmup - 1):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    def step():
        nonlocal state, metrics
        state, metrics = compiled(state, batch)
        return state, metrics

    per_step, gpu = time_steps(bench, step)
    flops = train_flops(h, w, frozen, bench.args.width_multiplier)
    row = _row(bench, "train", dtype, mode, b, h, w, per_step, first, t_lower, t_compile, flops,
               compiled, sweep, gpu)
    row["frozen_convs"] = frozen
    row["variant"] = variant
    dump_hlo(bench, compiled, f"train_{dtype}_{mode}_{case_name(b, h, w)}", variant, sweep)
    row["nonfinite_last_step"] = int(metrics["nonfinite"])
    key = (case_name(b, h, w), dtype, mode)
    if variant and key in bench.kept:
        row["vs_code"] = _agreement(train_agreement, bench, bench.kept[key][0], compiled,
                                    b, h, w, frozen)
        if variant in DIFFERENT_DROPOUT:
            row["vs_code"]["differs_by_design"] = "other dropout masks"
    if keep:
        bench.kept[key] = [compiled, state, row["images_per_s"]]
    return row


def measure_predict(bench: Bench, b: int, h: int, w: int, dtype: str, sweep: bool = False,
                    keep: bool = False, variant: str | None = None) -> dict:
    """images/s of ``make_predict_fn`` (uint8 in, normalised on the device, float32 maps out)."""
    jax, jnp = _jax()
    from mlnet_jax.inference import ModelInfo, make_predict_fn

    info = ModelInfo(input_size=(h, w), preprocessing="caffe",
                     width_multiplier=bench.args.width_multiplier)
    model = info.build(jnp.dtype(dtype))
    variables = {"params": bench.params(h, w)}
    images = synthetic_batch(b, h, w, bench.data)["image"]
    predict = make_predict_fn(model, info.preprocessing, bench.mesh)
    prepared = variant in PREPARED_VARIANTS and sibling("prepared_weights")
    with patched(variant) as patch:
        if prepared:
            predict, variables = prepared.prepare(predict, variables, jnp.dtype(dtype))
        compiled, t_lower, t_compile = compile_timed(predict, variables, images,
                                                     compiler_options=patch.compiler_options)
        if prepared:
            variables, prepared_parameters = prepared.place(predict, compiled, variables)
    t = time.perf_counter()
    out = compiled(variables, images)
    out.block_until_ready()
    first = time.perf_counter() - t
    for _ in range(bench.warmup - 1):
        out = compiled(variables, images)
    out.block_until_ready()
    per_step, gpu = time_steps(bench, lambda: compiled(variables, images))
    flops = forward_flops(h, w, bench.args.width_multiplier)
    row = _row(bench, "predict", dtype, None, b, h, w, per_step, first, t_lower, t_compile,
               flops, compiled, sweep, gpu)
    row["variant"] = variant
    if prepared:
        row["prepared_parameters"] = prepared_parameters
    dump_hlo(bench, compiled, f"predict_{dtype}_{case_name(b, h, w)}", variant, sweep)
    key = (case_name(b, h, w), dtype, "predict")
    if variant and key in bench.kept:
        code, code_inputs, _ = bench.kept[key]
        row["vs_code"] = _agreement(predict_agreement, code, code_inputs, compiled,
                                    (variables, images))
    if keep:
        bench.kept[key] = [compiled, (variables, images), row["images_per_s"]]
    return row


def profile_kept(bench: Bench, key: tuple, b: int, h: int, w: int) -> tuple[str, dict]:
    """Per-kernel device time of a kept executable over a few traced steps
    (``kernel_profile.py``); the trace itself stays in --profile DIR. Returns
    ("profile", every summary so far) for the result JSON."""
    jax, _ = _jax()
    label = " ".join(key)
    if key not in bench.kept:
        bench.profiles[label] = {"skipped": "its measurement did not run"}
        return "profile", bench.profiles
    profiler = sibling("kernel_profile")
    kept = bench.kept[key]
    compiled, rate = kept[0], kept[2]
    if key[2] == "predict":
        def run_step():
            return compiled(*kept[1])
    else:
        batch = synthetic_batch(b, h, w, bench.data)

        def run_step():  # the state is donated: keep the new one for the next user
            kept[1], metrics = compiled(kept[1], batch)
            return metrics
    steps = 2 if bench.args.quick else 5
    jax.block_until_ready(run_step())
    t = time.perf_counter()
    with sibling("gpu_monitor").GpuMonitor() as monitor:
        events = profiler.trace_steps(run_step, steps, Path(bench.args.profile) / "_".join(key))
    summary = profiler.summarize(events, compiled.as_text(), steps, step_ms=1e3 * b / rate)
    summary.update(case=key[0], dtype=key[1], mode=key[2], traced_s=time.perf_counter() - t,
                   gpu_during_trace=monitor.summary)
    bench.profiles[label] = summary
    return "profile", bench.profiles


# --------------------------------------------------------------------------- compile probes

def run_probe(args) -> int:
    """Child process: a training start as ``train_and_evaluate`` makes one (compilation cache
    on, ``initial_params``, ``compile_steps``), timing the first step to completion."""
    t_imports = time.perf_counter()
    jax, jnp = _jax()
    from mlnet_jax.compilation_cache import enable_compilation_cache
    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.sharding import batch_sharding, data_mesh, replicated
    from mlnet_jax.train import compile_steps, create_train_state, initial_params

    enable_compilation_cache(args.probe_cache_dir)
    t_backend = time.perf_counter()
    mesh = data_mesh()
    t_state = time.perf_counter()
    b, h, w = parse_cases(args.probe)[0]
    dtype, mode = args.dtypes.split(",")[0], args.modes.split(",")[0]
    info = ModelInfo(input_size=(h, w), preprocessing="caffe",
                     width_multiplier=args.width_multiplier)
    model = info.build(jnp.dtype(dtype))
    tx = make_optimizer(1e-3, 5e-4, 0.9)
    params = initial_params(model, info, jax.random.PRNGKey(0), None)
    frozen = REPORT_FROZEN_CONVS if mode == "frozen" else 0
    state = jax.device_put(create_train_state(params, tx, frozen, seed=0), replicated(mesh))
    batch = synthetic_batch(b, h, w, batch_sharding(mesh))
    jax.block_until_ready((state, batch))
    train_fn, _ = compile_steps(model, tx, info.preprocessing, mesh)
    t_first = time.perf_counter()
    state, metrics = train_fn(state, batch)
    jax.block_until_ready((state, metrics))
    t_second = time.perf_counter()
    state, metrics = train_fn(state, batch)
    jax.block_until_ready((state, metrics))
    t_end = time.perf_counter()
    result = {"case": case_name(b, h, w), "dtype": dtype, "mode": mode,
              "python_imports_s": t_imports - T0,
              "jax_imports_s": t_backend - t_imports, "backend_init_s": t_state - t_backend,
              "state_s": t_first - t_state, "first_step_s": t_second - t_first,
              "second_step_s": t_end - t_second, "process_to_first_step_s": t_second - T0}
    print("PROBE_JSON " + json.dumps(result), flush=True)
    return 0


def compile_cache_probes(args, case, dtype: str, mode: str, cache_dir: str, budget_s: float) -> dict:
    """Cold, then warm: two fresh processes sharing one new compilation-cache directory."""
    out = {"cache_dir": cache_dir, "case": case_name(*case), "dtype": dtype, "mode": mode}
    for label in ("cold", "warm"):
        remaining = budget_s - elapsed()
        if remaining < 10:
            out[label] = {"skipped": "deadline"}
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", case_name(*case),
               "--dtypes", dtype, "--modes", mode, "--probe-cache-dir", cache_dir,
               "--width-multiplier", str(args.width_multiplier)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=min(remaining, 3600.0), cwd=REPO)
        except subprocess.TimeoutExpired:
            out[label] = {"error": f"timed out after {remaining:.0f} s"}
            continue
        wall = time.perf_counter() - t
        lines = [l for l in proc.stdout.splitlines() if l.startswith("PROBE_JSON ")]
        if proc.returncode != 0 or not lines:
            out[label] = {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
            continue
        out[label] = {**json.loads(lines[-1][len("PROBE_JSON "):]), "process_wall_s": wall,
                      "cache_files": sum(1 for p in Path(cache_dir).rglob("*") if p.is_file())}
    return out


# --------------------------------------------------------------------------- input pipeline

def write_fake_salicon(root: Path, n: int, rows: int = 480, cols: int = 640) -> list[dict]:
    """n SALICON-like records (640×480 JPEG q90, ~130 kB; PNG map) written under ``root``
    as images/*.jpg and maps/*.png, returned as records in the pipeline's schema."""
    gen = sibling("input_pipeline")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> dict:
        rng = np.random.default_rng(1000 + i)
        from PIL import Image
        stem = f"COCO_train2014_{i + 1:012d}"
        buf = io.BytesIO()
        Image.fromarray(gen._fake_photo(rng, rows, cols)).save(buf, format="JPEG", quality=90)
        (root / "images" / f"{stem}.jpg").write_bytes(buf.getvalue())
        mbuf = io.BytesIO()
        Image.fromarray(gen._fake_map(rng, rows, cols)).save(mbuf, format="PNG")
        (root / "maps" / f"{stem}.png").write_bytes(mbuf.getvalue())
        return {"image": (root / "images" / f"{stem}.jpg").read_bytes(),
                "saliency_map": (root / "maps" / f"{stem}.png").read_bytes(),
                "fixations": np.zeros((0, 2), np.int32),
                "image_size": np.asarray((rows, cols), np.int32),
                "file_name": f"{stem}.jpg", "category": ""}

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, range(n)))


def measure_pipeline(bench: Bench, key: tuple, b: int, h: int, w: int) -> dict:
    """End-to-end: ``train_loader`` → ``prefetch_to_device`` → the kept compiled train step,
    against the synthetic-batch rate of the same executable measured right after."""
    jax, _ = _jax()
    from mlnet_jax.input_pipeline import RecordSource, prefetch_to_device, train_loader

    args = bench.args
    compiled = bench.kept[key][0]
    out = {"case": key[0], "dtype": key[1], "mode": key[2], "records": args.pipeline_records,
           "image_size": [480, 640], "cpu_count": os.cpu_count(), "runs": []}

    def train_step(batch):
        """One step on the kept state, kept at once: every call donates the previous one, so
        a failure here must not leave the profile a deleted state."""
        bench.kept[key][1], _ = compiled(bench.kept[key][1], batch)
        return bench.kept[key][1]

    with tempfile.TemporaryDirectory(prefix="mlnet_fake_salicon_") as tmp:
        t = time.perf_counter()
        records = write_fake_salicon(Path(tmp), args.pipeline_records)
        out["write_records_s"] = time.perf_counter() - t
        out["mean_jpeg_kb"] = float(np.mean([len(r["image"]) for r in records]) / 1024)
        source = RecordSource(records, f"fake SALICON-like 640x480 x{len(records)}")
        warm = 2 if args.quick else 5
        windows, steps = (2, 2) if args.quick else (3, 10)
        for workers in args.pipeline_workers:
            if elapsed() > args.deadline:
                out["runs"].append({"worker_count": workers, "skipped": "deadline"})
                continue
            loader = prefetch_to_device(
                train_loader(source, model_size=(h, w), global_batch_size=b, seed=0,
                             shard_index=0, shard_count=1, worker_count=workers),
                size=2, sharding=bench.data)
            run = {"worker_count": workers}
            t = time.perf_counter()
            for _ in range(warm):
                batch = next(loader)
            jax.block_until_ready(batch)
            run["loader_start_s"] = time.perf_counter() - t
            t = time.perf_counter()  # the loader alone: the host's ceiling
            for _ in range(windows * steps):
                batch = next(loader)
            jax.block_until_ready(batch)
            run["loader_only_images_per_s"] = windows * steps * b / (time.perf_counter() - t)
            for _ in range(warm):
                state = train_step(next(loader))
            jax.block_until_ready(state)
            rates = []
            t_all = time.perf_counter()
            for _ in range(windows):
                t = time.perf_counter()
                for _ in range(steps):
                    state = train_step(next(loader))
                jax.block_until_ready(state)
                rates.append(steps * b / (time.perf_counter() - t))
            run["images_per_s"] = windows * steps * b / (time.perf_counter() - t_all)
            run["window_images_per_s"] = rates
            del loader, batch
            synth = synthetic_batch(b, h, w, bench.data, seed=1)
            for _ in range(warm):
                state = train_step(synth)
            jax.block_until_ready(state)
            t = time.perf_counter()
            for _ in range(windows * steps):
                state = train_step(synth)
            jax.block_until_ready(state)
            run["synthetic_images_per_s"] = windows * steps * b / (time.perf_counter() - t)
            run["ratio_to_synthetic"] = run["images_per_s"] / run["synthetic_images_per_s"]
            out["runs"].append(run)
    done = [r for r in out["runs"] if "ratio_to_synthetic" in r]
    if done:
        # Each run has its own synthetic reference from the same minute: rank by the ratio.
        best = max(done, key=lambda r: r["ratio_to_synthetic"])
        out.update(images_per_s=best["images_per_s"], best_worker_count=best["worker_count"],
                   synthetic_images_per_s=best["synthetic_images_per_s"],
                   ratio_to_synthetic=best["ratio_to_synthetic"])
    return out


def measure_predict_files(bench: Bench, key: tuple, b: int, h: int, w: int) -> dict:
    """End-to-end prediction as ``python -m mlnet_jax.predict`` runs it on a folder: fake
    640×480 JPEG files decoded and letterboxed in threads, ``Predictor.stream`` batches of
    ``b``, maps resized to each image's size and written as PNG files; against the synthetic
    rate of the kept ``predict`` measurement (the same function and batch), with the time in
    each stage (``predict_host.StageClock``: the 2026-11-27 H200 run made 64 images/s)."""
    _, jnp = _jax()
    from mlnet_jax.inference import ModelInfo, Predictor
    from mlnet_jax.predict import build_parser

    args = bench.args
    info = ModelInfo(input_size=(h, w), preprocessing="caffe",
                     width_multiplier=args.width_multiplier)
    predictor = Predictor(info.build(jnp.dtype(key[1])), {"params": bench.params(h, w)}, info,
                          batch_size=b, mesh=bench.mesh)
    workers = build_parser().get_default("workers")  # the command's default
    with tempfile.TemporaryDirectory(prefix="mlnet_fake_photos_") as tmp:
        write_fake_salicon(Path(tmp), args.pipeline_records)
        run = sibling("predict_host").measure(Path(tmp) / "images", Path(tmp) / "maps_out",
                                              workers, 2 if args.quick else 3, device=predictor)
    synthetic = bench.kept[key][2]
    return {"case": key[0], "dtype": key[1], "records": args.pipeline_records,
            "workers": workers, "image_size": [480, 640], "writes": "grey PNG maps at 640x480",
            "images_per_s": run["images_per_s"], "window_images_per_s": run["repeats"],
            "maps_written": run["maps_written"], "stage_ms_per_image": run["stage_ms_per_image"],
            "workers_busy": run["workers_busy"], "synthetic_images_per_s": synthetic,
            "ratio_to_synthetic": run["images_per_s"] / synthetic}


# --------------------------------------------------------------------------- the run

def environment(bench: Bench | None) -> dict:
    jax, _ = _jax()
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("XLA_", "JAX_", "TF_", "CUDA_VISIBLE", "NVIDIA_TF32"))}
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "software": software_versions(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "env": env,
            "jax_config": {k: str(getattr(jax.config, k, None)) for k in (
                "jax_default_matmul_precision", "jax_compilation_cache_dir",
                "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_enable_xla_caches")}}
    if bench is not None:
        info.update(backend=bench.platform, card=bench.card, device_count=jax.device_count(),
                    devices=[str(d) for d in jax.devices()])
    return info


def save_topology(bench: Bench, directory: Path) -> str | None:
    """The card's own description (XLA's target config: SMs, bandwidth, caches) as
    ``topology-<card>.pb``, which ``deviceless.py --card`` compiles for without the card."""
    if not bench.on_accelerator:
        return None
    from jax.experimental import topologies
    path = directory / f"topology-{card_slug(bench.card)}.pb"
    try:
        path.write_bytes(topologies.get_attached_topology().serialize())
    except Exception as e:  # noqa: BLE001 — a description must never cost the measurement
        print(f"topology not saved: {e!r}", flush=True)
        return None
    return path.name


def plan(args, bench: Bench) -> list[tuple[str, callable]]:
    """(label, thunk) in priority order; each thunk returns a result row (or dict)."""
    cases = args.cases
    primary = "bfloat16" if "bfloat16" in args.dtypes else args.dtypes[0]
    others = [d for d in args.dtypes if d != primary]
    head = cases[-1]
    tasks = []

    def for_case(case, dtype, keep_head):
        b, h, w = case
        items = []
        if "full" in args.modes:
            items.append((f"train {dtype} full {case_name(*case)}",
                          lambda: measure_train(bench, b, h, w, dtype, "full", keep=keep_head)))
        if not args.no_predict:
            items.append((f"predict {dtype} {case_name(*case)}",
                          lambda: measure_predict(bench, b, h, w, dtype, keep=keep_head)))
        if "frozen" in args.modes:
            items.append((f"train {dtype} frozen {case_name(*case)}",
                          lambda: measure_train(bench, b, h, w, dtype, "frozen")))
        return items

    def variant_items(variant):  # the headline steps with a variant's levers
        items = []
        if "full" in args.modes and variant not in PREDICT_ONLY_VARIANTS:
            items.append((f"train {primary} full {case_name(*head)} [{variant}]",
                          lambda: measure_train(bench, *head, primary, "full", variant=variant)))
        if variant in FORWARD_VARIANTS and not args.no_predict:
            items.append((f"predict {primary} {case_name(*head)} [{variant}]",
                          lambda: measure_predict(bench, *head, primary, variant=variant)))
        return items

    tasks += for_case(head, primary, True)
    if args.pipeline and "full" in args.modes:
        key = (case_name(*head), primary, "full")
        tasks.append((f"pipeline {primary} full {case_name(*head)}",
                      lambda key=key: ("pipeline", measure_pipeline(bench, key, *head))
                      if key in bench.kept else ("pipeline", {"skipped": "headline train step missing"})))
    if args.profile:
        for mode in ("full", "predict"):
            profiled = (case_name(*head), primary, mode)
            tasks.append((f"profile {' '.join(profiled)}",
                          lambda profiled=profiled: profile_kept(bench, profiled, *head)))
    for variant in args.variants:
        tasks += variant_items(variant)
    if args.pipeline and not args.no_predict:
        key = (case_name(*head), primary, "predict")
        tasks.append((f"predict files {primary} {case_name(*head)}",
                      lambda key=key: ("predict_files", measure_predict_files(bench, key, *head))
                      if key in bench.kept else ("predict_files", {"skipped": "headline predict missing"})))
    for case in reversed(cases[:-1]):
        tasks += for_case(case, primary, False)
    if args.batch_sweep:
        _, h, w = head
        measured = {c[0] for c in cases if c[1:] == (h, w)}
        for sb in args.sweep_batches:
            if sb in measured:
                continue
            tasks.append((f"sweep train {primary} full {case_name(sb, h, w)}",
                          lambda sb=sb: measure_train(bench, sb, h, w, primary, "full", sweep=True)))
            if not args.no_predict:
                tasks.append((f"sweep predict {primary} {case_name(sb, h, w)}",
                              lambda sb=sb: measure_predict(bench, sb, h, w, primary, sweep=True)))
    for dtype in others:
        for case in reversed(cases):
            tasks += for_case(case, dtype, False)
    return tasks


def _mode_label(row: dict) -> str:
    return (row["mode"] or "-") + (f"[{row['variant']}]" if row.get("variant") else "")


def _gpu_columns(row: dict) -> str:
    """Median SM clock and mean power while the row was timed ('-' without samples)."""
    gpu = row.get("gpu_during_timing") or {}
    mhz, watts = gpu.get("sm_mhz_median"), gpu.get("power_w_mean")
    return (f"{mhz:6.0f}" if mhz else f"{'-':>6}") + " " + (f"{watts:4.0f}" if watts else f"{'-':>4}")


def print_table(result: dict) -> None:
    rows = result.get("results", [])
    print()
    print(f"mlnet_jax throughput on {result.get('card')} ({result.get('backend')}), "
          f"jax {result.get('software', {}).get('jax')}")
    for dtype, c in result.get("matmul_ceiling", {}).items():
        print(f"  matmul ceiling {dtype}: {c['tflops']:.1f} TFLOP/s (n={c['n']})")
    width = max([16] + [len(_mode_label(r)) for r in rows if "error" not in r])
    header = f"{'task':8} {'dtype':9} {'mode':{width}} {'case':>12} {'img/s':>10} {'ms/step':>9} " \
             f"{'TFLOP/s':>8} {'%ceil':>6} {'compile_s':>9} {'mem_GiB':>8} {'SM_MHz':>6} {'W':>4}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r.get('label', '?'):47} ERROR {r['error'][:60]}")
            continue
        mem = (r.get("executable_memory") or {}).get("peak_estimate_bytes")
        frac = r.get("ceiling_fraction")
        print(f"{r['task'] + ('*' if r.get('sweep') else ''):8} {r['dtype']:9} {_mode_label(r):{width}} "
              f"{r['case']:>12} {r['images_per_s']:10.1f} {r['step_ms']:9.2f} {r['tflops']:8.2f} "
              f"{(100 * frac if frac else float('nan')):6.1f} {r['compile_s']:9.1f} "
              f"{(mem / 2**30 if mem else float('nan')):8.2f} {_gpu_columns(r)}")
    cc = result.get("compile_cache") or {}
    if cc:
        def fmt(label):
            entry = cc.get(label) or {}
            if "first_step_s" not in entry:
                return f"{label}: {entry.get('error') or entry.get('skipped') or 'n/a'}"[:70]
            return (f"{label}: first step {entry['first_step_s']:.1f} s "
                    f"(process start to first step {entry['process_to_first_step_s']:.1f} s)")
        print(f"compile cache, train {cc.get('dtype')} {cc.get('mode')} {cc.get('case')}: "
              f"{fmt('cold')}; {fmt('warm')}")
    pipe = result.get("pipeline") or {}
    if "ratio_to_synthetic" in pipe:
        print(f"pipeline {pipe['case']}: {pipe['images_per_s']:.1f} img/s end to end "
              f"(workers={pipe['best_worker_count']}) vs {pipe['synthetic_images_per_s']:.1f} "
              f"synthetic = {pipe['ratio_to_synthetic']:.3f}; loader alone "
              + ", ".join(f"{r.get('loader_only_images_per_s', float('nan')):.0f}"
                          for r in pipe["runs"]) + " img/s")
    elif pipe:
        print(f"pipeline: {pipe.get('skipped') or pipe.get('error') or pipe}")
    files = result.get("predict_files") or {}
    if "ratio_to_synthetic" in files:
        print(f"predict files {files['case']}: {files['images_per_s']:.1f} img/s from JPEG files to "
              f"PNG maps ({files['workers']} threads) vs {files['synthetic_images_per_s']:.1f} "
              f"synthetic = {files['ratio_to_synthetic']:.3f}")
        print(f"  {sibling('predict_host').stage_summary(files)}")
    elif files:
        print(f"predict files: {files.get('skipped') or files.get('error') or files}")
    for label, summary in (result.get("profile") or {}).items():
        sibling("kernel_profile").print_summary(label, summary)
        if "gpu_during_trace" in summary:
            print(f"  GPU while traced: {sibling('gpu_monitor').describe(summary['gpu_during_trace'])}")
    if result.get("skipped"):
        print(f"not started (deadline {result['args']['deadline']} s): {', '.join(result['skipped'])}")
    print("(* = batch sweep; mem = XLA's estimate for the executable; SM_MHz, W = the GPU's median "
          "clock and mean power while timed)")


def _agreement_note(row: dict) -> str:
    """The variant's result against the code's, as printed beside its rate."""
    check = row.get("vs_code")
    if not check:
        return ""
    if "error" in check:
        return f"; not compared with the code's: {check['error']}"
    if "maps_difference" in check:
        return (f"; maps vs the code's: {describe_difference(check['maps_difference'])} "
                f"(the code's vs itself {describe_difference(check['code_maps_difference'])})")
    return (f"; vs the code's step: loss {check['loss']:.5g} ({check['code_loss']:.5g}), update "
            f"{describe_difference(check['update_difference'])} (the code's vs itself "
            f"{describe_difference(check['code_update_difference'])})"
            + (f", {check['differs_by_design']} by design" if "differs_by_design" in check
               else ""))


def describe_difference(difference: dict) -> str:
    return f"max {difference['max']:.1e}, L2 {difference['l2']:.1e}"


def print_floors(args) -> None:
    print(f"{'case':>12} {'mode':6} {'fwd GFLOP':>10} {'train GFLOP':>11} {'card':5} "
          f"{'train ms':>9} {'img/s max':>9} {'pred ms':>8} {'img/s max':>9} {'act MB':>8} "
          f"{'act ms':>7} {'FLOP/B':>7}")
    for case in args.cases:
        for mode, frozen in (("full", 0), ("frozen", REPORT_FROZEN_CONVS)):
            for card, ref in REFERENCE_CARDS.items():
                f = floors(*case, frozen, ref["bf16_tflops"], ref["copy_tb_s"])
                print(f"{case_name(*case):>12} {mode:6} {f['forward_gflop']:10.1f} "
                      f"{f['train_gflop']:11.1f} {card:5} {f['train_floor_ms']:9.2f} "
                      f"{f['train_images_per_s_ceiling']:9.0f} {f['predict_floor_ms']:8.2f} "
                      f"{f['predict_images_per_s_ceiling']:9.0f} {f['forward_activation_mb']:8.0f} "
                      f"{f['forward_activation_ms']:7.2f} {f['forward_intensity_flop_per_byte']:7.0f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="16x240x320,32x480x640",
                   help="BxHxW,...; the last is the headline case (pipeline, sweep, probes)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--modes", default="full,frozen")
    p.add_argument("--batch-sweep", action="store_true",
                   help="also train/predict at --sweep-batches, at the last case's size")
    p.add_argument("--sweep-batches", default="8,16,64")
    p.add_argument("--deadline", type=float, default=1e9,
                   help="seconds after start after which no new measurement starts")
    p.add_argument("--output", default=None,
                   help="JSON path (default $OUT/jax_throughput.json, else a temp dir)")
    p.add_argument("--pipeline", action="store_true",
                   help="end to end on fake SALICON-like 640x480 JPEG files: training through "
                        "train_loader, and prediction as the predict command runs a folder")
    p.add_argument("--pipeline-records", type=int, default=128)
    p.add_argument("--pipeline-workers", default="0", help="grain worker_count values to try")
    p.add_argument("--variants", default="",
                   help=f"also the headline train step (and predict, for {', '.join(sorted(FORWARD_VARIANTS))}) "
                        f"with other levers: comma-separated of {', '.join(VARIANTS)}")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace a few steps of the headline train step and predict, print where "
                        "the device time goes (kernel_profile.py), keep the traces in DIR")
    p.add_argument("--dump-dir", default=None,
                   help="write each executable's optimised HLO here (gzipped)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="skip the cold/warm compilation-cache probes")
    p.add_argument("--no-predict", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke tests)")
    p.add_argument("--matmul-size", type=int, default=0, help="0: 8192 on GPU/TPU, small on CPU")
    p.add_argument("--width-multiplier", type=float, default=1.0,
                   help="< 1 narrows VGG (tests only; FLOPs follow)")
    p.add_argument("--floors", action="store_true", help="print the analytic floors and exit")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = parse_cases(args.cases)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sweep_batches = [int(v) for v in args.sweep_batches.split(",") if v.strip()]
    args.pipeline_workers = [int(v) for v in args.pipeline_workers.split(",") if v.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    for d in args.dtypes:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: {d!r} is not float32 or bfloat16")
    for m in args.modes:
        if m not in ("full", "frozen"):
            p.error(f"--modes: {m!r} is not full or frozen")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floors:
        print_floors(args)
        return 0
    if args.probe:
        args.dtypes, args.modes = ",".join(args.dtypes), ",".join(args.modes)
        return run_probe(args)

    output = Path(args.output or Path(os.environ.get("OUT") or tempfile.gettempdir())
                  / "jax_throughput.json")
    result = {"benchmark": "mlnet_jax throughput", "schema": 1,
              "date": datetime.date.today().isoformat(),
              "args": {k: v for k, v in vars(args).items() if not k.startswith("probe")},
              "flops_convention": "convolutions only, 2*MAC, padding included; train = forward "
                                  "+ weight grads of trainable convs + input grads where needed "
                                  "(full = 3x forward - conv1_1 input grad)",
              "results": [], "skipped": [], "complete": False}
    primary = "bfloat16" if "bfloat16" in args.dtypes else args.dtypes[0]

    def save():
        result["elapsed_s"] = elapsed()
        _atomic_write_json(output, result)

    # 1. Probes first, before this process takes the device (a GPU backend preallocates memory).
    cache_dir = None
    if not args.no_compile_cache:
        cache_dir = tempfile.mkdtemp(prefix="mlnet_jax_cache_")
        mode = "full" if "full" in args.modes else args.modes[0]
        print(f"[{elapsed():6.1f}s] compile-cache probes: train {primary} {mode} "
              f"{case_name(*args.cases[-1])} (cold, then warm)", flush=True)
        result["compile_cache"] = compile_cache_probes(args, args.cases[-1], primary, mode,
                                                       cache_dir, args.deadline)
        save()
        # Share the probes' cache: the headline step then loads instead of compiling again.
        from mlnet_jax.compilation_cache import enable_compilation_cache
        enable_compilation_cache(cache_dir)

    bench = Bench(args)
    result.update(environment(bench))
    result["topology_file"] = save_topology(bench, output.parent)
    print(f"[{elapsed():6.1f}s] {bench.card} ({bench.platform}), jax "
          f"{result['software'].get('jax')}, XLA_FLAGS={result['xla_flags']!r}", flush=True)
    result["matmul_ceiling"] = {}
    for dtype in args.dtypes:
        try:
            bench.ceilings[dtype] = result["matmul_ceiling"][dtype] = measure_matmul(bench, dtype)
        except Exception as e:  # noqa: BLE001
            result.setdefault("errors", []).append(f"matmul {dtype}: {e!r}"[:500])
    result["floors"] = {
        case_name(*c): {m: {"forward_flops_per_image": forward_flops(*c[1:], args.width_multiplier),
                            "train_flops_per_image": train_flops(*c[1:], f, args.width_multiplier)}
                        for m, f in (("full", 0), ("frozen", REPORT_FROZEN_CONVS))}
        for c in args.cases}
    save()

    planned = list(plan(args, bench))
    result["planned"] = [label for label, _ in planned]  # a killed run shows what never ran
    save()
    for label, thunk in planned:
        if elapsed() > args.deadline:
            result["skipped"].append(label)
            continue
        print(f"[{elapsed():6.1f}s] {label}", flush=True)
        try:
            row = thunk()
        except Exception as e:  # noqa: BLE001 — OOM at one size must not lose the rest
            traceback.print_exc()
            row = {"label": label, "error": repr(e)[:1000]}
        if isinstance(row, tuple):
            result[row[0]] = row[1]
        else:
            row.setdefault("label", label)
            result["results"].append(row)
            if "images_per_s" in row:
                print(f"           {row['images_per_s']:.1f} img/s, {row['step_ms']:.2f} ms/step, "
                      f"{row['tflops']:.1f} TFLOP/s, compile {row['compile_s']:.1f} s"
                      + _agreement_note(row), flush=True)
        save()
    result["failed"] = [r["label"] for r in result["results"] if "error" in r] + [
        name for name in ("pipeline", "predict_files")
        if isinstance(result.get(name), dict) and "error" in result[name]]
    result["complete"] = not result["skipped"] and not result["failed"]
    save()
    print_table(result)
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
