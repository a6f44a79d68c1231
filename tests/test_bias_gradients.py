"""The ReLUs' and pools' backward passes with their bias gradients as Pallas kernels
(mlnet_jax/bias_gradients.py): each kernel against the package's formula in Pallas's
interpreter, where the model takes them, what they lower to for an H200."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_for_an_h200

from mlnet_jax import bias_gradients, first_conv, vgg


@pytest.mark.parametrize("ties", ["first", "all"])
def test_pooled_kernel_spreads_like_the_pools_gradient_and_sums_the_bias(ties):
    # The package's pool backward: the same input gradient bit for bit, its channel sums as
    # the bias gradient; values rounded to 0.1 make ties.
    rng = np.random.default_rng(11)
    pre = jnp.asarray(np.round(rng.standard_normal((2, 8, 32, 16)), 1), jnp.float32)
    _, winners = vgg._relu_max_pool_forward(pre, 2, "standard", ties, pre.shape[1:3])
    g = jnp.asarray(rng.standard_normal((2, 4, 16, 16)), jnp.float32)
    (expected,) = vgg._relu_max_pool_backward(2, "standard", ties, pre.shape[1:3], winners, g)
    spread, bias = bias_gradients.spread_and_bias_grad(g, winners, True)
    np.testing.assert_array_equal(spread, expected)
    np.testing.assert_allclose(bias, jnp.sum(expected, axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    assert float(jnp.mean(expected != 0)) > 0.1 and bool(jnp.any(expected == 0))

    # For CUDA at conv1_2's headline shape: one Triton call, nothing left for XLA but the sum.
    shapes = (jax.ShapeDtypeStruct((32, 240, 320, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((32, 240, 320, 64), jnp.uint8))
    text = lowered_for_an_h200(partial(bias_gradients.spread_and_bias_grad, interpret=False),
                               *shapes)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "tensor<32x240x2x320x128xbf16>" in text and "tensor<7680x5x64xf32>" in text


def test_unpooled_kernel_masks_by_the_relu_and_sums_the_bias():
    rng = np.random.default_rng(12)
    y = jnp.maximum(jnp.asarray(rng.standard_normal((2, 8, 16, 256)), jnp.float32), 0)
    g = jnp.asarray(rng.standard_normal((2, 8, 16, 256)), jnp.float32)
    masked, bias = bias_gradients.mask_and_bias_grad(g, y, True)
    expected = jnp.where(y > 0, g, 0)
    np.testing.assert_array_equal(masked, expected)
    np.testing.assert_allclose(bias, jnp.sum(expected, axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)

    shape = jax.ShapeDtypeStruct((32, 60, 80, 512), jnp.bfloat16)  # conv4_1 at 480×640
    text = lowered_for_an_h200(partial(bias_gradients.mask_and_bias_grad, interpret=False),
                               shape, shape)
    assert text.count("__gpu$xla.gpu.triton") == 1 and "tensor<4800x512xf32>" in text


@pytest.mark.parametrize("pooled", [True, False])
def test_each_gradient_comes_back_in_its_inputs_dtype(pooled):
    # A bfloat16 image and kernel with a float32 bias, called directly: each gradient in its
    # own input's dtype.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, 2, 32, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 256)) / 12, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(256) / 4, jnp.float32)
    layer = ((lambda *a: bias_gradients.conv_relu_pool(*a, "first", True)) if pooled
             else (lambda *a: bias_gradients.conv_relu(*a, True)))
    grads = jax.grad(lambda *a: jnp.sum(layer(*a).astype(jnp.float32)), (0, 1, 2))(
        x, kernel, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


def test_the_kernels_are_taken_only_where_adopted_and_where_they_fit(monkeypatch):
    # conv1_2's and conv3_1's inputs at 32 × 480×640, full width
    conv1_2, conv3_1 = (32, 480, 640, 64), (32, 120, 160, 128)
    part = bias_gradients.layer_part
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset())
    for mode in ("auto", "pallas", "xla"):  # nothing adopted
        assert part(mode, "conv1_2", conv1_2, jnp.bfloat16, 64, "standard") is None
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset({"pooled"}))
    assert part("pallas", "conv1_2", conv1_2, jnp.float32, 64, "standard") == "pooled"
    assert part("pallas", "conv3_1", conv3_1, jnp.float32, 256, "standard") is None
    assert part("pallas", "conv1_2", conv1_2, jnp.float32, 64, "keras1") is None
    assert part("xla", "conv1_2", conv1_2, jnp.bfloat16, 64, "standard") is None
    assert part("auto", "conv1_2", conv1_2, jnp.bfloat16, 64, "standard") is None  # no Hopper
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    assert part("auto", "conv1_2", conv1_2, jnp.bfloat16, 64, "standard") == "pooled"
    assert part("auto", "conv1_2", conv1_2, jnp.float32, 64, "standard") is None
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset(bias_gradients.PARTS))
    assert part("auto", "conv3_1", conv3_1, jnp.bfloat16, 256, "standard") == "unpooled"
    for name, shape, features in (("conv2_1", (32, 240, 320, 64), 128),  # XLA's was fast
                                  ("conv4_3", (32, 60, 80, 512), 512),  # the stride-1 pool4
                                  ("conv5_3", (32, 60, 80, 512), 512)):  # feeds the head
        assert part("auto", name, shape, jnp.bfloat16, features, "standard") is None


def test_at_full_width_every_wide_layer_but_the_one_feeding_the_head_takes_a_kernel(
        monkeypatch):
    # Both parts adopted, the gradient of the model's maps traced for an H200 (a faked lone
    # Hopper GPU): the three stride-2 pools' convs and the unpooled layers of 256 and 512
    # channels take a kernel in the backward pass; conv5_3 does not (its gradient is a slice
    # of the head's), nor the stride-1 pool4's conv4_3 or the narrower layers.
    from mlnet_jax.inference import ModelInfo
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    monkeypatch.setattr(bias_gradients, "_auto_takes", lambda dtype: True)
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset(bias_gradients.PARTS))
    model = ModelInfo(input_size=(16, 128), preprocessing="caffe").build(jnp.bfloat16, "auto")
    images = jax.ShapeDtypeStruct((2, 16, 128, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    loss = lambda p, x: jnp.sum(model.apply(p, x, train=False).astype(jnp.float32))  # noqa: E731
    text = lowered_for_an_h200(jax.grad(loss), params, images, debug_info=True)
    layers = set(re.findall(r'(conv\d_\d)[^"]{0,80}(?:relu_bias_grad|pallas_call)', text))
    assert layers == {"conv1_2", "conv2_2", "conv3_3", "conv3_1", "conv3_2", "conv4_1", "conv4_2",
                      "conv5_1", "conv5_2"}
    assert text.count("__gpu$xla.gpu.triton") == len(layers)
