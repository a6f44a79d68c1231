"""The compute dtype a config or an option names, checked before anything is compiled with it.

A name other than float32 or bfloat16 is a one-line error. bfloat16 on a CPU backend is first
tried on the smallest program seen to fail: with JAX 0.11.2 and 0.12.0.1, XLA:CPU returns NaN
in some channels of bfloat16 convolutions that follow a 2×2 max pooling, a different few on
every call (0.10.2 is fine). Where that program comes out NaN, bfloat16 on the
CPU is refused with the reason; float32 is no slower there. GPUs and TPUs are not tried.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlnet_jax.errors import UserError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, option: str) -> jnp.dtype:
    """The dtype ``name`` stands for; ``option`` (e.g. ``--dtype``) is what the error names."""
    if name not in COMPUTE_DTYPES:
        raise UserError(f"{option}={name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return check_backend_computes(COMPUTE_DTYPES[name], option)


def check_backend_computes(dtype, option: str = "dtype"):
    """``dtype``, unless it is bfloat16 and the default backend is a CPU that gets it wrong."""
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu" \
            and not cpu_bfloat16_convolutions_work():
        raise UserError(f"{option}=bfloat16: this JAX's CPU backend (jax {jax.__version__}) returns "
                        "NaN from bfloat16 convolutions after a pooling; use float32 on a CPU")
    return dtype


@functools.cache
def cpu_bfloat16_convolutions_work() -> bool:
    """Whether conv → ReLU → 2×2 max pool → two conv → ReLU in bfloat16, jitted on the default
    backend (call it where that is the CPU), comes out finite three calls running (on JAX
    0.12.0.1 no call of 30 did; 0.2 s)."""
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 32)]
    kernels = [rng.normal(0, 1 / np.sqrt(9 * shape[2]), shape).astype(np.float32) for shape in shapes]
    images = rng.normal(0, 50, (4, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def chain(x, kernels):
        x = x.astype(jnp.bfloat16)
        for i, kernel in enumerate(kernels):
            x = jax.lax.conv_general_dilated(x, kernel.astype(jnp.bfloat16), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jnp.maximum(x, 0)
            if i == 0:
                b, rows, cols, c = x.shape
                x = x.reshape(b, rows // 2, 2, cols // 2, 2, c).max(axis=(2, 4))
        return x

    return all(np.isfinite(np.asarray(chain(images, kernels), np.float32)).all() for _ in range(3))
