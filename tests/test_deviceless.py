"""benchmarks/deviceless.py: compiling the headline steps for a GPU that is not here. Its
readers are checked on the card's own optimised HLO (committed from the 2026-11-28 H200 run)
and on ptxas's report format; the compile itself needs JAX's CUDA plugin, which CI lacks, so
that test runs only where the plugin is installed (it needs no GPU)."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "deviceless.py"
CARD_HLO = (REPO / "benchmarks" / "results" / "hlo-2026-11-28-nvidia-h200"
            / "hlo_train_bfloat16_full_32x480x640_cand_conv1_pallas_bwd.txt.gz")


def _load():
    spec = importlib.util.spec_from_file_location("_bench_deviceless", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deviceless = _load()
throughput = deviceless.throughput


def _has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _has_cuda_plugin() -> bool:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
        if importlib.util.find_spec("jax_plugins") else False


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_triton_calls_are_read_off_the_cards_own_hlo():
    # The training step measured on the H200 as cand_conv1_pallas_bwd (now the code): conv1_1's
    # two kernels with the grids first_conv launches them on at 32×480×640 and its 4 warps.
    from mlnet_jax import first_conv
    calls = deviceless.triton_calls(gzip.decompress(CARD_HLO.read_bytes()).decode())
    b, h, w = 32, 480, 640
    block_w = first_conv._block_width(w)
    assert {c["name"]: c["grid"] for c in calls} == {
        "conv1_1_bias_relu": [b * h // first_conv._divisor(h, (4, 2, 1)), w // block_w, 1],
        "conv1_1_weight_grad": [b, h // first_conv._divisor(h, (32, 16, 8, 4, 2, 1)), w // block_w]}
    assert {(c["num_warps"], c["num_stages"]) for c in calls} == {(first_conv.NUM_WARPS,
                                                                  first_conv.NUM_STAGES)}


def _ptxas_entry(name, registers, frame=None):
    """One kernel of ptxas's ``-v`` report, as XLA logs it (``frame``: stack, spill stores,
    spill loads; absent for kernels without a stack line)."""
    lines = [f"ptxas info    : Compiling entry function '{name}' for 'sm_90a'",
             f"ptxas info    : Function properties for {name}"]
    if frame:
        lines.append("    {} bytes stack frame, {} bytes spill stores, {} bytes spill loads"
                     .format(*frame))
    lines += [f"ptxas info    : Used {registers} registers, used 1 barriers",
              "ptxas info    : Compile time = 90.310 ms"]
    return "\n".join(lines) + "\n"


def test_summary_merges_ptxas_report_into_the_kernels_and_counts_every_byte():
    log = ("I1128 subprocess_compilation.cc:356] ptxas info    : 0 bytes gmem\n"
           + _ptxas_entry("conv1_1_bias_relu", 146, (0, 0, 0))
           + _ptxas_entry("conv1_1_weight_grad", 255, (40, 32, 24))
           + _ptxas_entry("loop_pad_fusion", 10)
           + _ptxas_entry("conv1_1_bias_relu__1", 152, (0, 0, 0))
           + _ptxas_entry("conv1_1_bias_relu_x", 255, (8, 8, 8)))
    kernels = deviceless.ptxas_kernels(log)
    assert kernels == {
        "conv1_1_bias_relu": {"registers": 146, "stack_bytes": 0, "spill_bytes": 0},
        "conv1_1_weight_grad": {"registers": 255, "stack_bytes": 40, "spill_bytes": 56},
        "loop_pad_fusion": {"registers": 10, "stack_bytes": None, "spill_bytes": None},
        "conv1_1_bias_relu__1": {"registers": 152, "stack_bytes": 0, "spill_bytes": 0},
        "conv1_1_bias_relu_x": {"registers": 255, "stack_bytes": 8, "spill_bytes": 16}}

    # A kernel compiled once per call (XLA suffixes __1, __2, …) reports its worst instance;
    # another kernel whose name merely starts the same is not one of them.
    text = gzip.decompress(CARD_HLO.read_bytes()).decode()
    summary = deviceless.summarize(text, object(), kernels)  # no memory analysis: None
    assert summary["executable_gib"] is None
    assert [(k["name"], k["registers"], k["spill_bytes"]) for k in summary["triton"]] == [
        ("conv1_1_bias_relu", 152, 0), ("conv1_1_weight_grad", 255, 56)]
    assert list(summary["spilling_kernels"]) == ["conv1_1_weight_grad", "conv1_1_bias_relu_x"]
    rows = deviceless.kernel_profile.hlo_traffic(text)
    assert sum(summary["traffic_gb"].values()) == pytest.approx(
        sum(r["read"] + r["written"] for r in rows) / 1e9, abs=0.01)
    assert summary["traffic_gb"]["Pallas kernel"] > 0


@pytest.mark.parametrize("args, expected", [
    (["--card", "a100"], "--card a100: expected a topology .pb file, tpu:<topology> or one of "
                         "h100, h200"),
    (["--card", "missing.pb"], "--card missing.pb: no such file"),
    (["--variants", "v3, nope"], "--variants: unknown nope"),
    (["--case", "abc"], "--case 'abc': expected one BxHxW"),
    (["--case", "2x64"], "--case '2x64': expected one BxHxW"),
    (["--case", ""], "--case '': expected one BxHxW"),
    (["--case", "2x60x64"], "--case '2x60x64': expected one BxHxW"),
    (["--case", "2x64x64,4x64x64"], "--case '2x64x64,4x64x64': expected one BxHxW"),
    (["--devices", "0"], "--devices 0: expected a count of devices that divides the batch of 32"),
    (["--devices", "3"], "--devices 3: expected a count of devices that divides the batch of 32")])
def test_bad_arguments_are_a_one_line_error(args, expected):
    result = _run(*args, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_the_card_description_a_run_saves_is_what_deviceless_compiles_for(tmp_path):
    # throughput.py on a GPU writes the card's own description beside its JSON; --card takes
    # that file. Here the CPU stands in for the card (JAX before 0.11 cannot serialize one).
    import jax
    from jax.experimental import topologies
    if not hasattr(topologies.TopologyDescription, "serialize"):
        pytest.skip(f"jax {jax.__version__} cannot serialize a topology")
    assert throughput.save_topology(SimpleNamespace(on_accelerator=False, card="cpu"),
                                    tmp_path) is None
    card = jax.devices()[0].device_kind
    name = throughput.save_topology(SimpleNamespace(on_accelerator=True, card=card), tmp_path)
    assert name == f"topology-{throughput.card_slug(card)}.pb"
    devices = deviceless.target_devices(str(tmp_path / name))
    assert [d.device_kind for d in devices] == [d.device_kind for d in jax.devices()]


@pytest.mark.skipif(_has_cuda_plugin(), reason="JAX's CUDA plugin is installed here")
def test_without_the_cuda_plugin_it_says_what_to_install():
    result = _run("--card", "h200", timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert 'pip install "jax[cuda13]==0.11.2"' in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not _has_cuda_plugin(), reason="needs JAX's CUDA plugin (no GPU)")
def test_with_the_cuda_plugin_the_code_compiles_for_an_h200(tmp_path):
    # The kernels compile through Triton and ptxas for sm_90a: registers come back for each.
    # The card is given as a saved topology (as a lease saves it), here made from gpu_specs'
    # in a process of its own (JAX there must not have tried, and failed, to start CUDA).
    card = tmp_path / "topology-nvidia-h200.pb"
    subprocess.run([sys.executable, "-c", f"""import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})
from jax.experimental import topologies
import deviceless
devices = deviceless.target_devices("h200")
open({str(card)!r}, "wb").write(topologies.TopologyDescription(devices).serialize())"""],
                   check=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = tmp_path / "out.json"
    result = _run("--card", str(card), "--case", "2x64x64", "--variants", "v3",
                  "--output", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["card"] == "NVIDIA H200"
    rows = {(r["variant"], r["task"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(None, "train"), (None, "predict"), ("v3", "train"), ("v3", "predict")}
    assert {k["name"] for k in rows[None, "train"]["triton"]} == {"conv1_1_bias_relu",
                                                                 "conv1_1_weight_grad"}
    assert all(k.get("registers", 0) > 0 for k in rows[None, "train"]["triton"])
    assert rows["v3", "train"]["triton"] == []  # v3: cuDNN's conv1_1
    assert rows["v3", "predict"]["traffic_gb"]["conv forward"] > rows[None, "predict"][
        "traffic_gb"]["conv forward"]


@pytest.mark.skipif(_has_libtpu(), reason="libtpu is installed here")
def test_without_libtpu_a_tpu_target_says_what_to_install():
    result = _run("--card", "tpu:v5e:2x2", timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert 'pip install "jax[tpu]==0.11.2"' in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not _has_libtpu(), reason="needs libtpu (no TPU)")
def test_with_libtpu_the_steps_compile_for_a_tpu_host_data_parallel(tmp_path):
    # A TPU v5e host's four chips, the batch split over them, in float32 (Colab's default):
    # both steps compile, conv1_1 is XLA's there (no Triton), and XLA says what each device
    # holds.
    out = tmp_path / "out.json"
    result = _run("--card", "tpu:v5e:2x2", "--devices", "4", "--case", "4x32x32",
                  "--dtype", "float32", "--output", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written["card"] == "TPU v5 lite" and written["devices"] == 4
    assert written["dtype"] == "float32"
    assert [(r["task"], r["status"]) for r in written["rows"]] == [("train", "compiled"),
                                                                   ("predict", "compiled")]
    assert all(r["triton"] == [] and r["executable_gib"] > 0 for r in written["rows"])
    too_many = _run("--card", "tpu:v5e:2x2", "--devices", "8", "--case", "8x32x32", timeout=300)
    assert too_many.stderr.strip().splitlines()[-1] == "--devices 8: tpu:v5e:2x2 has 4"
