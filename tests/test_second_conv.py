"""conv1_2's Pallas kernels (mlnet_jax/second_conv.py): each against lax's convolution, the
package's pool and their gradients in Pallas's interpreter; where the model takes them; what
they lower to for an H200."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_for_an_h200

from mlnet_jax import first_conv, second_conv, vgg

HEADLINE = (32, 480, 640, 64)  # conv1_2's input at the benchmarks' 32 × 480×640


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", precision="highest",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("width", [64, 256])  # programs of 64 columns, of 128
def test_forward_kernel_is_conv_bias_relu_and_pool1(width):
    # The kernel against lax's convolution + bias + ReLU + 2×2 pool: every program meets an
    # edge of the 'SAME' padding (the masked, clipped loads), float32 sums, its products as
    # (channels × pixels) with the pixels of each window adjacent.
    kernel_call = partial(second_conv.conv_relu_pool, interpret=True)
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.standard_normal((2, 4, width, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) / 12, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(32) / 4, jnp.float32)
    pre = _conv(x, kernel) + bias
    b, h, w, c = pre.shape
    expected = jnp.max(jnp.maximum(pre, 0).reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))
    got = kernel_call(x, kernel, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.mean(expected == 0)) > 0.05  # the ReLU cuts some windows whole

    # With the winner mask (training), in bfloat16 where rounding ties many windows: the
    # package's mask of the same rounded values (the first maximum, none where it is 0).
    as_bf16 = [a.astype(jnp.bfloat16) for a in (x, kernel, bias)]
    pooled, winners = kernel_call(*as_bf16, winners=True)
    rounded = (jax.lax.conv_general_dilated(
        *as_bf16[:2], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32) + as_bf16[2].astype(jnp.float32)).astype(
        jnp.bfloat16)
    _, expected_winners = vgg._relu_max_pool_forward(rounded, 2, "standard", "first",
                                                     rounded.shape[1:3])
    package = vgg.max_pool_values(jnp.maximum(rounded, 0), 2, "standard")
    close = np.isclose(np.asarray(pooled, np.float32), np.asarray(package, np.float32),
                       rtol=2 ** -7)
    assert close.all()
    # Sums in another order may round a value to the next bfloat16 and move a tie: compare
    # the masks where the two pooled values agree exactly.
    same = np.asarray(pooled == package)
    assert same.mean() > 0.95
    np.testing.assert_array_equal(np.asarray(winners)[same], np.asarray(expected_winners)[same])
    assert len(np.unique(np.asarray(winners))) == 5


@pytest.mark.parametrize("cin, cout, size, pixels", [(16, 32, (2, 3, 128), 9600),
                                                     (64, 64, (1, 2, 64), 9600),
                                                     (32, 16, (1, 3, 64), 64)])
def test_weight_gradient_kernel_is_the_convolutions(monkeypatch, cin, cout, size, pixels):
    # weight_gradient against lax's: the first eight taps side by side and the ninth alone,
    # chunks at every edge of the 'SAME' padding, in one program or (at most 64 pixels each)
    # in three whose partial sums XLA adds.
    monkeypatch.setattr(second_conv, "WGRAD_MOST_PIXELS", pixels)
    rng = np.random.default_rng(cin)
    x = jnp.asarray(rng.standard_normal((*size, cin)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*size, cout)), jnp.float32)
    (expected,) = jax.vjp(lambda k: _conv(x, k), jnp.zeros((3, 3, cin, cout)))[1](g)
    got = second_conv.weight_gradient(x, g, interpret=True)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(expected).max()))


def _gradients(monkeypatch, parts, interpret=True):
    """``conv_bias_relu_pool``'s three gradients of a weighted sum, with ``parts`` adopted."""
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset(parts))
    monkeypatch.setattr(first_conv, "interpreted", lambda: interpret)

    def gradients(x, kernel, bias, weights):
        loss = lambda *a: jnp.sum(second_conv.conv_bias_relu_pool(*a) * weights)  # noqa: E731
        return jax.grad(loss, (0, 1, 2))(x, kernel, bias)
    return gradients


@pytest.mark.parametrize("width", [192, 256])  # three programs of 64 columns, two of 128
def test_conv_transposed_is_the_convolution(width):
    # Programs at the edges and inside, each two rows of a block of columns.
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.standard_normal((2, 6, width, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) / 12, jnp.float32)
    np.testing.assert_allclose(second_conv.conv_transposed(x, kernel, interpret=True),
                               _conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_gradient_kernels_are_conv1_2s_gradients():
    # As conv1_2's input gradient (the spread gradient convolved with the flipped,
    # channel-swapped kernel) and with weight_gradient: the same three gradients as XLA's path
    # (the forward kernel's winner mask spread by the package's pool gradient either way).
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 6, 64, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) / 12, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(32) / 4, jnp.float32)

    weights = jnp.asarray(rng.standard_normal((2, 3, 32, 32)), jnp.float32)
    args = (x, kernel, bias, weights)
    with pytest.MonkeyPatch.context() as m:
        xla = _gradients(m, {"forward"})(*args)
    # and through autodiff of the package's own layers: the same gradients
    _, package_vjp = jax.vjp(lambda *a: vgg.relu_max_pool_2x2(
        _conv(a[0], a[1]) + a[2], 2, "standard"), x, kernel, bias)
    for a, b in zip(xla, package_vjp(weights)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    for parts in ({"forward", "input_gradient"}, set(second_conv.PARTS)):
        with pytest.MonkeyPatch.context() as m:
            ours = _gradients(m, parts)(*args)
        for a, b in zip(ours, xla):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
            assert float(jnp.abs(a).max()) > 0


def test_gradient_kernels_replace_cudnns_in_the_program_for_an_h200(monkeypatch):
    # Lowered for an H200 at the headline shape (bfloat16): the forward kernel in every case;
    # with the input gradient adopted cuDNN's input gradient is gone, with the weight gradient
    # too its weight gradient, a Triton call in each's place with its launch settings.
    shapes = (jax.ShapeDtypeStruct(HEADLINE, jnp.bfloat16),
              jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.bfloat16),
              jax.ShapeDtypeStruct((64,), jnp.bfloat16),
              jax.ShapeDtypeStruct((32, 240, 320, 64), jnp.bfloat16))
    texts = []
    for parts in ({"forward"}, {"forward", "input_gradient"}, set(second_conv.PARTS)):
        texts.append(lowered_for_an_h200(_gradients(monkeypatch, parts, interpret=False),
                                         *shapes))
    assert all(t.count('name = "conv_bias_relu_pool_t"') == 1 for t in texts)
    assert [t.count("stablehlo.convolution") for t in texts] == [2, 1, 0]
    assert [t.count("__gpu$xla.gpu.triton") for t in texts] == [1, 2, 3]
    assert 'name = "conv_transposed", num_stages = 3 : i32, num_warps = 4' in texts[1]
    assert 'name = "conv_weight_grad", num_stages = 3 : i32, num_warps = 8' in texts[2]
    # 1024 programs' partial sums: eight taps × 64 channels side by side, and the ninth
    assert "tensor<1024x64x512xf32>, tensor<1024x64x64xf32>" in texts[2]
    # pooled output and winner mask written, conv1_2's output never
    assert all("tensor<32x240x320x64xui8>" in t for t in texts)
    # Prediction (no gradient): the forward kernel alone, no mask, no convolution left.
    text = lowered_for_an_h200(second_conv.conv_bias_relu_pool, *shapes[:3])
    assert text.count("__gpu$xla.gpu.triton") == 1 and "stablehlo.convolution" not in text
    assert "-> tensor<32x240x320x64xbf16>" in text and "xui8>" not in text


@pytest.mark.parametrize("parts", [{"forward"}, set(second_conv.PARTS)])
def test_each_gradient_comes_back_in_its_inputs_dtype(monkeypatch, parts):
    # A bfloat16 image and kernel with a float32 bias, called directly (the model gives all
    # three one dtype): each gradient in its own input's dtype.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 2, 64, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 16)) / 12, jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(16) / 4, jnp.float32)
    weights = jnp.ones((1, 1, 32, 16), jnp.float32)
    grads = _gradients(monkeypatch, parts)(x, kernel, bias, weights)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


def test_the_kernels_are_taken_only_where_adopted_and_where_they_fit(monkeypatch):
    applies = partial(second_conv.kernel_applies, features=64, pooling="standard")
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset())
    for mode in ("auto", "pallas", "xla"):  # nothing adopted: XLA's conv1_2 everywhere
        assert not applies(mode, HEADLINE, jnp.bfloat16)
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset({"forward"}))
    assert applies("pallas", HEADLINE, jnp.float32)
    assert not applies("xla", HEADLINE, jnp.bfloat16)
    assert not applies("auto", HEADLINE, jnp.bfloat16)  # this machine has no Hopper GPU
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    assert applies("auto", HEADLINE, jnp.bfloat16)
    assert not applies("auto", HEADLINE, jnp.float32)  # 'auto' takes bfloat16 only
    for shape, pooling in (((32, 481, 640, 64), "standard"),  # odd height
                           ((32, 480, 600, 64), "standard"),  # width not a multiple of 64
                           ((32, 480, 640, 48), "standard"),  # channels no power of two
                           ((32, 480, 640, 128), "standard"),  # wider than compiled for
                           (HEADLINE, "keras1")):  # Theano's windows
        assert not second_conv.kernel_applies("pallas", shape, jnp.float32, 64, pooling)


@pytest.mark.parametrize("parts", [{"forward"}, set(second_conv.PARTS)])
def test_the_model_with_the_kernels_predicts_and_trains_as_without(monkeypatch, parts):
    # The real model (quarter width, 16×128) under 'auto' on a faked Hopper GPU: conv1_2 by the
    # kernels where adopted, its parameters where they were (checkpoints load either way), the
    # same maps, and the same train step (the update to float32 rounding).
    from mlnet_jax.inference import ModelInfo, make_predict_fn
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step
    info = ModelInfo(input_size=(16, 128), preprocessing="caffe", width_multiplier=0.25)
    model, tx = info.build(), make_optimizer(1e-2, 5e-4, 0.9)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 128, 3)))["params"]
    params = jax.tree.map(lambda p: p + np.float32(0.02), params)  # no zero bias
    rng = np.random.default_rng(9)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 16, 128, 3)), jnp.uint8),
             "target": jnp.asarray(rng.uniform(size=(2, 2, 16, 1)), jnp.float32)}
    step = partial(train_step, model=model, tx=tx, preprocessing="caffe")

    def run():  # each trace a new function: jit's cache would serve the other's program
        maps = jax.jit(lambda *a: make_predict_fn(model, info.preprocessing)(*a))(
            {"params": params}, batch["image"])
        state, metrics = jax.jit(lambda *a: step(*a))(
            create_train_state(params, tx, 0, seed=0), batch)
        return maps, state, metrics

    expected_maps, expected_state, expected_metrics = run()
    calls = []
    original = second_conv.conv_bias_relu_pool
    monkeypatch.setattr(second_conv, "conv_bias_relu_pool",
                        lambda x, *a: calls.append(x.shape) or original(x, *a))
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset(parts))
    monkeypatch.setattr(second_conv, "_auto_takes", lambda dtype: True)
    maps, state, metrics = run()
    assert calls == [(2, 16, 128, 16)] * 2  # conv1_2 (quarter width) in each program
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(expected_metrics["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(expected_state.trainable), jax.tree.leaves(state.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    moved = (state.trainable["backbone"]["conv1_2"]["kernel"]
             - params["backbone"]["conv1_2"]["kernel"])
    assert float(jnp.abs(moved).max()) > 1e-6
