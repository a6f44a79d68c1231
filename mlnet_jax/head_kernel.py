"""ML-Net's head (the 3×3 convolution over pool3 +
pool4 + conv5_3, its bias and ReLU, the 1×1 readout, its bias and ReLU) as one Pallas (Triton)
kernel that reads the three feature maps where they are, taken only once measured faster
(``ADOPTED``).

Why: in prediction XLA writes the 1280-channel concatenation (32 × 60×80 × 1280 bf16, 393 MB,
written and read again: three copies of ~76 µs, 0.23 ms per step in the v3 trace) and cuDNN
runs the head's convolution, 64 output channels wide like conv1_2, with m64n64 products at
542 TFLOP/s (0.42 ms), then the readout. Splitting the convolution over its three inputs
instead (``cand_split_head``, 2026-11-26) lost 2.4 %: three narrow cuDNN calls. Here one
program takes 256 pixels of the flattened (image, row, column) grid and all 64 output
channels, and sums, source by source, the nine taps × 64-channel chunks of its K = 11520 as
(channels × pixels) products (as ``mlnet_jax.second_conv``'s kernels; with 8 warps, two warp
groups of m64n128k16: 186 registers, where 4 warps' m64n256k16 spilled at 255), loading each
tap's pixels by row and column indices clipped to the image and masked to zero outside it;
then the bias and ReLU and the readout as a sum over the 64 channels, with its bias and ReLU,
rounded to the features' dtype where the package's head rounds, before the only write: one
value per pixel. Training with dropout keeps the package's head (its mask is drawn over the
concatenation); without dropout the kernel runs forward and the package head's gradient
backward. Predicted (H200, bf16 32 × 480×640): +1 to +2.6 % prediction.

``ADOPTED`` says whether ``first_conv="auto"`` and ``"pallas"`` take it: not until measured
faster on a card beside the code (``benchmarks/throughput.py``'s ``cand_head_kernel`` sets it).
'auto' takes it in bfloat16 on a lone Hopper GPU, 'pallas' anywhere (off a GPU in the
interpreter).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlnet_jax import first_conv, head

ADOPTED = False  # measured faster (benchmarks/NOTES.md)
CHUNK = 64  # input channels per product (K); every source's width is a multiple


def kernel_applies(mode: str, features: dict, dtype, dropout: bool) -> bool:
    """Whether the head over ``features`` takes the kernel under ``mode`` (``first_conv``'s
    'auto', 'xla' or 'pallas'): adopted, no dropout, where it fits."""
    if mode == "xla" or not ADOPTED or dropout or not fits(features):
        return False
    return mode == "pallas" or _auto_takes(dtype)


_auto_takes = first_conv.auto_takes  # its own name: tests fake a Hopper GPU per module


def fits(features: dict) -> bool:
    """Sources of whole channel chunks, whole blocks of pixels, one device (the kernel is not
    partitioned)."""
    b, h, w, _ = features[head.HEAD_FEATURES[0]].shape
    return (jax.device_count() == 1 and pixel_block(b * h * w) is not None
            and all(features[name].shape[-1] % CHUNK == 0 for name in head.HEAD_FEATURES))


def pixel_block(pixels: int, most: int = 256) -> int | None:
    """The pixels per program: the largest power of two up to ``most`` that divides
    ``pixels`` (every program whole: no masked stores), at least 16 for Triton's products."""
    block = math.gcd(pixels, most)
    return block if block >= 16 else None


def multilevel_head(params: dict, features: dict) -> jax.Array:
    """``head.multilevel_head`` without dropout by the kernel, with the package head's
    gradient."""
    return _head_maps_with_gradient(params, [features[name] for name in head.HEAD_FEATURES],
                                    first_conv.interpreted())


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _head_maps_with_gradient(params: dict, sources: list, interpret: bool):
    """``head_maps`` forward, the package head's gradient backward."""
    return head_maps(params, sources, interpret=interpret)


def _forward(params, sources, interpret):
    return head_maps(params, sources, interpret=interpret), (params, sources)


def _backward(interpret, residuals, g):
    _, vjp = jax.vjp(lambda p, s: head.multilevel_head(p, dict(zip(head.HEAD_FEATURES, s))),
                     *residuals)
    return vjp(g)


_head_maps_with_gradient.defvjp(_forward, _backward)


def head_maps(params: dict, sources: list, *, most=256, num_warps=8, num_stages=3,
              interpret=False):
    """``relu(readout(relu(conv3x3(concat(sources)) + b)) + b')``, (B, h, w, 1) in the sources'
    dtype, rounded where the package's head rounds (each convolution's float32 sums, then the
    bias added); ``pixel_block(B·h·w, most)`` pixels per program."""
    b, h, w, _ = sources[0].shape
    block = pixel_block(b * h * w, most)
    dtype = sources[0].dtype
    kernel = params["conv"]["kernel"]
    taps = jnp.transpose(kernel.reshape(9, kernel.shape[2], kernel.shape[3]), (0, 2, 1))
    body = partial(_body, height=h, width=w, block=block,
                   widths=tuple(s.shape[-1] for s in sources),
                   precision=first_conv._precision(dtype))
    return pl.pallas_call(
        body, out_shape=jax.ShapeDtypeStruct((b, h, w, 1), dtype),
        grid=(b * h * w // block,),
        compiler_params=first_conv.compiler_params(num_warps, num_stages, interpret),
        interpret=interpret, name="head_conv_readout",
    )(*sources, taps.astype(dtype), params["conv"]["bias"].astype(dtype),
      params["readout"]["kernel"].reshape(-1).astype(dtype),
      params["readout"]["bias"].astype(dtype))


def _body(*refs, height, width, block, widths, precision):
    """One program: ``block`` pixels of the flattened (image, row, column) grid."""
    *source_refs, taps_ref, bias_ref, readout_ref, readout_bias_ref, out_ref = refs
    pixel = pl.program_id(0) * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    image = jax.lax.div(pixel, height * width)
    within = pixel - image * (height * width)
    row = jax.lax.div(within, width)
    col = within - row * width
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, CHUNK), 1)
    sums = jnp.zeros((taps_ref.shape[1], block), jnp.float32)
    start = 0
    for source_ref, channels in zip(source_refs, widths):
        chunks = channels // CHUNK

        def step(k, sums, source_ref=source_ref, chunks=chunks, start=start):
            t = jax.lax.div(k, chunks)
            chunk = k - t * chunks
            dy = jax.lax.div(t, 3)
            tile = first_conv.load_padded(source_ref, image, row + dy - 1,
                                          col + (t - 3 * dy) - 1, chunk * CHUNK + channel,
                                          height=height, width=width)
            weights = taps_ref[t, :, pl.ds(start + chunk * CHUNK, CHUNK)]
            return sums + jax.lax.dot_general(weights, tile, (((1,), (1,)), ((), ())),
                                              precision=precision,
                                              preferred_element_type=jnp.float32)

        sums = jax.lax.fori_loop(0, 9 * chunks, step, sums)
        start += channels
    dtype = out_ref.dtype
    hidden = jnp.maximum(sums.astype(dtype) + bias_ref[...][:, None], 0)
    maps = jnp.sum(hidden.astype(jnp.float32) * readout_ref[...].astype(jnp.float32)[:, None],
                   axis=0)
    maps = jnp.maximum(maps.astype(dtype) + readout_bias_ref[...], 0)
    out_ref[image[:, 0], row[:, 0], col[:, 0], jnp.zeros_like(pixel[:, 0])] = maps
