"""ML-Net's head as one Pallas kernel (mlnet_jax/head_kernel.py): against the package's head in
Pallas's interpreter, where the model takes it, what it lowers to for an H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_for_an_h200

from mlnet_jax import first_conv, head, head_kernel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_kernel_is_the_package_head_without_the_concatenation(dtype):
    # head_maps against the package's head on the concatenation: three sources of different
    # widths, every tap at an edge (4×6 maps), 48 pixels in blocks of 16 that straddle rows and
    # images; in bfloat16 rounded where the package rounds (a float32 bias or readout would be
    # ~2 bf16 steps off). Through multilevel_head, the package head's gradient.
    rng = np.random.default_rng(5)
    sources = [jnp.asarray(rng.standard_normal((2, 4, 6, c)), dtype) for c in (64, 128, 192)]
    params = jax.tree.map(lambda p: p + np.float32(0.05),  # every ReLU cuts somewhere
                          head.init_head_params(jax.random.key(0), 384))
    expected = head.multilevel_head(params, dict(zip(head.HEAD_FEATURES, sources)))
    assert head_kernel.pixel_block(48, 16) == 16 and head_kernel.pixel_block(40) is None
    got = head_kernel.head_maps(params, sources, most=16, interpret=True)
    assert got.shape == expected.shape == (2, 4, 6, 1) and got.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 4e-3
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               rtol=tolerance, atol=tolerance)
    assert 0.1 < float(jnp.mean(expected > 0)) < 0.9

    if dtype == jnp.float32:
        features = dict(zip(head.HEAD_FEATURES, sources))
        weights = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)
        grads = [jax.grad(lambda p, f: jnp.sum(fn(p, f) * weights), (0, 1))(params, features)
                 for fn in (head.multilevel_head, head_kernel.multilevel_head)]
        for a, b in zip(*(jax.tree.leaves(g) for g in grads)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_kernel_is_taken_only_where_adopted_without_dropout_and_where_it_fits(monkeypatch):
    features = {name: jnp.zeros((32, 60, 80, c), jnp.bfloat16)
                for name, c in zip(head.HEAD_FEATURES, (256, 512, 512))}
    applies = head_kernel.kernel_applies
    monkeypatch.setattr(head_kernel, "ADOPTED", False)
    for mode in ("auto", "pallas", "xla"):  # not adopted
        assert not applies(mode, features, jnp.bfloat16, dropout=False)
    monkeypatch.setattr(head_kernel, "ADOPTED", True)
    assert applies("pallas", features, jnp.float32, dropout=False)
    assert not applies("pallas", features, jnp.float32, dropout=True)  # its mask: the package's
    assert not applies("xla", features, jnp.bfloat16, dropout=False)
    assert not applies("auto", features, jnp.bfloat16, dropout=False)  # no Hopper GPU here
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    assert applies("auto", features, jnp.bfloat16, dropout=False)
    assert not applies("auto", features, jnp.float32, dropout=False)
    odd = {**features, "pool3": jnp.zeros((32, 60, 80, 96), jnp.bfloat16)}  # no 64-chunks
    assert not applies("pallas", odd, jnp.bfloat16, dropout=False)


def test_the_kernel_lowers_to_one_triton_call_for_an_h200(monkeypatch):
    # At the headline shape: one Triton call (8 warps), no concatenation and no convolution
    # left in the head, one value per pixel written.
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                          jax.eval_shape(lambda k: head.init_head_params(k, 1280),
                                         jax.random.key(0)))
    shapes = [jax.ShapeDtypeStruct((32, 60, 80, c), jnp.bfloat16) for c in (256, 512, 512)]
    text = lowered_for_an_h200(lambda p, *f: head_kernel.multilevel_head(
        p, dict(zip(head.HEAD_FEATURES, f))), params, *shapes)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert 'name = "head_conv_readout", num_stages = 3 : i32, num_warps = 8' in text
    assert "stablehlo.concatenate" not in text and "stablehlo.convolution" not in text
    assert "-> tensor<32x60x80x1xbf16>" in text
