"""conv1_1 + bias + ReLU as a Pallas kernel (mlnet_jax/first_conv.py): its sums and gradients
against lax's convolution (Pallas's interpreter on a CPU), its CUDA lowering, where 'auto'
takes it, and the model and training step with it against the model without it."""

from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import lowered_for_an_h200

from mlnet_jax import first_conv


def _pre_activation(x, kernel, bias):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest") + bias


def _plain(x, kernel, bias):
    return jax.nn.relu(_pre_activation(x, kernel, bias))


@pytest.mark.parametrize("rows, cols", [(8, 32), (6, 48), (5, 16)])  # programs of 4, 2, 1 rows
def test_the_kernel_computes_conv_bias_relu_and_its_gradients(rows, cols):
    # float32 sums to rounding, bfloat16 within one rounding of the float32 result; the
    # hand-written backward pass (weight and bias gradients from the second kernel, the image's
    # from XLA) against autodiff of the plain formula.
    rng = np.random.default_rng(rows)
    x, kernel, bias = (rng.standard_normal(s).astype(np.float32)
                       for s in ((2, rows, cols, 3), (3, 3, 3, 64), (64,)))
    expected = np.asarray(_plain(x, kernel, bias))
    assert (expected == 0).mean() > 0.3  # the ReLU cuts
    np.testing.assert_allclose(first_conv.conv_bias_relu(x, kernel, bias), expected,
                               rtol=1e-5, atol=1e-5)
    as_bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, kernel, bias)]
    fused16 = first_conv.conv_bias_relu(*as_bf16)
    assert fused16.dtype == jnp.bfloat16
    np.testing.assert_allclose(fused16.astype(np.float32),
                               _plain(*[a.astype(jnp.float32) for a in as_bf16]),
                               rtol=2 ** -8, atol=1e-6)

    # Random weights: the incoming gradient is not 0 where the ReLU cut, so a backward pass
    # that did not mask it would show; 0 where the pre-activation is within rounding of 0 (the
    # two sums may then disagree on its sign).
    pre = np.asarray(_pre_activation(x, kernel, bias))
    weights = np.where(np.abs(pre) < 1e-3, 0, rng.standard_normal(pre.shape)).astype(np.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * weights)  # noqa: E731
    expected = jax.grad(loss(_plain), (0, 1, 2))(x, kernel, bias)
    got = jax.grad(loss(first_conv.conv_bias_relu), (0, 1, 2))(x, kernel, bias)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))


def test_the_kernel_lowers_to_two_triton_calls_at_the_headline_size(monkeypatch):
    # What a CPU can check of the GPU program: Pallas lowers both kernels to Triton calls for
    # CUDA at 32 × 480×640 (block shapes, indexing, the products' dtypes) for an H200 (newer
    # JAX asks which card), and XLA's conv1_1 is gone from the forward pass; compiling them
    # needs the card (measured on an H200, 2026-11-28: benchmarks/results).
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((32, 480, 640, 3), (3, 3, 3, 64),
                                                              (64,))]
    card = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=card)):
        forward = jax.jit(first_conv.conv_bias_relu).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        loss = lambda *a: jnp.sum(first_conv.conv_bias_relu(*a).astype(jnp.float32))  # noqa: E731
        grads = jax.jit(jax.grad(loss, (1, 2))).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert forward.count("__gpu$xla.gpu.triton") == 1
    assert "stablehlo.convolution" not in forward
    assert "tensor<32x482x640x16xbf16>" in forward and "tensor<32x480x640x64xbf16>" in forward
    # The backward kernel: partial sums per image, block of 32 rows and of 128 columns.
    assert grads.count("__gpu$xla.gpu.triton") == 2
    assert "tensor<32x15x5x3x16x64xf32>" in grads and "tensor<32x15x5x64xf32>" in grads
    # ... and the weight and bias gradients are its: no convolution left for XLA (the image's
    # gradient, unused here, is dropped before lowering).
    assert "stablehlo.convolution" not in grads


def _fake_devices(monkeypatch, count=1, backend="gpu", capability="9.0"):
    monkeypatch.setattr(jax, "device_count", lambda: count)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(compute_capability=capability)])


HEADLINE = (32, 480, 640, 3)


def test_auto_takes_the_kernel_only_in_bfloat16_on_one_hopper_gpu(monkeypatch):
    # Where it was measured (an H200, bfloat16, one device); elsewhere XLA's conv1_1: on a CPU,
    # in float32, on an Ampere card, with several devices (the kernel is not partitioned), for a
    # width the kernel cannot tile, and where this JAX has no Triton backend for Pallas.
    assert not first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16)  # this CPU
    _fake_devices(monkeypatch)
    assert first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16)
    assert not first_conv.kernel_applies("auto", HEADLINE, jnp.float32)
    assert not first_conv.kernel_applies("auto", (32, 480, 632, 3), jnp.bfloat16)
    assert not first_conv.kernel_applies("xla", HEADLINE, jnp.bfloat16)
    for other in ({"capability": "8.0"}, {"count": 2}, {"backend": "tpu"}):
        _fake_devices(monkeypatch, **other)
        assert not first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16), other
    _fake_devices(monkeypatch)
    monkeypatch.setattr(first_conv, "_triton_available", lambda: False)
    assert not first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16)


def test_pallas_forces_the_kernel_and_names_what_it_cannot_take():
    assert first_conv.kernel_applies("pallas", HEADLINE, jnp.float32)
    with pytest.raises(ValueError, match="widths divisible by 16, got 24"):
        first_conv.kernel_applies("pallas", (1, 16, 24, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"3-channel NHWC images, got shape \(1, 16, 16, 4\)"):
        first_conv.kernel_applies("pallas", (1, 16, 16, 4), jnp.float32)
    with pytest.raises(ValueError, match="first_conv must be one of auto, xla, pallas, got 'gpu'"):
        first_conv.kernel_applies("gpu", HEADLINE, jnp.float32)
    with pytest.raises(ValueError, match="the kernel computes in bfloat16 or float32, got float16"):
        first_conv.kernel_applies("pallas", HEADLINE, jnp.float16)


@pytest.mark.parametrize("features", [8, 48, 96])
def test_conv1_1_widths_triton_cannot_tile_keep_xlas_convolution(monkeypatch, features):
    # Triton's blocks are powers of two (and a product's N at least 16): a width_multiplier
    # that gives conv1_1 6, 13, 48 or 96 channels failed to lower for CUDA ("... size is a
    # power of 2"). 'auto' keeps XLA's conv1_1 there, 'pallas' says why, and so does the
    # training config before anything runs.
    _fake_devices(monkeypatch)
    assert first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16, features=64)
    assert not first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16, features=features)
    with pytest.raises(ValueError, match=f"16, 32, 64, ... output channels, got {features}"):
        first_conv.kernel_applies("pallas", HEADLINE, jnp.bfloat16, features=features)
    from mlnet_jax.models import MLNet  # the model asks with conv1_1's width, not VGG-16's 64
    with pytest.raises(ValueError, match=f"output channels, got {features}"):
        jax.eval_shape(MLNet(first_conv="pallas", width_multiplier=features / 64).init,
                       jax.random.key(0), jnp.zeros((1, 16, 32, 3)))
    import sys
    from pathlib import Path

    from mlnet_jax.errors import UserError
    from mlnet_jax.train import check_config
    sys.path.insert(0, str(Path(__file__).parent / "configs"))
    import tiny
    config = tiny.get_config()
    config.first_conv, config.width_multiplier = "pallas", features / 64
    with pytest.raises(UserError, match=r"^config.first_conv must be 'auto' or 'xla' where the "
                                        r"kernel cannot take conv1_1 \(the kernel takes 16, 32, "
                                        rf"64, ... output channels, got {features}\), got 'pallas'$"):
        check_config(config)


def test_the_kernels_gradients_keep_each_arguments_dtype():
    # A bfloat16 image with float32 weights (the forward casts them): the image's gradient
    # comes from lax's convolution, which takes one dtype, and each gradient has its
    # argument's dtype.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 8, 16, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 16)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
    loss = lambda *a: jnp.sum(first_conv.conv_bias_relu(*a).astype(jnp.float32))  # noqa: E731
    grads = jax.grad(loss, (0, 1, 2))(x, kernel, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]


def _model_and_images(mode):
    from mlnet_jax.models import MLNet
    model = MLNet(first_conv=mode, width_multiplier=0.25)
    images = jnp.asarray(np.random.default_rng(0).normal(0, 60, (2, 16, 32, 3)), jnp.float32)
    return model, images


def test_the_model_with_the_kernel_has_the_same_parameters_maps_and_one_convolution_fewer():
    # conv1_1's parameters keep flax Conv's names, shapes and initial values (checkpoints and
    # converted weights load either way); the maps are the same; the program's conv1_1 and its
    # ReLU are the kernel's.
    (xla, images), (pallas, _) = _model_and_images("xla"), _model_and_images("pallas")
    variables = xla.init(jax.random.key(1), images)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables,
                                     pallas.init(jax.random.key(1), images)))
    assert float(jnp.abs(variables["params"]["backbone"]["conv1_1"]["kernel"]).max()) > 0
    # (float32 sums in another order: 1e-5 apart after 15 layers on JAX 0.12)
    np.testing.assert_allclose(pallas.apply(variables, images), xla.apply(variables, images),
                               rtol=1e-4, atol=1e-6)
    text = {m: jax.jit(m.apply).lower(variables, images).as_text() for m in (xla, pallas)}
    assert text[pallas].count("stablehlo.convolution") == text[xla].count(
        "stablehlo.convolution") - 1


def test_a_bfloat16_model_runs_the_kernel_in_bfloat16(monkeypatch):
    # The compute dtype reaches the kernel (the parameters are float32): a float32 kernel in a
    # bfloat16 model would give the same maps at twice the memory traffic.
    seen, real = [], first_conv.conv_bias_relu
    monkeypatch.setattr(first_conv, "conv_bias_relu",
                        lambda *a: seen.append([x.dtype for x in a]) or real(*a))
    model, images = _model_and_images("pallas")
    model = model.clone(dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, jax.random.key(1), images)
    assert variables["params"]["backbone"]["conv1_1"]["kernel"].dtype == jnp.float32
    assert seen == [[jnp.bfloat16] * 3]


def test_a_training_step_with_the_kernel_is_the_step_without_it():
    # One real train step (loss, optimiser, dropout): the same loss and update, conv1_1's
    # included (the kernel's weight and bias gradients).
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step
    tx = make_optimizer(1e-2, 5e-4, 0.9)
    rng = np.random.default_rng(2)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 16, 32, 3)), jnp.uint8),
             "target": jnp.asarray(rng.uniform(size=(2, 2, 4, 1)), jnp.float32)}
    results = {}
    for mode in ("xla", "pallas"):
        model, images = _model_and_images(mode)
        params = model.init(jax.random.key(0), images)["params"]
        step = jax.jit(partial(train_step, model=model, tx=tx, preprocessing="caffe"))
        results[mode] = step(create_train_state(params, tx, 0, seed=0), batch), params
    ((a, ma), start), ((b, mb), _) = results["xla"], results["pallas"]
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    for name in ("kernel", "bias"):
        moved = b.trainable["backbone"]["conv1_1"][name] - start["backbone"]["conv1_1"][name]
        assert float(jnp.abs(moved).max()) > 1e-6, name


def test_the_training_config_chooses_where_conv1_1_runs(tmp_path, monkeypatch):
    # config.first_conv reaches the model the run builds; 'pallas' with an input width the
    # kernel cannot tile is one line naming the field, before anything runs.
    import sys
    from pathlib import Path

    from mlnet_jax.errors import UserError
    from mlnet_jax.train import train_and_evaluate
    sys.path.insert(0, str(Path(__file__).parent / "configs"))
    import tiny

    class Traced(Exception):
        pass

    seen = []

    def record(mode, shape, dtype, features=64):
        seen.append(mode)
        raise Traced

    monkeypatch.setattr(first_conv, "kernel_applies", record)
    config = tiny.get_config()
    config.first_conv = "xla"
    with pytest.raises(Traced):
        train_and_evaluate(config, tmp_path / "run")
    assert seen and set(seen) == {"xla"}

    config.first_conv, config.input_size = "pallas", (32, 40)
    with pytest.raises(UserError, match=r"^config.first_conv must be 'auto' or 'xla' where the "
                                        r"kernel cannot take conv1_1 \(the kernel takes widths "
                                        r"divisible by 16, got 40\), got 'pallas'$"):
        train_and_evaluate(config, tmp_path / "other")


def test_auto_traces_the_kernels_the_h200_measured_into_the_real_train_step(monkeypatch):
    # The real bfloat16 train step at 32 × 480×640, lowered for CUDA with 'auto' on a (faked)
    # lone Hopper GPU, calls the two Triton kernels with the shapes of the program measured on
    # the H200 as cand_conv1_pallas_bwd (+2.8 to +3.1 % training, 2026-11-28), whose optimised
    # HLO is committed: the forward from the (32, 482, 640, 16) column copies to conv1_1's
    # output, the weight gradient as partial sums per image, 32-row and 128-column block.
    import gzip
    import re
    from pathlib import Path

    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    info = ModelInfo(input_size=(480, 640), preprocessing="caffe")
    model, tx = info.build(jnp.bfloat16), make_optimizer(1e-3, 5e-4, 0.9)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 480, 640, 3)))["params"]
    state = jax.eval_shape(partial(create_train_state, tx=tx, frozen_convs=0, seed=0), params)
    batch = {"image": jax.ShapeDtypeStruct((32, 480, 640, 3), jnp.uint8),
             "target": jax.ShapeDtypeStruct((32, 60, 80, 1), jnp.float32)}
    card = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=card)):
        text = jax.jit(partial(train_step, model=model, tx=tx, preprocessing="caffe")).trace(
            state, batch).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2
    measured = gzip.open(Path(__file__).parents[1] / "benchmarks" / "results"
                         / "hlo-2026-11-28-nvidia-h200"
                         / "hlo_train_bfloat16_full_32x480x640_cand_conv1_pallas_bwd.txt.gz",
                         "rt").read()
    calls = [line for line in measured.splitlines() if '"__gpu$xla.gpu.triton"' in line]
    assert len(calls) == 2
    assert re.search(r"= bf16\[32,480,640,64\].* custom-call\(", calls[0])
    assert "bf16[32,482,640,16]" in calls[0]
    assert re.search(r"= \(f32\[32,15,5,3,16,64\].*, f32\[32,15,5,64\].*\) custom-call", calls[1])
    for shape in ("32x482x640x16xbf16", "32x480x640x64xbf16", "32x15x5x3x16x64xf32",
                  "32x15x5x64xf32"):
        assert f"tensor<{shape}>" in text, shape
    # The same launches: grid (the programs' rows and columns), warps and pipeline stages.
    launch = r"(grid_[xyz]|num_warps|num_stages) = (\d+) : i32"
    measured_launches = [m for c in calls for m in re.findall(launch, c)]
    assert len(measured_launches) == 10 and re.findall(launch, text) == measured_launches


def test_auto_keeps_xla_for_computations_placed_on_the_cpu_of_a_gpu_machine(monkeypatch):
    # With a Hopper GPU as the default backend, work placed on the CPU (jax.default_device, or
    # a Predictor over CPU devices) must not get the Triton call, which cannot run there
    # ("Only interpret mode is supported on CPU backend").
    from mlnet_jax.inference import ModelInfo, Predictor
    _fake_devices(monkeypatch)
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        assert not first_conv.kernel_applies("auto", HEADLINE, jnp.bfloat16)
    monkeypatch.undo()
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)  # as on the GPU machine
    info = ModelInfo(input_size=(16, 32), preprocessing="caffe", width_multiplier=0.25)
    model = info.build()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 32, 3)))
    model = info.build(jnp.bfloat16)
    assert model.first_conv == "auto"
    predictor = Predictor(model, variables, info, batch_size=1,
                          mesh=jax.sharding.Mesh(np.asarray([cpu]), ("data",)))
    image = np.random.default_rng(0).integers(0, 256, (16, 32, 3), np.uint8)
    (saliency,) = predictor([image])
    assert saliency.shape == (16, 32)
    from mlnet_jax.compute_dtype import cpu_bfloat16_convolutions_work
    if cpu_bfloat16_convolutions_work():  # (JAX 0.11-0.12's XLA:CPU: NaN in bfloat16 convs)
        assert np.isfinite(saliency).all()


def test_the_kernels_reading_the_image_compute_what_they_compute_from_the_column_copies(
        monkeypatch):
    # READS_THE_IMAGE: both kernels load their 16-channel windows from the image itself
    # (masked at its edges) instead of the column copies XLA writes: the same products and
    # sums (in Pallas's interpreter), maps and all three gradients bit for bit, on a size whose
    # programs meet every edge. For CUDA at the headline size: one Triton call forward and two
    # for the gradients, fed the image as (B, H, 3W), no column copies, no convolution left.
    rng = np.random.default_rng(7)
    x, kernel, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                       for s in ((2, 6, 48, 3), (3, 3, 3, 64), (64,)))
    weights = jnp.asarray(rng.standard_normal((2, 6, 48, 64)), jnp.float32)

    def maps_and_grads():
        loss = lambda *a: jnp.sum(first_conv.conv_bias_relu(*a) * weights)  # noqa: E731
        return first_conv.conv_bias_relu(x, kernel, bias), jax.grad(loss, (0, 1, 2))(
            x, kernel, bias)

    monkeypatch.setattr(first_conv, "READS_THE_IMAGE", False)
    expected = maps_and_grads()
    monkeypatch.setattr(first_conv, "READS_THE_IMAGE", True)
    got = maps_and_grads()
    assert float(jnp.mean(expected[0] == 0)) > 0.3  # the ReLU cuts, so the masks matter
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(g, e)

    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((32, 480, 640, 3), (3, 3, 3, 64),
                                                              (64,))]
    loss = lambda *a: jnp.sum(first_conv.conv_bias_relu(*a).astype(jnp.float32))  # noqa: E731
    texts = [lowered_for_an_h200(f, *shapes)
             for f in (first_conv.conv_bias_relu, jax.grad(loss, (1, 2)))]
    for text, calls in zip(texts, (1, 2)):
        assert text.count("__gpu$xla.gpu.triton") == calls
        assert "tensor<32x480x1920xbf16>" in text and "x16xbf16>" not in text
        assert "stablehlo.convolution" not in text
