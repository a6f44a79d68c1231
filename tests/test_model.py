"""MLNet, VGG16, the head, the prior and the loss against NumPy transcriptions of SPEC §1."""

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import reference_numpy as ref
from mlnet_jax import MLNet, VGG16, mlnet_loss, prior_penalty
from mlnet_jax.prior import apply_prior, interpolation_matrix, prior_shape, upsample_prior
from mlnet_jax.head import dropout_keep_mask
from mlnet_jax.relu import relu
from mlnet_jax.vgg import max_pool_values, relu_max_pool_2x2


def random_vgg_params(rng: np.random.Generator) -> dict:
    params, cin = {}, 3
    names = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    for name, cout in zip(names, ref.VGG_WIDTHS):
        std = np.sqrt(2.0 / (9 * cin))
        params[name] = {"kernel": rng.normal(0, std, (3, 3, cin, cout)).astype(np.float32),
                        "bias": rng.normal(0, 0.1, cout).astype(np.float32)}
        cin = cout
    return params


@pytest.mark.parametrize("size", [(8, 8), (32, 48), (48, 32), (80, 120), (96, 64)])
def test_output_is_one_eighth_of_the_input(size):
    model = MLNet()
    x = jnp.zeros((1, *size, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v: model.apply(v, x), shapes)
    assert out.shape == (1, size[0] // 8, size[1] // 8, 1)
    assert shapes["params"]["prior"].shape == prior_shape(size[0] // 8, size[1] // 8)


@pytest.mark.parametrize("size", [(36, 48), (48, 36)])
def test_input_not_divisible_by_8_is_refused(size):
    with pytest.raises(ValueError, match="divisible by 8"):
        MLNet().init(jax.random.key(0), jnp.zeros((1, *size, 3)))


def test_images_of_another_size_than_the_priors_are_named():
    """A Python caller applying a loaded model to images not letterboxed to its input size got
    Flax's ScopeParamShapeError about a parameter; the message now says what to do. Sizes
    whose prior grid is the same shape are allowed, as before."""
    model = MLNet()
    x = jnp.zeros((1, 160, 240, 3))  # prior 2×3
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 232, 312, 3))), variables)
    assert out.shape == (1, 29, 39, 1)  # still a 2×3 prior
    with pytest.raises(ValueError, match="images of 320x480 do not fit this model's prior, a 2x3 "
                                         "grid learned for inputs of about 160x240: letterbox"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 320, 480, 3))), variables)


def test_real_vgg16_widths_and_head_init():
    variables = MLNet().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    params = variables["params"]
    widths = [params["backbone"][n]["kernel"].shape[-1] for n in sorted(params["backbone"])]
    assert widths == sorted(ref.VGG_WIDTHS)  # 64,64,128,128,256×3,512×6
    assert params["head"]["conv"]["kernel"].shape == (3, 3, 1280, 64)
    assert params["head"]["readout"]["kernel"].shape == (1, 1, 64, 1)
    assert not np.any(params["prior"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # Glorot normal: std = sqrt(2 / (fan_in + fan_out)).
    # 737 280 draws: the std is known to 0.08 %, so He's (2.5 % off here) is told apart, and
    # an untruncated normal has values past 3σ (a truncated one stops near 2σ).
    k = np.asarray(params["head"]["conv"]["kernel"])
    expected = np.sqrt(2.0 / (9 * 1280 + 9 * 64))
    assert abs(k.std() / expected - 1) < 0.01 and np.abs(k).max() > 3.5 * expected
    assert abs(k.mean()) < 0.01 * expected
    assert not np.any(params["head"]["conv"]["bias"]) and not np.any(params["head"]["readout"]["bias"])


@pytest.mark.parametrize("alignment", ["standard", "keras1"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 10), (7, 5)])  # even sizes take the reshape path
def test_pooling_alignment_matches_index_formula(alignment, stride, size):
    x = np.random.default_rng(0).uniform(-1, 1, (1, *size, 3)).astype(np.float32)
    want = ref.max_pool(ref.relu(x[0]), stride, alignment)
    np.testing.assert_array_equal(max_pool_values(jnp.maximum(x, 0), stride, alignment)[0], want)
    np.testing.assert_array_equal(relu_max_pool_2x2(jnp.asarray(x), stride, alignment)[0], want)
    y, _ = jax.vjp(lambda v: relu_max_pool_2x2(v, stride, alignment), jnp.asarray(x))
    np.testing.assert_array_equal(y[0], want)  # the forward rule's maximum of four views


@pytest.mark.parametrize("alignment", ["standard", "keras1"])
def test_stride_one_pooling_gradient_matches_reduce_window(alignment):
    # Shifted maxima replace reduce_window for pool4; on tie-free inputs the gradients agree.
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 9, 4)), jnp.float32)
    pad = ((1, 0), (1, 0)) if alignment == "keras1" else ((0, 1), (0, 1))
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=(2, 7, 9, 4)), jnp.float32)
    ours = jax.grad(lambda v: jnp.sum(relu_max_pool_2x2(v, 1, alignment) * cotangent))(x)
    want = jax.grad(lambda v: jnp.sum(
        nn.max_pool(jax.nn.relu(v), (2, 2), (1, 1), pad) * cotangent))(x)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alignment", ["standard", "keras1"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 8), (7, 5)])  # odd sizes take the general path
@pytest.mark.parametrize("values", ["continuous", "many_ties"])
@pytest.mark.parametrize("ties", ["all", "first"])
def test_pooling_gradient_is_theanos_or_the_first_maximums(alignment, stride, size, values, ties):
    # The ReLU and the pool as one operation: Theano's MaxPoolGrad (or the first maximum's)
    # of the ReLU's output, masked by the ReLU's gradient (0 at 0).
    rng = np.random.default_rng(1)
    shape = (2, *size, 3)
    x = rng.normal(size=shape) if values == "continuous" else rng.integers(-2, 3, shape)
    x = jnp.asarray(x, jnp.float32)
    y, vjp = jax.vjp(lambda v: relu_max_pool_2x2(v, stride, alignment, ties), x)
    y_autodiff, vjp_autodiff = jax.vjp(
        lambda v: max_pool_values(jax.nn.relu(v), stride, alignment), x)
    np.testing.assert_array_equal(y, y_autodiff)
    g = jnp.asarray(rng.integers(1, 5, y.shape), jnp.float32)  # integers: exact sums
    (grad,) = vjp(g)
    positive = np.asarray(x) > 0
    want = ref.max_pool_grad(ref.relu(np.asarray(x)), np.asarray(g), stride, alignment, ties)
    np.testing.assert_array_equal(grad, want * positive)
    windows_with_a_positive_maximum = float(jnp.sum(jnp.where(y > 0, g, 0)))
    if values == "continuous":  # no ties among positives: autodiff's gradient is the same
        np.testing.assert_array_equal(grad, vjp_autodiff(g)[0])
    elif ties == "all":  # autodiff splits ties, Theano gives each the window's whole gradient
        assert float(grad.sum()) > float(vjp_autodiff(g)[0].sum())
    else:  # one input per window with a positive maximum takes the window's gradient
        assert float(grad.sum()) == windows_with_a_positive_maximum


@pytest.mark.parametrize("stride, size", [(2, (6, 8)), (2, (7, 5)), (1, (6, 8))])
def test_pooling_keeps_only_a_byte_per_window_for_its_gradient(stride, size):
    # What the backward pass reads: one uint8 mask per window, not the ReLU's output, the pooled
    # output or argmax masks (JAX's own gradient of the two keeps all three). NaN takes nothing.
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, *size, 4)), jnp.float32)
    x = x.at[0, 0, 0, 0].set(jnp.nan)
    y, vjp = jax.vjp(lambda v: relu_max_pool_2x2(v, stride, "standard", "first"), x)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(vjp)] == [(y.shape, jnp.uint8)]
    _, vjp_autodiff = jax.vjp(lambda v: max_pool_values(jax.nn.relu(v), stride, "standard"), x)
    assert sum(a.size for a in jax.tree.leaves(vjp_autodiff)) > x.size
    (grad,) = vjp(jnp.ones_like(y))
    assert bool(jnp.isnan(y[0, 0, 0, 0])) and float(grad[0, 0, 0, 0]) == 0
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("alignment, ties", [("Keras1", "first"), ("standard", "First")])
def test_a_misspelt_pooling_is_refused_also_when_differentiated(alignment, ties):
    # The forward rule of the gradient builds its own windows; it must not pool a misspelt
    # alignment as 'standard' (or a misspelt tie rule as Theano's).
    x = jnp.ones((1, 4, 4, 1))
    for run in (lambda: relu_max_pool_2x2(x, 2, alignment, ties),
                lambda: jax.grad(lambda v: relu_max_pool_2x2(v, 2, alignment, ties).sum())(x)):
        with pytest.raises(ValueError, match="must be"):
            run()


def test_first_maximum_pooling_gradient_is_pytorchs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.integers(-1, 3, (2, 6, 8, 3)).astype(np.float32)  # many ties, zeros and negatives
    g = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    (ours,) = jax.vjp(lambda v: relu_max_pool_2x2(v, 2, "standard", "first"),
                      jnp.asarray(x))[1](jnp.asarray(g))
    t = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    torch.nn.functional.max_pool2d(torch.relu(t), 2, 2).backward(
        torch.tensor(g).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(ours, t.grad.permute(0, 2, 3, 1).numpy())


def test_pool_ties_are_theanos_only_for_keras1_weights_in_float32():
    from mlnet_jax.vgg import pool_ties
    assert pool_ties("keras1", jnp.float32) == "all"
    assert pool_ties("keras1", jnp.bfloat16) == "first"  # bf16 rounding makes new ties
    assert pool_ties("standard", jnp.float32) == pool_ties("standard", jnp.bfloat16) == "first"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_equals_jax_nn_relu_in_value_and_gradient(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 7, 8)), dtype).at[0, 0, 0, :].set(0)  # exact zeros
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    y, vjp = jax.vjp(relu, x)
    y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    (grad,) = vjp(g)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(vjp_ref(g)[0], np.float32))
    assert not np.any(np.asarray(grad[0, 0, 0], np.float32))  # 0 at x = 0, as jax.nn.relu
    assert 0 < np.count_nonzero(np.asarray(grad, np.float32)) < grad.size


@pytest.mark.parametrize("rate", [0.5, 0.3])
def test_dropout_keep_mask_is_independent_bernoulli(rate):
    shape = (64, 4, 4, 128)  # 128 channels: the packed-bit path at rate 0.5
    masks = np.asarray(dropout_keep_mask(jax.random.key(0), rate, shape), np.float64)
    other = np.asarray(dropout_keep_mask(jax.random.key(1), rate, shape))
    assert masks.shape == shape and other.dtype == bool
    n = masks[..., 0].size
    tolerance = 5 * np.sqrt(rate * (1 - rate) / n)  # 5 sigma per channel
    per_channel = masks.reshape(-1, shape[-1]).mean(axis=0)
    assert np.all(np.abs(per_channel - (1 - rate)) < tolerance), per_channel
    flat = masks.reshape(-1, shape[-1]) - (1 - rate)
    for lag in (1, 31, 32):  # neighbouring bits of a word, and the next word
        corr = (flat[:, :-lag] * flat[:, lag:]).mean() / (rate * (1 - rate))
        assert abs(corr) < 5 / np.sqrt(flat[:, lag:].size), (lag, corr)
    assert (masks != other).mean() > 0.3  # another key, another mask


def test_vgg16_features_match_numpy_reference():
    rng = np.random.default_rng(1)
    params = random_vgg_params(rng)
    image = rng.normal(0, 50, (1, 32, 40, 3)).astype(np.float32)
    convs = [(params[n]["kernel"], params[n]["bias"]) for n in params]
    for alignment in ("standard", "keras1"):
        got = VGG16(pooling=alignment).apply({"params": params}, image)
        want = ref.vgg_features(image[0], convs, alignment, true_conv=False)
        for key in ("pool3", "pool4", "conv5_3"):
            scale = np.abs(want[key]).max()
            np.testing.assert_allclose(np.asarray(got[key][0]), want[key], atol=1e-5 * scale)


def test_prior_upsampling_is_linear_interpolation_on_the_theano_grid():
    w = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    got = np.asarray(upsample_prior(jnp.asarray(w), 30, 40))
    np.testing.assert_allclose(got, ref.upsample_linear(w, 30, 40), atol=1e-6)
    # The grid is (i - 4)/10, not jax.image.resize's half-pixel (i - 4.5)/10.
    half_pixel = np.asarray(jax.image.resize(jnp.asarray(w), (30, 40), "linear"))
    assert np.abs(half_pixel - got).max() > 1e-3
    assert np.allclose(interpolation_matrix(57, 5).sum(axis=1), 1.0)


def test_zero_prior_leaves_the_map_unchanged():
    saliency = jnp.asarray(np.random.default_rng(3).uniform(0, 2, (2, 20, 30, 1)), jnp.float32)
    out = apply_prior(jnp.zeros((2, 3)), saliency)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(saliency))


def test_prior_multiplies_by_one_plus_w_then_relu():
    rng = np.random.default_rng(4)
    saliency = rng.uniform(0, 1, (1, 20, 30, 1)).astype(np.float32)
    w = rng.normal(0, 2, (2, 3)).astype(np.float32)  # large enough that 1 + W < 0 somewhere
    got = np.asarray(apply_prior(jnp.asarray(w), jnp.asarray(saliency)))[0, ..., 0]
    want = np.maximum(saliency[0, ..., 0] * ref.upsample_linear(1 + w, 20, 30), 0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (got == 0).any()


def test_full_forward_matches_numpy_reference_with_prior():
    model = MLNet(pooling="keras1")
    rng = np.random.default_rng(5)
    x = rng.normal(0, 50, (1, 80, 88, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
    params = jax.tree.map(np.asarray, params)
    params["backbone"] = random_vgg_params(rng)
    params["prior"] = rng.normal(0, 0.5, params["prior"].shape).astype(np.float32)
    got = np.asarray(model.apply({"params": params}, x))[0, ..., 0]
    convs = [(p["kernel"], p["bias"]) for p in params["backbone"].values()]
    head = params["head"]
    want = ref.mlnet_forward(x[0], convs, (head["conv"]["kernel"], head["conv"]["bias"]),
                             (head["readout"]["kernel"], head["readout"]["bias"]),
                             params["prior"], "keras1", true_conv=False)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, atol=1e-5 * want.max())


def test_head_dropout_is_inverted_and_the_readout_ends_in_a_relu():
    """Keras's dropout: kept features are divided by 1 − rate in training (else the head sees
    inputs half as large as at test time); the readout's ReLU keeps maps non-negative."""
    from mlnet_jax.head import HEAD_FEATURES, init_head_params, multilevel_head
    rng = np.random.default_rng(11)
    features = {"pool3": rng.normal(0, 1, (2, 4, 5, 256)), "pool4": rng.normal(0, 1, (2, 4, 5, 512)),
                "conv5_3": rng.normal(0, 1, (2, 4, 5, 512))}
    features = {k: np.maximum(v, 0).astype(np.float32) for k, v in features.items()}
    params = jax.tree.map(np.asarray, init_head_params(jax.random.key(4)))
    params["readout"]["bias"] = np.full((1,), -0.02, np.float32)  # some pixels below zero
    x = np.concatenate([features[n] for n in HEAD_FEATURES], -1).astype(np.float64)
    key = jax.random.key(12)
    keep = np.asarray(dropout_keep_mask(key, 0.5, x.shape))

    def numpy_head(x):
        out = []
        for image in x:
            h = ref.relu(ref.conv_same(image, params["conv"]["kernel"], params["conv"]["bias"]))
            out.append(ref.relu(ref.conv_same(h, params["readout"]["kernel"],
                                              params["readout"]["bias"])))
        return np.stack(out)

    for dropout_rng, inputs in [(key, np.where(keep, x / 0.5, 0)), (None, x)]:
        got = np.asarray(multilevel_head(params, features, dropout_rng=dropout_rng))
        want = numpy_head(inputs)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
        assert (want == 0).any() and want.max() > 0  # the readout's ReLU cut something


def test_a_model_without_prior_matches_the_numpy_reference():
    model = MLNet(prior=False)
    rng = np.random.default_rng(13)
    x = rng.normal(0, 50, (1, 32, 40, 3)).astype(np.float32)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(1), jnp.asarray(x))["params"])
    assert "prior" not in params
    params["backbone"] = random_vgg_params(rng)
    params["head"]["readout"]["bias"] = np.full((1,), -0.1, np.float32)
    got = np.asarray(model.apply({"params": params}, x))[0, ..., 0]
    head = params["head"]
    want = ref.mlnet_forward(x[0], [(p["kernel"], p["bias"]) for p in params["backbone"].values()],
                             (head["conv"]["kernel"], head["conv"]["bias"]),
                             (head["readout"]["kernel"], head["readout"]["bias"]), None,
                             "standard", true_conv=False)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert (want == 0).any() and want.max() > 0


def test_dropout_changes_outputs_only_in_training():
    model = MLNet()
    x = jnp.asarray(np.random.default_rng(6).normal(0, 50, (2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    # A positive readout bias keeps the ReLU alive so dropout has something to change.
    variables["params"]["head"]["readout"]["bias"] = jnp.ones((1,))
    eval_a = model.apply(variables, x, train=False)
    eval_b = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(9)})
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # an error, not silent
        model.apply(variables, x, train=True)


def test_the_models_dropout_rate_reaches_the_head(monkeypatch):
    # MLNet(dropout_rate=0.3) in training drops with 0.3: a rate not passed on would drop (and
    # scale kept features) with the head's default 0.5.
    from mlnet_jax import head as head_module
    from mlnet_jax import models
    calls = []

    def spy(params, features, **kwargs):
        calls.append((features, kwargs))
        return head_module.multilevel_head(params, features, **kwargs)

    monkeypatch.setattr(models, "multilevel_head", spy)
    model = MLNet(prior=False, dropout_rate=0.3, width_multiplier=0.25)
    x = jnp.asarray(np.random.default_rng(8).normal(0, 50, (1, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    variables["params"]["head"]["readout"]["bias"] = jnp.ones((1,))
    calls.clear()
    got = np.asarray(model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(4)}))
    (features, kwargs), = calls
    assert kwargs["dropout_rate"] == 0.3 and kwargs["dropout_rng"] is not None
    head = variables["params"]["head"]
    want = head_module.multilevel_head(head, features, dropout_rng=kwargs["dropout_rng"],
                                       dropout_rate=0.3)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(np.random.default_rng(7).normal(0, 50, (2, 48, 64, 3)), jnp.float32)
    variables = MLNet().init(jax.random.key(3), x)
    variables["params"]["head"]["readout"]["bias"] = jnp.full((1,), 0.5)
    full = np.asarray(MLNet().apply(variables, x))
    half = MLNet(dtype=jnp.bfloat16).apply(variables, x)
    assert half.dtype == jnp.float32  # the map (and so the loss) stays float32
    assert np.abs(np.asarray(half) - full).max() <= 2e-2 * np.abs(full).max()


def test_loss_equals_numpy_transcription():
    rng = np.random.default_rng(8)
    pred = rng.uniform(0, 3, (3, 6, 8, 1)).astype(np.float32)
    target = rng.uniform(0, 1, (3, 6, 8, 1)).astype(np.float32)
    got = float(mlnet_loss(jnp.asarray(pred), jnp.asarray(target)))
    assert got == pytest.approx(ref.mlnet_loss(pred.astype(np.float64), target.astype(np.float64)),
                                rel=1e-6)
    # A target without its channel axis broadcast to a wrong loss (0.75 for 0.65): refused.
    for bad in (target[..., 0], target[0]):
        with pytest.raises(ValueError, match=r"one \(B, h, w, 1\) shape"):
            mlnet_loss(jnp.asarray(pred), jnp.asarray(bad))


def test_loss_gradient_flows_through_the_per_image_maximum():
    """As Theano's max in the original: the pixel holding the maximum also gets the gradient
    of the normalisation (a stop_gradient there would train another model)."""
    rng = np.random.default_rng(14)
    pred = rng.uniform(0.5, 1.5, (2, 3, 4, 1))
    pred[0, 1, 2, 0], pred[1, 0, 0, 0] = 2.5, 3.0  # unique maximums
    target = rng.uniform(0, 1, pred.shape)
    grad = np.asarray(jax.grad(mlnet_loss)(jnp.asarray(pred, jnp.float32),
                                           jnp.asarray(target, jnp.float32)))
    step = 1e-5
    for index in [(0, 1, 2, 0), (1, 0, 0, 0), (0, 2, 3, 0), (1, 1, 1, 0)]:
        up, down = pred.copy(), pred.copy()
        up[index] += step
        down[index] -= step
        numeric = (ref.mlnet_loss(up, target) - ref.mlnet_loss(down, target)) / (2 * step)
        assert grad[index] == pytest.approx(numeric, rel=2e-3, abs=1e-6), index


def test_the_packages_names_are_its_attributes():
    import mlnet_jax
    assert all(hasattr(mlnet_jax, name) for name in mlnet_jax.__all__)
    assert callable(mlnet_jax.metrics.cc)


def test_prior_penalty_is_sum_of_squares_over_grid_size():
    w = np.random.default_rng(9).normal(size=(6, 8)).astype(np.float32)
    assert float(prior_penalty(jnp.asarray(w))) == pytest.approx(float((w.astype(np.float64) ** 2).sum()) / 48,
                                                                 rel=1e-6)


def test_loss_guard_for_all_zero_prediction():
    target = jnp.asarray(np.random.default_rng(10).uniform(0, 1, (2, 4, 4, 1)), jnp.float32)
    pred = jnp.zeros((2, 4, 4, 1)).at[1].set(0.5)  # image 0 is all zero (dead ReLU)
    loss, grad = jax.value_and_grad(mlnet_loss)(pred, target)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    # The dead image contributes y² / (α − y), i.e. ŷ/max ŷ is taken as 0.
    t = np.asarray(target, np.float64)
    expected = np.concatenate([(t[0] ** 2 / (1.1 - t[0])).ravel(),
                               ((1 - t[1]) ** 2 / (1.1 - t[1])).ravel()]).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
