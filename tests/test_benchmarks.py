"""benchmarks/throughput.py and merge_results.py: a CPU smoke run at a tiny size writes every
promised field with positive numbers, the deadline stops new work but keeps the JSON, and the
FLOP model equals an independent count over the real steps' jaxprs and the peer's formula."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_for_an_h200

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")
merge_results = _load("merge_results")
kernel_profile = _load("kernel_profile")


# --------------------------------------------------------------------------- FLOP model

def test_forward_flops_equal_the_torch_peer_and_the_anchors():
    # torch_peer.conv_flops (../shared/bench) gives exactly these; ANCHORS.md rounds to 246 / 61.6.
    assert throughput.forward_flops(480, 640) == 245_957_222_400
    assert throughput.forward_flops(240, 320) == 61_489_305_600
    assert throughput.forward_flops(480, 640) == pytest.approx(246e9, rel=5e-3)
    assert throughput.forward_flops(240, 320) == pytest.approx(61.6e9, rel=5e-3)


def test_jaxpr_counter_on_hand_counted_ops():
    x, k = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert throughput.jaxpr_flops(jax.make_jaxpr(conv)(x, k)) == {"conv": 2 * 25 * 4 * 18, "dot": 0}
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert throughput.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b))["dot"] == 2 * 3 * 5 * 4

    def scanned(a, b):  # nested jaxprs count, a scan's body once per iteration
        return jax.lax.scan(lambda c, _: (jax.jit(jnp.matmul)(c, b[:, :4]), None), a, None, length=7)[0]
    assert throughput.jaxpr_flops(jax.make_jaxpr(scanned)(a, jnp.ones((4, 4))))["dot"] == 7 * 2 * 3 * 4 * 4


@pytest.mark.parametrize("width, frozen", [(1.0, 0), (1.0, 10), (0.25, 13), (0.25, 5)])
def test_train_flops_equal_the_real_train_steps_jaxpr(width, frozen):
    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step

    rows, cols, batch_size = 32, 48, 2
    info = ModelInfo(input_size=(rows, cols), width_multiplier=width)
    model, tx = info.build(jnp.bfloat16), make_optimizer(1e-3, 5e-4, 0.9)
    state = create_train_state(throughput.random_params(rows, cols, width), tx, frozen, seed=0)
    batch = {"image": jnp.zeros((batch_size, rows, cols, 3), jnp.uint8),
             "target": jnp.zeros((batch_size, rows // 8, cols // 8, 1))}
    step = partial(train_step, model=model, tx=tx, preprocessing="caffe")
    counted = throughput.jaxpr_flops(jax.make_jaxpr(step)(state, batch))
    assert counted["conv"] == batch_size * throughput.train_flops(rows, cols, frozen, width)


def test_forward_flops_equal_the_real_predict_fns_jaxpr():
    from mlnet_jax.inference import ModelInfo, make_predict_fn

    info = ModelInfo(input_size=(40, 56))
    predict = make_predict_fn(info.build(), "caffe")
    variables = {"params": throughput.random_params(40, 56, 1.0)}
    counted = throughput.jaxpr_flops(jax.make_jaxpr(predict)(variables, jnp.zeros((3, 40, 56, 3), jnp.uint8)))
    assert counted["conv"] == 3 * throughput.forward_flops(40, 56)


def test_full_training_is_three_forwards_less_conv1_1_input_gradient():
    ratio = throughput.train_flops(480, 640, 0) / throughput.forward_flops(480, 640)
    assert 2.99 < ratio < 3.0
    frozen = throughput.train_flops(480, 640, 10) / throughput.forward_flops(480, 640)
    assert 1.5 < frozen < 1.53  # so frozen ≥ 2× full needs better efficiency, not fewer FLOPs


# --------------------------------------------------------------------------- runs

def _run(tmp_path, *args, timeout=600, env=None):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), *args,
                           "--output", str(out)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "OUT": str(tmp_path), **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(value):
    return isinstance(value, int | float) and value > 0 and np.isfinite(value)


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in *clocks_event_reasons*) reasons=", 0x0000000000000004"; idle=", 0x1" ;; esac
case "$*" in *OLD_DRIVER*clocks_event_reasons*)  # "-i GPU" comes before the fields
  echo 'Field "clocks_event_reasons.active" is not a valid field to query.'; exit 2 ;; esac
case "$*" in *SILENT*clocks_event_reasons*) exec 1>&-; sleep 0.2; exit 9 ;; esac
echo "1980, 1980, 2619, 80.00, 700.00, 40$idle"
case "$*" in *--loop-ms*) ;; *) exit 0 ;; esac
while :; do echo "1755, 1980, 2619, 690.00, 700.00, 66$reasons"; sleep 0.005; done
"""


def _fake_nvidia_smi(tmp_path) -> dict:
    """PATH with an ``nvidia-smi`` that prints one idle sample, then, when asked to loop,
    samples of a card held at 1755 MHz by its 700 W power cap until it is stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _is_the_capped_card(gpu: dict) -> bool:
    # The idle first sample (1980 MHz, 80 W) was taken before the block and is left out.
    return (gpu["sm_mhz_median"] == gpu["sm_mhz_min"] == 1755 and gpu["power_w_mean"] == 690
            and gpu["power_capped_fraction"] == 1.0 and gpu["sm_mhz_max_supported"] == 1980
            and gpu["temperature_c_max"] == 66 and gpu["samples"] >= 1)


def test_gpu_monitor_keeps_the_samples_taken_inside_the_block(tmp_path, monkeypatch):
    gpu_monitor = _load("gpu_monitor")
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path)["PATH"])
    with gpu_monitor.GpuMonitor() as monitor:
        time.sleep(0.3)
    assert _is_the_capped_card(monitor.summary) and monitor.summary["samples"] > 5
    assert monitor.summary["clock_event_reasons"] == {"SW power cap": 1.0}  # not the idle one
    assert monitor.process.poll() is not None  # stopped on exit
    assert ("1755 MHz (max 1980), 690 W of 700, 100 % of samples capped, held by SW power cap "
            "100 %") == gpu_monitor.describe(monitor.summary)
    # A driver that does not know the reasons field: the same samples without it.
    for driver in ("OLD_DRIVER", "SILENT"):  # says why on stdout; closes it and exits later
        with gpu_monitor.GpuMonitor(gpu=f"0 {driver}") as old:
            time.sleep(0.3)
        assert old.fields == gpu_monitor.BASE_FIELDS and _is_the_capped_card(old.summary)
        assert "clock_event_reasons" not in old.summary
    with gpu_monitor.GpuMonitor(command="no-such-nvidia-smi") as absent:
        pass
    assert absent.summary is None and gpu_monitor.describe(None) == "no GPU samples"


def test_gpu_monitor_skips_unavailable_fields_and_foreign_lines():
    gpu_monitor = _load("gpu_monitor")
    summary = gpu_monitor.summarize("1500, [N/A], 2619, 300.5, [N/A], 50, 0x24\n"
                                    "Failed to query\n"
                                    "1700, [N/A], 2619, 400.5, [N/A], 55, [N/A]\n"
                                    "1700, [N/A], 2619, 400.5, [N/A], 55, 0x4\n")
    assert summary == {"samples": 3, "sm_mhz_median": 1700, "sm_mhz_min": 1500,
                       "mem_mhz_median": 2619, "power_w_mean": 367.1666666666667,
                       "power_w_max": 400.5, "temperature_c_max": 55,
                       "clock_event_reasons": {"SW power cap": 1.0, "SW thermal": 0.5}}
    assert gpu_monitor.summarize("Field clocks.max.sm is not valid\n") is None
    idle_then_capped = gpu_monitor.summarize("1980, 1980, 2619, 80, 700, 40, 0x1\n"
                                             "1755, 1980, 2619, 699, 700, 66, 0x4\n")
    assert idle_then_capped["clock_event_reasons"] == {"idle": 0.5, "SW power cap": 0.5}
    assert gpu_monitor.describe(idle_then_capped).endswith(
        "50 % of samples capped, held by SW power cap 50 %")  # idle holds no clock


FAKE_PEER = """import json, os, sys
print("fake peer", *sys.argv[1:])
rows = [{"fw": "torch", "task": task, "mode": "bf16_cl_compile", "bs": 1, "h": 32, "w": 48,
         "img_s": rate} for task, rate in (("train", 10.0), ("infer", 40.0))]
json.dump(rows, open(os.path.join(os.environ["OUT"], "peer_torch.json"), "w"))
"""


@pytest.mark.timeout(600)
def test_the_device_script_runs_the_peer_then_ours_and_merges_them(tmp_path):
    # benchmarks/gpu_run.sh is the one command a device lease runs: a mistake in it costs the
    # lease. Here on the CPU, in its levers focus, with a fake peer and a fake nvidia-smi.
    (tmp_path / "peer.py").write_text(FAKE_PEER)
    out = tmp_path / "out"
    out.mkdir()
    path = f"{Path(sys.executable).parent}{os.pathsep}{_fake_nvidia_smi(tmp_path)['PATH']}"
    env = {**os.environ, "PATH": path, "OUT": str(out), "PEER": str(tmp_path / "peer.py"),
           "FOCUS": "levers", "CASES_FOCUS": "1x32x48", "VARIANTS": "", "PEER_DEADLINE": "7",
           "BUDGET_S": "400", "JAX_ARGS": "--quick --width-multiplier 0.25",
           "PREDICT_HOST": "1", "PREDICT_HOST_ARGS": "--images 3 --workers 2 --repeats 1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh")], env=env,
                          capture_output=True, text=True, timeout=540)
    log = (out / "run.log").read_text()
    assert proc.returncode == 0 and "done in" in log, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fake peer --cases 1x32x48 --deadline 7" in log  # the peer first, on our case
    ours = json.loads((out / "jax_throughput.json").read_text())
    (merged_file,) = out.glob("20*-cpu.json")
    merged = json.loads(merged_file.read_text())
    rate = {r["task"]: r["images_per_s"] for r in ours["results"] if r["case"] == "1x32x48"
            and r["dtype"] == "bfloat16" and r["mode"] in ("full", None) and not r["variant"]}
    assert merged["train_ratio_vs_torch_compile"] == pytest.approx(rate["train"] / 10.0)
    assert merged["predict_ratio_vs_torch_compile"] == pytest.approx(rate["predict"] / 40.0)
    assert ours["args"]["deadline"] <= 400 - 120  # the budget's margin, after the peer's time
    assert {"dumps.tar.gz", "profile.tar.gz", "env.txt", "gpu_samples.csv"} <= {
        p.name for p in out.iterdir()}
    # Nothing nested and at most 8 files, what the device tool brings back: what it may leave
    # out if the run is cut is packed at the end.
    assert not [p for p in out.iterdir() if p.is_dir()] and len(list(out.iterdir())) <= 8
    assert "predict command's host path, 3 fake 640x480 JPEGs" in log  # its table, last
    assert ours["planned"] and ours["complete"] and ours["failed"] == []
    assert "1755, 1980, 2619, 690.00, 700.00, 66" in (out / "gpu_samples.csv").read_text()


PIPELINE_FAILS = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("throughput", sys.argv[1])
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)
import mlnet_jax.input_pipeline as input_pipeline
original = input_pipeline.prefetch_to_device
def failing(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
        if i == 8:  # after the loader-only phase, among the train steps on the kept state
            raise RuntimeError("a grain worker died")
        yield batch
input_pipeline.prefetch_to_device = failing
throughput.main(["--cases", "1x32x48", "--quick", "--width-multiplier", "0.25", "--dtypes",
                 "bfloat16", "--modes", "full", "--no-compile-cache", "--no-predict",
                 "--pipeline", "--pipeline-records", "4", "--profile", sys.argv[2] + "/profile",
                 "--output", sys.argv[2] + "/result.json"])
"""


@pytest.mark.timeout(300)
def test_a_failed_pipeline_run_loses_only_itself(tmp_path):
    subprocess.run([sys.executable, "-c", PIPELINE_FAILS, str(REPO / "benchmarks" / "throughput.py"),
                    str(tmp_path)], check=True, capture_output=True, timeout=280, cwd=REPO)
    result = json.loads((tmp_path / "result.json").read_text())
    [failed] = [r for r in result["results"] if "error" in r]
    assert failed["label"].startswith("pipeline") and "grain worker died" in failed["error"]
    assert result["failed"] == [failed["label"]] and not result["complete"]
    # The profile after it traces the train step on the kept state, which the pipeline's
    # steps had donated: it must have been kept up to date.
    profile = result["profile"]["1x32x48 bfloat16 full"]
    assert "error" not in profile and profile["traced_s"] > 0


def test_predict_host_runs_the_commands_own_folder_path(tmp_path):
    # The host ceiling of a folder run: every photo's map written as a PNG of its size by
    # predict_images itself, per worker count, with a device stand-in that answers at once.
    predict_host = throughput.sibling("predict_host")
    out = tmp_path / "host.json"
    assert predict_host.main(["--images", "10", "--workers", "1", "2", "--repeats", "2",
                              "--devices", "instant", "jax", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["device"], r["workers"]) for r in rows] == [("instant", 1), ("instant", 2),
                                                           ("jax", 1), ("jax", 2)]
    assert all(r["maps_written"] == 10 and len(r["repeats"]) == 2 for r in rows)
    assert all(0 < rate < 10_000 for r in rows for rate in r["repeats"])
    # Where the time went: every stage was seen, and one worker's stages fill most of its
    # wall time (it has nothing else to do); the instant device takes next to none.
    for row in rows:
        ms = row["stage_ms_per_image"]
        assert set(ms) == {"header", "decode", "letterbox", "write", "dispatch", "fetch"}
        assert ms["decode"] > 0 and ms["write"] > 0 and 0 < row["workers_busy"] <= 1
    # Through JAX the maps are the same: fetched device arrays, written as the same PNG files.
    instant, via_jax = (predict_host.DEVICES[name]() for name in ("instant", "jax"))
    batch = np.zeros((3, 480, 640, 3), np.uint8)
    np.testing.assert_allclose(np.asarray(via_jax.dispatch_letterboxed(batch)),
                               instant.dispatch_letterboxed(batch), rtol=1e-6)
    one = rows[0]
    assert one["workers_busy"] > 0.5, one
    assert sum(one["stage_ms_per_image"][k] for k in ("header", "decode", "letterbox", "write")) \
        <= 1e3 / min(one["repeats"])
    # The stages are unpatched after the run.
    import mlnet_jax.inference
    import mlnet_jax.predict
    assert mlnet_jax.predict.load_image.__module__ == "mlnet_jax.image_io"
    assert mlnet_jax.inference._fetched.__module__ == "mlnet_jax.inference"


NOT_INSTALLED = """import runpy, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["throughput.py", "predict_host.py"])
def test_device_scripts_run_from_a_checkout_without_the_package_installed(script, tmp_path):
    # The device machine runs them from the copied tree: nothing is pip-installed there.
    bootstrap = tmp_path / "not_installed.py"
    bootstrap.write_text(NOT_INSTALLED.format(repo=str(REPO)))
    probe = tmp_path / "probe.py"  # the bootstrap does hide the installed package
    probe.write_text("import mlnet_jax\n")
    hidden = subprocess.run([sys.executable, str(bootstrap), str(probe)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert "No module named 'mlnet_jax'" in hidden.stderr
    proc = subprocess.run([sys.executable, str(bootstrap), str(REPO / "benchmarks" / script)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_merge_survives_a_peer_file_cut_short(tmp_path, capsys):
    (tmp_path / "jax.json").write_text(json.dumps({"card": "cpu", "date": "2026-11-27",
                                                   "results": []}))
    (tmp_path / "peer.json").write_text('[{"fw": "torch", "task": "tr')
    assert merge_results.main(["--jax", str(tmp_path / "jax.json"), "--torch",
                               str(tmp_path / "peer.json"), "--out-dir", str(tmp_path)]) == 0
    assert "is cut short" in capsys.readouterr().err
    (merged,) = tmp_path.glob("2026-11-27-*.json")
    assert json.loads(merged.read_text())["train_ratio_vs_torch_compile"] is None


def test_cpu_smoke_run_writes_every_promised_field(tmp_path):
    result, stdout = _run(tmp_path, "--cases", "2x32x32", "--quick", "--dtypes", "float32",
                          "--modes", "full,frozen", "--width-multiplier", "0.25", "--batch-sweep",
                          "--sweep-batches", "1", "--pipeline", "--pipeline-records", "4",
                          "--variants", "v0,xla_no_command_buffers",
                          "--profile", str(tmp_path / "profile"), env=_fake_nvidia_smi(tmp_path))
    assert result["complete"] and not result["skipped"] and "errors" not in result
    assert result["card"] and result["backend"] == "cpu" and result["software"]["jax"]
    assert isinstance(result["xla_flags"], str) and "jax_default_matmul_precision" in result["jax_config"]
    assert _positive(result["matmul_ceiling"]["float32"]["tflops"])
    assert _positive(result["floors"]["2x32x32"]["frozen"]["train_flops_per_image"])

    rows = {(r["task"], r["mode"], r["case"], r.get("variant")): r for r in result["results"]}
    assert set(rows) == {("train", "full", "2x32x32", None), ("train", "frozen", "2x32x32", None),
                         ("predict", None, "2x32x32", None), ("train", "full", "1x32x32", None),
                         ("predict", None, "1x32x32", None), ("train", "full", "2x32x32", "v0"),
                         ("predict", None, "2x32x32", "v0"),  # v0 changed the forward too
                         ("train", "full", "2x32x32", "xla_no_command_buffers"),
                         ("predict", None, "2x32x32", "xla_no_command_buffers")}
    # Each variant's result beside the code's, from the same state and batch: another XLA
    # option computes the same step and maps; v0 draws its dropout masks another way, so its
    # step moves the parameters elsewhere, though its maps (no dropout) are the code's.
    same = rows[("train", "full", "2x32x32", "xla_no_command_buffers")]["vs_code"]
    assert same["update_difference"] == {"max": 0, "l2": 0} and same["loss"] == same["code_loss"]
    assert same["code_update_difference"] == {"max": 0, "l2": 0}  # the CPU repeats itself
    v0 = rows[("train", "full", "2x32x32", "v0")]["vs_code"]
    assert v0["update_difference"]["max"] > 0.1 and v0["loss"] != v0["code_loss"]
    assert v0["differs_by_design"] == "other dropout masks" and "differs_by_design" not in same
    for variant in ("v0", "xla_no_command_buffers"):
        check = rows[("predict", None, "2x32x32", variant)]["vs_code"]
        assert check["maps_difference"]["max"] < 1e-6 and check["code_maps_difference"]["l2"] == 0
    assert "update max 0.0e+00, L2 0.0e+00 (the code's vs itself max 0.0e+00" in stdout
    assert "other dropout masks by design" in stdout
    rows = {key[:3]: row for key, row in rows.items() if not key[3]}
    assert not any("vs_code" in row for row in rows.values())
    assert rows[("train", "full", "1x32x32")]["sweep"] and not rows[("train", "full", "2x32x32")]["sweep"]
    for row in rows.values():
        for key in ("images_per_s", "step_ms", "tflops", "ceiling_fraction", "first_step_s",
                    "flops_per_image"):
            assert _positive(row[key]), (row["label"], key, row[key])
        assert row["compile_s"] >= 0 and len(row["step_ms_repeats"]) == row["repeats"]
        assert _positive(row["executable_memory"]["peak_estimate_bytes"])
        assert "peak_bytes_in_use" in row["device_memory"]  # None on CPU, bytes on a GPU
    # The GPU samples taken while each row was timed (a fast CPU row may have none).
    sampled = [r["gpu_during_timing"] for r in result["results"] if r["gpu_during_timing"]]
    assert sampled and all(_is_the_capped_card(gpu) for gpu in sampled)

    cache = result["compile_cache"]
    for label in ("cold", "warm"):
        for key in ("first_step_s", "process_to_first_step_s", "process_wall_s"):
            assert _positive(cache[label][key]), (label, key)
    assert cache["warm"]["cache_files"] > 0

    pipeline = result["pipeline"]
    for key in ("images_per_s", "synthetic_images_per_s", "ratio_to_synthetic"):
        assert _positive(pipeline[key]), key
    assert _positive(pipeline["runs"][0]["loader_only_images_per_s"])
    for run in (pipeline, pipeline["runs"][0]):  # the "within 10 %" is this ratio
        assert run["ratio_to_synthetic"] == pytest.approx(
            run["images_per_s"] / run["synthetic_images_per_s"])
    files = result["predict_files"]  # the predict command's path over a folder of JPEG files
    assert files["maps_written"] == files["records"] == 4
    assert files["stage_ms_per_image"]["fetch"] > 0 and 0 < files["workers_busy"] <= 1
    for key in ("images_per_s", "synthetic_images_per_s", "ratio_to_synthetic"):
        assert _positive(files[key]), key
    assert files["synthetic_images_per_s"] == rows[("predict", None, "2x32x32")]["images_per_s"]
    assert files["ratio_to_synthetic"] == pytest.approx(files["images_per_s"]
                                                        / files["synthetic_images_per_s"])

    # CPU traces have no device kernels: the summary says so; the trace itself is kept.
    assert set(result["profile"]) == {"2x32x32 float32 full", "2x32x32 float32 predict"}
    assert all(p["kernels_traced"] == 0 and "no device kernel" in p["note"]
               for p in result["profile"].values())
    assert all(_is_the_capped_card(p["gpu_during_trace"]) for p in result["profile"].values())
    kept = sorted(f.name for f in (tmp_path / "profile").rglob("*") if f.is_file())
    assert kept == ["perfetto_trace.json.gz"] * 2

    assert "img/s" in stdout and "compile cache" in stdout and "pipeline" in stdout
    assert "from JPEG files to PNG maps" in stdout
    assert " 1755  690" in stdout and "GPU while traced: 1755 MHz" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("JSON:")


def test_deadline_stops_new_work_and_keeps_the_json(tmp_path):
    result, stdout = _run(tmp_path, "--cases", "2x32x32", "--quick", "--dtypes", "float32",
                          "--width-multiplier", "0.25", "--deadline", "0")
    assert not result["results"] and not result["complete"]
    assert "train float32 full 2x32x32" in result["skipped"]
    assert result["compile_cache"]["cold"] == {"skipped": "deadline"}
    assert "not started" in stdout


def _train_step_hlo(width=0.25, size=16):
    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step

    info = ModelInfo(input_size=(size, size), preprocessing="caffe", width_multiplier=width)
    model, tx = info.build(), make_optimizer(1e-3, 5e-4, 0.9)
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    state = create_train_state(params, tx, 0, seed=0)
    batch = {"image": jnp.zeros((2, size, size, 3), jnp.uint8),
             "target": jnp.zeros((2, size // 8, size // 8, 1))}
    step = jax.jit(partial(train_step, model=model, tx=tx, preprocessing="caffe"))
    return step.lower(state, batch).as_text()


def test_variants_recreate_the_earlier_levers_only_while_tracing():
    # The code as it is has no reduce_window (so no select_and_scatter in the gradient); the
    # v0 variant puts it back while tracing, and only then.
    current = _train_step_hlo(width=1 / 2)  # 640 head channels: divisible by 32
    assert "reduce_window" not in current and "select_and_scatter" not in current
    with throughput.patched("v0"):
        v0 = _train_step_hlo(width=1 / 2)
    assert "reduce_window" in v0 and "select_and_scatter" in v0
    assert _train_step_hlo(width=1 / 2) == current  # the patch is gone after the block


# --------------------------------------------------------------------------- kernel profile

GPU_HLO = """
ENTRY %main.9 (p0: bf16[4,8,8,3], p1: bf16[64,3,3,3], p2: bf16[4,8,8,64]) -> bf16[4,8,8,64] {
  %p0 = bf16[4,8,8,3]{3,2,1,0} parameter(0)
  %p1 = bf16[64,3,3,3]{3,2,1,0} parameter(1)
  %p2 = bf16[4,8,8,64]{3,2,1,0} parameter(2)
  %custom-call.3 = (bf16[4,8,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), window={size=3x3}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBiasActivationForward", backend_config={"x":(1)}
  %custom-call.4 = (bf16[4,8,8,3]{3,2,1,0}, u8[0]{0}) custom-call(%p2, %p1), dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput"
  %loop_select_fusion.2 = bf16[4,8,8,64]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.2
  %input_reduce_fusion = f32[64]{0} fusion(%p0), kind=kInput, calls=%fused_computation.3
  ROOT %copy.1 = bf16[4,8,8,64]{3,2,1,0} copy(%loop_select_fusion.2)
}
"""


def _gpu_like_trace():
    """The shape of a CUPTI trace as the profiler's perfetto file writes it: a device process
    with stream lines and derived lines, and a host process."""
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "python"}}]

    def kernel(name, us, hlo_op, tid=7, pid=1):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": us, "name": name,
                "args": {"hlo_op": hlo_op, "hlo_module": "jit_train_step"}}

    per_step = [kernel("sm90_xmma_fprop_implicit_gemm_bf16", 600.0, "custom-call.3"),
                kernel("sm90_xmma_dgrad_implicit_gemm_bf16", 300.0, "command_buffer.1"),  # in a graph
                kernel("loop_select_fusion_2", 150.0, "command_buffer.1"),
                kernel("input_reduce_fusion", 50.0, "input_reduce_fusion"),
                kernel("copy_1", 20.0, "copy.1"),
                kernel("Memcpy DtoD", 30.0, ""),
                kernel("loop_select_fusion.2", 999.0, "loop_select_fusion.2", tid=8),  # derived line
                kernel("PjitFunction(train_step)", 5000.0, "", tid=1, pid=2)]          # host
    return meta + per_step * 2


def test_kernel_profile_sums_device_stream_time_by_category():
    summary = kernel_profile.summarize(_gpu_like_trace(), GPU_HLO, steps=2, step_ms=1.6)
    assert summary["kernels_traced"] == 12  # 6 stream kernels × 2 steps; derived and host lines out
    ms = {c["category"]: c["ms_per_step"] for c in summary["categories"]}
    assert ms == pytest.approx({"conv forward": 0.6, "conv input grad": 0.3,
                                "element-wise fusion": 0.15, "reduction fusion": 0.05,
                                "copy/transpose": 0.02, "memory operation": 0.03})
    assert summary["busy_ms_per_step"] == pytest.approx(1.15)
    assert summary["busy_fraction"] == pytest.approx(1.15 / 1.6)
    assert sum(c["share_of_busy"] for c in summary["categories"]) == pytest.approx(1.0)
    top = summary["top_kernels"][0]
    assert top["kernel"].startswith("sm90_xmma_fprop") and top["per_step"] == 1
    assert top["shape"].startswith("(bf16[4,8,8,64]")  # named through hlo_op
    conv_flops = 2 * (4 * 8 * 8) * (64 * 3 * 3 * 3)  # forward: batch·rows·cols × filter, 2·MAC
    assert top["tflops"] == pytest.approx(conv_flops / 600e-6 / 1e12)
    rates = {c["category"]: c["tflops"] for c in summary["categories"]}
    assert rates["conv forward"] == pytest.approx(conv_flops / 600e-6 / 1e12)
    assert rates["conv input grad"] == pytest.approx(conv_flops / 300e-6 / 1e12)  # same MACs
    assert rates["element-wise fusion"] is None
    assert summary["mapped_by"] == {"kernel name": 6, "hlo_op": 2, "kernel name heuristics": 4}
    assert summary["device_lines"] == {"Stream #7(Compute)": 12, "XLA Ops": 2}


def test_kernel_profile_finds_the_device_idle_between_and_inside_steps():
    def kernel(name, start, us):
        return {"ph": "X", "pid": 1, "tid": 7, "ts": start, "dur": us, "name": name}

    events = [e for e in _gpu_like_trace() if e["ph"] == "M"] + [
        kernel("conv", 0, 600), kernel("fusion", 610, 300),      # step 1: 10 us launch gap
        kernel("small", 650, 100),                                # overlaps: no gap, no negative
        kernel("conv", 1910, 600), kernel("fusion", 2510, 300)]  # 1000 us between the steps
    gaps = kernel_profile.idle_gaps(kernel_profile.device_kernels(events), steps=2)
    assert gaps["traced_ms_per_step"] == pytest.approx(2.81 / 2)
    assert gaps["idle_ms_per_step"] == pytest.approx(1.010 / 2)
    assert [(g["us"], g["after"], g["before"]) for g in gaps["largest_gaps"]] == [
        (1000, "fusion", "conv"), (10, "conv", "fusion")]


def test_kernel_profile_keeps_undecorated_device_lines_but_not_derived_ones():
    # Should a profiler name its stream lines otherwise, the kernels are still found.
    events = [{**e, "args": {"name": "Compute"}} if e.get("args", {}).get("name") == "Stream #7(Compute)"
              else e for e in _gpu_like_trace()]
    summary = kernel_profile.summarize(events, GPU_HLO, steps=2)
    assert summary["kernels_traced"] == 12 and summary["busy_ms_per_step"] == pytest.approx(1.15)


def test_kernel_profile_reads_a_kept_trace_offline(tmp_path, capsys):
    import gzip
    trace_dir = tmp_path / "trace" / "plugins" / "profile" / "run"
    trace_dir.mkdir(parents=True)
    with gzip.open(trace_dir / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": _gpu_like_trace()}, f)
    (tmp_path / "hlo.txt.gz").write_bytes(gzip.compress(GPU_HLO.encode()))
    assert kernel_profile.main(["trace", str(tmp_path / "trace"), str(tmp_path / "hlo.txt.gz"),
                                "--steps", "2", "--step-ms", "1.6"]) == 0
    out = capsys.readouterr().out
    assert "1.15 ms of kernels per step = 71.9 % of the 1.60 ms step" in out
    assert "conv forward" in out and "sm90_xmma_fprop" in out


def test_hlo_traffic_counts_operands_and_results_without_cudnn_workspace():
    rows = {r["instruction"]: r for r in kernel_profile.hlo_traffic(GPU_HLO)}
    assert set(rows) == {"custom-call.3", "custom-call.4", "loop_select_fusion.2",
                         "input_reduce_fusion", "copy.1"}  # parameters move nothing themselves
    x, w, y = 4 * 8 * 8 * 3 * 2, 64 * 3 * 3 * 3 * 2, 4 * 8 * 8 * 64 * 2  # bf16 bytes
    assert (rows["custom-call.3"]["read"], rows["custom-call.3"]["written"]) == (x + w, y)
    assert (rows["custom-call.4"]["read"], rows["custom-call.4"]["written"]) == (y + w, x)
    assert (rows["input_reduce_fusion"]["read"], rows["input_reduce_fusion"]["written"]) == (x, 64 * 4)
    assert (rows["copy.1"]["read"], rows["copy.1"]["written"]) == (y, y)
    assert kernel_profile.shape_bytes("(bf16[2,3]{1,0}, pred[5]{0}, u8[100]{0})") == 12 + 5 + 100
    assert kernel_profile.shape_bytes("(bf16[2,3]{1,0}, u8[100]{0})", workspace=False) == 12


H200_HLO = REPO / "benchmarks" / "results" / "hlo-2026-11-26-nvidia-h200"


def test_hlo_traffic_of_conv1_1s_mask_and_bias_gradient_on_the_h200(capsys):
    # The fusion NOTES.md names as the largest: reads the incoming gradient and the
    # pre-activation, writes the masked gradient and the bias gradient's partial sums.
    path = H200_HLO / "hlo_train_bfloat16_full_32x480x640.txt.gz"
    rows = {r["instruction"]: r for r in kernel_profile.hlo_traffic(
        kernel_profile._read_hlo(str(path)))}
    activation = 32 * 480 * 640 * 64 * 2
    fusion = rows["input_reduce_select_fusion.13"]
    assert (fusion["read"], fusion["written"]) == (2 * activation, activation + 4800 * 64 * 2)
    assert kernel_profile.main(["traffic", str(path), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "3.78 GB reduction fusion       input_reduce_select_fusion.13" in out


@pytest.mark.parametrize("name, mode", [("train_bfloat16_full", "full"),
                                        ("train_bfloat16_frozen", "frozen"),
                                        ("predict_bfloat16", "predict")])
def test_cudnn_calls_of_the_h200_executables_do_the_modelled_flops(name, mode):
    # XLA's compiled program on the H200 (the run of 2026-11-26) against the analytic model:
    # every instruction parses, and the FLOPs of its cuDNN calls add up to exactly the model's.
    import gzip
    import re
    text = gzip.decompress((H200_HLO / f"hlo_{name}_32x480x640.txt.gz").read_bytes()).decode()
    names = kernel_profile.hlo_categories(text)
    entry = text[text.index("\nENTRY"):]
    defined = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", entry, re.M)
    assert len(defined) > 100 and all(n in names for n in defined)
    convs = [names[n] for n in defined if names[n]["category"].startswith("conv ")]
    assert convs and all(c["flops"] for c in convs)
    expected = 32 * (throughput.forward_flops(480, 640) if mode == "predict" else
                     throughput.train_flops(480, 640, 10 if mode == "frozen" else 0))
    assert sum(c["flops"] for c in convs) == expected
    kinds = {c["category"] for c in convs}
    assert kinds == ({"conv forward"} if mode == "predict" else
                     {"conv forward", "conv input grad", "conv weight grad"})
    # Every fusion is named for what it does, whichever emitter (XLA's or Triton's) made it.
    fusions = {names[n]["category"] for n in defined if " fusion(" in entry.split(f"%{n} = ")[1][:300]}
    assert {"element-wise fusion", "copy/transpose", "gemm"} <= fusions
    assert not fusions & {"fusion", "custom call", "unmapped"}
    if mode == "full":  # conv1_1's ReLU mask and bias gradient, a multi-output reduction
        assert names["input_reduce_select_fusion.13"]["category"] == "reduction fusion"


def test_the_profile_names_the_pallas_kernels_of_the_h200_program():
    # The conv1_1 kernels (Triton custom calls) are their own kind in the per-kernel table, not
    # "custom call": the program measured on 2026-11-28 with both of them.
    import gzip
    text = gzip.open(REPO / "benchmarks" / "results" / "hlo-2026-11-28-nvidia-h200"
                     / "hlo_train_bfloat16_full_32x480x640_cand_conv1_pallas_bwd.txt.gz",
                     "rt").read()
    names = kernel_profile.hlo_categories(text)
    pallas = {n for n, e in names.items() if e["category"] == "Pallas kernel"}
    assert {"pallas_call.4", "pallas_call.5"} <= pallas
    assert not any(e["category"] == "custom call" for e in names.values())


def _leaf(tree, path):
    """The leaf of ``tree`` at a ``tree_flatten_with_path`` key path."""
    for key in path:
        tree = tree[key.key]
    return tree


def _count_calls(monkeypatch, module, *names) -> list:
    """(name, first argument's shape) of each call of ``module``'s functions ``names`` from
    now on (while traced: once per trace)."""
    calls = []

    def counted(name, original):
        def call(first, *args, **kwargs):
            calls.append((name, first.shape))
            return original(first, *args, **kwargs)
        return call
    for name in names:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    return calls


@pytest.fixture(autouse=True)
def _nothing_adopted(request, monkeypatch):
    """Every candidate kernel's switch off, whatever a lease has adopted since: the variants
    are measured against (and cached beside) the code with nothing adopted, as v4 makes it."""
    if request.node.name == "test_nothing_is_adopted_before_a_measurement":
        return
    from mlnet_jax import bias_gradients, first_conv, head_kernel, second_conv
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset())
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset())
    monkeypatch.setattr(head_kernel, "ADOPTED", False)
    monkeypatch.setattr(first_conv, "READS_THE_IMAGE", False)


@cache  # the code as it is serves several comparisons
def _one_train_step(variant, width=0.25, size=16, pooling="standard"):
    """One real train step (lr 1e-2, fixed data) with ``variant`` patched in while tracing:
    the new state, the metrics and the starting parameters."""
    from mlnet_jax.inference import ModelInfo
    from mlnet_jax.optim import make_optimizer
    from mlnet_jax.train import create_train_state, train_step
    info = ModelInfo(input_size=(size, size), preprocessing="caffe", width_multiplier=width,
                     pooling=pooling)
    model, tx = info.build(), make_optimizer(1e-2, 5e-4, 0.9)
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    rng = np.random.default_rng(2)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, size, size, 3)), jnp.uint8),
             "target": jnp.asarray(rng.uniform(size=(2, size // 8, size // 8, 1)), jnp.float32)}
    with throughput.patched(variant):
        state, metrics = jax.jit(partial(train_step, model=model, tx=tx, preprocessing="caffe"))(
            create_train_state(params, tx, 0, seed=0), batch)
    return state, metrics, params


def test_v1_variant_trains_the_same_step_without_the_barriers():
    # v1 re-creates autodiff's ReLU and pooling gradients: the same update as the code as it
    # is (the ReLU's gradient is the same; the pools' differs only at ties of positive float32
    # values, which random weights do not make), and the program loses the barriers that keep
    # XLA from folding the ReLU masks back onto the pre-activations.
    current = _train_step_hlo(width=1 / 2)
    with throughput.patched("v1"):
        v1 = _train_step_hlo(width=1 / 2)
    assert current.count("optimization_barrier") == 15  # every ReLU: 13 convolutions + 2 head
    assert "optimization_barrier" not in v1

    (a, ma, start), (b, mb, _) = _one_train_step(None), _one_train_step("v1")
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    conv1_1 = a.trainable["backbone"]["conv1_1"]["kernel"] - start["backbone"]["conv1_1"]["kernel"]
    assert float(jnp.abs(conv1_1).max()) > 1e-6  # the gradient reached the first layer


@cache
def _predict(variant):
    """The real-width model's predict function on two fixed 16×16 images with ``variant``
    patched in while tracing: its lowered text and its maps."""
    from mlnet_jax.inference import ModelInfo, make_predict_fn
    info = ModelInfo(input_size=(16, 16), preprocessing="caffe")
    model = info.build()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
    with throughput.patched(variant):
        fn = make_predict_fn(model, info.preprocessing)
        return fn.lower(variables, images).as_text(), np.asarray(fn(variables, images))


def test_candidate_rgb8_pads_conv1_1_only_and_predicts_the_same_maps():
    (text, maps), (text8, maps8) = _predict(None), _predict("cand_rgb8")
    np.testing.assert_allclose(maps8, maps, rtol=1e-5, atol=1e-6)
    assert "tensor<3x3x3x64x" in text and "tensor<3x3x8x64x" not in text
    assert "tensor<3x3x8x64x" in text8 and "tensor<2x16x16x8x" in text8
    assert text8.count("stablehlo.convolution") == text.count("stablehlo.convolution")
    assert jax.lax.conv_general_dilated is throughput._LOADED["conv"]  # restored after the block


def test_v3_variant_puts_back_cudnns_conv1_1_and_its_relu():
    # v3 re-creates the code before conv1_1's Pallas kernel: a model told to take the kernel
    # ('pallas'; 'auto' takes it only on a Hopper GPU) traces cuDNN's conv1_1 again, with the
    # same maps, and the kernel is back after the block.
    from mlnet_jax.models import MLNet
    model = MLNet(first_conv="pallas", width_multiplier=0.25)
    images = jnp.asarray(np.random.default_rng(4).normal(0, 60, (1, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images)

    def convolutions_and_maps():
        fn = jax.jit(model.apply)
        return fn.lower(variables, images).as_text().count("stablehlo.convolution"), fn(
            variables, images)

    kernel, maps = convolutions_and_maps()
    with throughput.patched("v3"):
        plain, maps_v3 = convolutions_and_maps()
    assert plain == kernel + 1
    np.testing.assert_allclose(maps_v3, maps, rtol=1e-5, atol=1e-6)
    assert convolutions_and_maps()[0] == kernel


def test_a_candidate_that_rewrites_no_convolution_fails_instead_of_measuring_the_code():
    """A rewrite that matches nothing (flax passing padding another way, say) measured the code
    as it is under the candidate's name: a false x1.00."""
    image, kernel = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    wide = jnp.ones((1, 8, 8, 5)), jnp.ones((3, 3, 5, 4))
    convolve = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(RuntimeError, match="cand_rgb8 changed no convolution"):
        with throughput.patched("cand_rgb8"):
            convolve(*wide)  # no 3-channel input
    expected = convolve(image, kernel)
    with throughput.patched("cand_rgb8"):  # conv1_1's shape: rewritten, the same sums
        np.testing.assert_allclose(convolve(image, kernel), expected, rtol=1e-6)
    assert jax.lax.conv_general_dilated is throughput._LOADED["conv"]  # restored either way


def test_v2_1_variant_trains_the_same_step_from_the_relu_output_instead_of_a_byte_mask():
    # v2.1 re-creates the ReLU and the pool as two operations (the code measured on 2026-11-27):
    # the same update, and a program without the one-byte winner masks of the code as it is,
    # which keeps the ReLU's outputs for the pools' gradients instead.
    import re
    current = _train_step_hlo(width=1 / 2)
    with throughput.patched("v2.1"):
        v2_1 = _train_step_hlo(width=1 / 2)
    masks = lambda text: set(re.findall(r"tensor<2x\d+x\d+x\d+xui8>", text)) - {  # noqa: E731
        "tensor<2x16x16x3xui8>"}  # the images
    assert masks(current) == {"tensor<2x8x8x32xui8>", "tensor<2x4x4x64xui8>",
                              "tensor<2x2x2x128xui8>", "tensor<2x2x2x256xui8>"}  # pool1-4
    assert not masks(v2_1)
    assert current.count("optimization_barrier") == v2_1.count("optimization_barrier") == 15

    (a, ma, start), (b, mb, _) = _one_train_step(None), _one_train_step("v2.1")
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    conv1_1 = a.trainable["backbone"]["conv1_1"]["kernel"] - start["backbone"]["conv1_1"]["kernel"]
    assert float(jnp.abs(conv1_1).max()) > 1e-6  # the gradient passed all four pools


def test_compiler_option_variants_name_options_this_xla_knows_and_reach_the_compiler(tmp_path,
                                                                                     monkeypatch):
    # XLA rejects an unknown option ("No such compile option"), so compiling with each
    # variant's options proves the names; a dump directory proves they reach the compiler.
    double = jax.jit(lambda x: x * 2)
    x = jnp.arange(3.0)
    for variant, options in throughput.COMPILER_OPTIONS.items():
        assert options and variant in throughput.VARIANTS and variant in throughput.FORWARD_VARIANTS
        with throughput.patched(variant) as patch:
            compiled, _, _ = throughput.compile_timed(double, x,
                                                      compiler_options=patch.compiler_options)
        np.testing.assert_array_equal(compiled(x), 2 * x)
    with pytest.raises(Exception, match="xla_no_such_option"):
        throughput.compile_timed(double, x, compiler_options={"xla_no_such_option": True})
    monkeypatch.setitem(throughput.COMPILER_OPTIONS, "v0", {"xla_dump_to": str(tmp_path)})
    with throughput.patched("v0") as patch:
        throughput.compile_timed(double, x, compiler_options=patch.compiler_options)
    assert any(tmp_path.iterdir())
    assert throughput.patched(None).compiler_options == {}


# --------------------------------------------------------------------------- merging

def test_merge_computes_the_ratio_fields_and_targets(capsys):
    def row(task, dtype, mode, rate, sweep=False):
        return {"task": task, "dtype": dtype, "mode": mode, "case": "32x480x640",
                "images_per_s": rate, "sweep": sweep}

    jax_result = {
        "date": "2026-11-27", "card": "NVIDIA H200", "args": {"cases": [[32, 480, 640]]},
        "results": [row("train", "bfloat16", "full", 900.0), row("train", "bfloat16", "full", 1.0, True),
                    {**row("train", "bfloat16", "full", 5000.0), "variant": "v0", "compile_s": 21.5,
                     "vs_code": {"loss": 1.5, "code_loss": 1.0,
                                 "update_difference": {"max": 0.7, "l2": 0.5},
                                 "code_update_difference": {"max": 0.002, "l2": 0.001}}},
                    row("train", "bfloat16", "frozen", 1700.0), row("predict", "bfloat16", None, 2400.0)],
        "pipeline": {"ratio_to_synthetic": 0.95},
        "compile_cache": {"cold": {"first_step_s": 60.0}, "warm": {"first_step_s": 9.0}}}
    torch_rows = [{"fw": "torch", "task": "train", "mode": "bf16_cl_compile", "bs": 32, "h": 480,
                   "w": 640, "img_s": 600.0},
                  {"fw": "torch", "task": "infer", "mode": "bf16_cl_compile", "bs": 32, "h": 480,
                   "w": 640, "img_s": 2000.0},
                  {"fw": "torch", "mode": "fp32", "bs": 32, "h": 480, "w": 640, "error": "OOM"}]
    merged = merge_results.merge(jax_result, torch_rows)
    assert merged["card"] == "NVIDIA H200"
    assert merged["train_ratio_vs_torch_compile"] == pytest.approx(1.5)
    assert merged["predict_ratio_vs_torch_compile"] == pytest.approx(1.2)
    t = merged["targets"]
    assert t["train_ratio_vs_torch_compile"]["met"] and not t["predict_ratio_vs_torch_compile"]["met"]
    assert not t["frozen_over_full"]["met"] and t["frozen_over_full"]["value"] == pytest.approx(1700 / 900)
    assert t["pipeline_over_synthetic"]["met"] and t["warm_cache_first_step_s"]["met"]
    assert merged["torch"] == torch_rows and merged["jax"] is jax_result
    # A variant is judged against the code as it is and the peer, never as the headline.
    (variant,) = merged["variants"]
    assert variant["variant"] == "v0" and variant["over_current"] == pytest.approx(5000 / 900)
    assert variant["ratio_vs_torch_compile"] == pytest.approx(5000 / 600)
    assert variant["compile_s"] == 21.5  # what xla_autotune_0 is measured for
    assert variant["vs_code"]["update_difference"]["max"] == 0.7  # its result beside the code's
    merge_results.print_summary(merged)
    assert "result 7.0e-01 off the code's (itself 2.0e-03)" in capsys.readouterr().out
    assert merge_results.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_a_variants_difference_from_the_code_is_inf_where_it_is_not_finite():
    # Per leaf, the worst leaf: the largest |difference| over the largest |value|, and the L2
    # norms' ratio; NaN or inf anywhere, or a leaf of zeros made non-zero, is inf (a kernel
    # writing NaN on the card must not read as "no difference"); other shapes are an error.
    e = {"a": np.array([[1.0, -2.0], [4.0, 0.5]]), "b": np.zeros(3)}
    g = {"a": np.array([[1.0, -2.0], [4.4, 0.5]]), "b": np.zeros(3)}
    diff = throughput.relative_difference(g, e)
    assert diff["max"] == pytest.approx(0.4 / 4)
    assert diff["l2"] == pytest.approx(0.4 / np.sqrt(1 + 4 + 16 + 0.25))
    assert throughput.relative_difference(e, e) == {"max": 0.0, "l2": 0.0}
    for bad in (np.nan, np.inf):
        broken = {"a": np.array([[1.0, bad], [4.0, 0.5]]), "b": np.zeros(3)}
        assert throughput.relative_difference(broken, e) == {"max": np.inf, "l2": np.inf}
        assert throughput.relative_difference(e, broken)["max"] == np.inf
    moved = {"a": e["a"], "b": np.array([0.0, 1e-6, 0.0])}
    assert throughput.relative_difference(moved, e)["max"] == np.inf
    with pytest.raises(ValueError, match="other shapes"):
        throughput.relative_difference({"a": e["a"][0], "b": e["b"]}, e)


def test_a_rows_rates_and_the_matmul_ceiling_follow_from_the_times():
    """A row's images/s is batch / median step time, its TFLOP/s the FLOPs of those images over
    that time, its ceiling fraction that over the matmul ceiling; the ceiling's TFLOP/s is
    2n³ over its median time. A broken formula (1/step, no batch factor, the fraction inverted,
    n³) would publish rates off by the batch, a factor 2, or inverted."""
    import statistics
    import types
    per_step, b, flops = [0.1, 0.4, 0.2], 4, 3e10
    bench = types.SimpleNamespace(ceiling=lambda dtype: 2.5, steps=3, repeats=len(per_step),
                                  args=types.SimpleNamespace(matmul_size=64, quick=True),
                                  on_accelerator=False)
    row = throughput._row(bench, "train", "float32", "full", b, 32, 48, per_step, 1.0, 0.1, 0.2,
                          flops, None, False, None)
    step_s = statistics.median(per_step)
    assert row["images_per_s"] == pytest.approx(b / step_s)
    assert row["tflops"] == pytest.approx(flops * row["images_per_s"] / 1e12)
    assert row["ceiling_fraction"] == pytest.approx(row["tflops"] / 2.5)
    ceiling = throughput.measure_matmul(bench, "float32")
    assert ceiling["n"] == 64
    assert ceiling["tflops"] == pytest.approx(2 * 64 ** 3 / (ceiling["ms"] / 1e3) / 1e12)


def test_candidate_conv1_direct_is_the_package_reading_the_image():
    # cand_conv1_direct sets first_conv.READS_THE_IMAGE while traced (its reader's calls
    # counted): the maps the package's kernels compute that way (tests/test_first_conv.py:
    # the column copies' bit for bit), and the code is back after the block.
    from mlnet_jax import first_conv
    rng = np.random.default_rng(7)
    x, kernel, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                       for s in ((1, 4, 32, 3), (3, 3, 3, 64), (64,)))
    key = ("mlnet_jax.first_conv", "image_reader")
    before = throughput._COUNTS.get(key, 0)
    with throughput.patched("cand_conv1_direct"):
        assert first_conv.READS_THE_IMAGE is True
        got = first_conv.conv_bias_relu(x, kernel, bias)
    assert throughput._COUNTS[key] == before + 1
    assert first_conv.READS_THE_IMAGE is False
    assert first_conv.image_reader.__module__ == "mlnet_jax.first_conv"  # not the counter
    np.testing.assert_array_equal(got, first_conv.conv_bias_relu(x, kernel, bias))


def test_candidate_conv1_direct_fails_where_conv1_1_takes_no_kernel():
    # Off a Hopper GPU 'auto' keeps XLA's conv1_1: the candidate would measure the code as it is.
    from mlnet_jax.models import MLNet
    model = MLNet(first_conv="xla", width_multiplier=0.25)
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(RuntimeError, match="cand_conv1_direct changed no convolution"):
        with throughput.patched("cand_conv1_direct"):
            jax.eval_shape(model.init, jax.random.key(0), images)


def test_candidate_prepared_weights_predicts_the_same_maps_from_weights_cast_once():
    # cand_prepared_weights: the backbone's and head's parameters cast to the compute dtype
    # once and put in the layouts the compiled program picks; the prior stays float32 (the
    # model upsamples it in float32). The maps are the code's, bit for bit: the model casts
    # those parameters to the compute dtype anyway.
    from mlnet_jax.compute_dtype import cpu_bfloat16_convolutions_work
    from mlnet_jax.inference import ModelInfo, make_predict_fn
    prepared_weights = throughput.sibling("prepared_weights")
    dtype = jnp.dtype(jnp.bfloat16 if cpu_bfloat16_convolutions_work() else jnp.float32)
    info = ModelInfo(input_size=(32, 32), preprocessing="caffe", width_multiplier=0.25)
    model = info.build(dtype)
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    variables = {"params": jax.tree.map(lambda p: p + np.float32(0.05),  # no zero bias, prior
                                        throughput.random_params(32, 32, 0.25))}
    predict = make_predict_fn(model, info.preprocessing)
    expected = np.asarray(predict(variables, images))

    before = prepared_weights.rewritten
    jitted, cast = prepared_weights.prepare(predict, variables, dtype)
    dtypes = {jax.tree_util.keystr(path): leaf.dtype
              for path, leaf in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes.pop("['params']['prior']") == jnp.float32 and set(dtypes.values()) == {dtype}
    assert variables["params"]["head"]["conv"]["kernel"].dtype == jnp.float32  # not in place
    compiled = jitted.lower(cast, images).compile()
    placed, prepared = prepared_weights.place(jitted, compiled, cast)
    np.testing.assert_array_equal(compiled(placed, images), expected)
    # What it changed is recorded, and a program it did not change (float32, every layout
    # kept, as XLA:CPU keeps them) does not count: it would measure the code as it is.
    assert prepared["cast"] == (30 if dtype == jnp.bfloat16 else 0)  # 15 kernels, 15 biases
    assert prepared_weights.rewritten == before + bool(prepared["cast"] or prepared["relaid"])


def test_a_predict_only_variant_that_changes_nothing_fails_and_trains_nothing(tmp_path):
    # cand_prepared_weights in float32 on the CPU casts nothing and XLA:CPU keeps every
    # layout: its measurement fails as measuring the code would, and no train step is tried.
    result, _ = _run(tmp_path, "--cases", "2x32x32", "--quick", "--dtypes", "float32",
                     "--modes", "full", "--width-multiplier", "0.25", "--variants",
                     "cand_prepared_weights", "--no-compile-cache")
    assert result["failed"] == ["predict float32 2x32x32 [cand_prepared_weights]"]
    assert [r["label"] for r in result["results"]] == [
        "train float32 full 2x32x32", "predict float32 2x32x32",
        "predict float32 2x32x32 [cand_prepared_weights]"]
    assert "it would measure the code as it is" in result["results"][-1]["error"]


def _counted(*keys) -> int:
    """Calls of throughput's COUNTED patches named by ``keys`` so far."""
    return sum(throughput._COUNTS.get(key, 0) for key in keys)


BIAS_GRADIENT_LAYERS = (("mlnet_jax.bias_gradients", "conv_relu_pool"),
                        ("mlnet_jax.bias_gradients", "conv_relu"))


def test_candidate_pooled_bias_trains_the_same_step(monkeypatch):
    # cand_pooled_bias adopts bias_gradients' "pooled" part while traced: in a real train step
    # (64×64, quarter width) conv1_2 and conv2_2 take the kernel, conv3_3 (8 windows a row: no
    # Triton block) keeps XLA's; the same update.
    from mlnet_jax import bias_gradients
    monkeypatch.setattr(bias_gradients, "_auto_takes", lambda dtype: True)  # a Hopper GPU's
    before = _counted(*BIAS_GRADIENT_LAYERS)
    (a, ma, start), (b, mb, _) = (_one_train_step(v, size=64) for v in (None, "cand_pooled_bias"))
    assert _counted(*BIAS_GRADIENT_LAYERS) - before == 2
    assert bias_gradients.ADOPTED == frozenset()
    assert throughput.BIAS_GRADIENT_PARTS == bias_gradients.PARTS
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    for layer in ("conv1_2", "conv2_2"):
        moved = a.trainable["backbone"][layer]["bias"] - start["backbone"][layer]["bias"]
        assert float(jnp.abs(moved).max()) > 1e-6


def test_candidate_bias_kernels_train_the_same_step(monkeypatch):
    # cand_bias_kernels in a real train step at half width, 64×64: the pools of conv1_2 and
    # conv2_2 and the four 256-wide layers no pool follows but the last (conv5_3 feeds the
    # head) take the kernels; the same update.
    from mlnet_jax import bias_gradients
    monkeypatch.setattr(bias_gradients, "_auto_takes", lambda dtype: True)  # a Hopper GPU's
    before = _counted(*BIAS_GRADIENT_LAYERS)
    (a, ma, start), (b, mb, _) = (_one_train_step(v, width=0.5, size=64)
                                  for v in (None, "cand_bias_kernels"))
    assert _counted(*BIAS_GRADIENT_LAYERS) - before == 6
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    moved = a.trainable["backbone"]["conv4_1"]["bias"] - start["backbone"]["conv4_1"]["bias"]
    assert float(jnp.abs(moved).max()) > 1e-6


@pytest.mark.parametrize("stride, alignment, rows", [(2, "standard", 8), (2, "keras1", 8),
                                                     (2, "standard", 7), (1, "standard", 8)])
def test_candidate_pool_argmax_makes_the_packages_maxima_and_winner_masks(stride, alignment,
                                                                          rows):
    # Values rounded to 0.5 make ties in most windows and zero maxima in some: the pairwise
    # argmax must pick the first maximum in row-major order, and none where the maximum is 0.
    from mlnet_jax import vgg
    pool_argmax = throughput.sibling("pool_argmax")
    x = jnp.asarray(np.round(np.random.default_rng(rows).standard_normal((2, rows, 8, 4)) * 2) / 2,
                    jnp.float32)
    y, winners = vgg._relu_max_pool_forward(x, stride, alignment, "first", x.shape[1:3])
    y2, winners2 = pool_argmax._forward(x, stride, alignment, x.shape[1:3])
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(winners2, winners)
    assert bool(jnp.any(winners == 0)) and len(np.unique(np.asarray(winners))) == 5


def test_candidate_pool_argmax_trains_the_same_step():
    pool_argmax = throughput.sibling("pool_argmax")
    before = pool_argmax.rewritten
    (a, ma, _), (b, mb, _) = (_one_train_step(v, size=32) for v in (None, "cand_pool_argmax"))
    assert pool_argmax.rewritten - before == 4  # pool1-3 and the stride-1 pool4
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def test_candidate_conv12t_variants_reach_the_packages_triton_call_with_their_settings(
        monkeypatch):
    # In the whole model under 'auto', traced for an H200 (a faked lone Hopper GPU, bfloat16,
    # 128 columns): the code as it is keeps XLA's conv1_2 (nothing adopted yet); each variant
    # makes the package take its kernel, its taps as (output × input channels), in blocks of
    # 128 columns with 4 warps over 3 pipeline stages, _s2 over 2; cand_all with the head's.
    import re

    from mlnet_jax import first_conv
    from mlnet_jax.inference import ModelInfo
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    model = ModelInfo(input_size=(16, 128), preprocessing="caffe").build(jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 16, 128, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), images)

    def settings(variant):
        with throughput.patched(variant):
            text = lowered_for_an_h200(partial(model.apply, train=False), params, images)
        calls = re.findall(r'grid_y = (\d+) : i32.*name = "conv_bias_relu_pool_t", '
                           r'num_stages = (\d+) : i32, num_warps = (\d+)', text)
        taps_transposed = len(re.findall(
            r"stablehlo.transpose %\w+, dims = \[0, 2, 1\] : \(tensor<9x64x64xbf16>", text))
        return calls, taps_transposed, 'name = "head_conv_readout"' in text

    assert settings(None) == ([], 0, False)
    assert settings("cand_conv12t_pool") == ([("1", "3", "4")], 1, False)
    assert settings("cand_conv12t_pool_s2") == ([("1", "2", "4")], 1, False)
    assert settings("cand_all") == ([("1", "3", "4")], 1, True)


def test_candidate_head_kernel_predicts_the_same_maps_and_trains_with_the_packages_head(
        monkeypatch):
    # cand_head_kernel adopts mlnet_jax.head_kernel while traced: in the model (quarter width,
    # 32×32, a faked Hopper GPU's choice) the same maps as the code's, the head's parameters
    # where they were; training keeps the package's head (dropout), so the variant would
    # measure the code as it is there.
    from mlnet_jax import head_kernel
    from mlnet_jax.inference import ModelInfo, make_predict_fn
    monkeypatch.setattr(head_kernel, "_auto_takes", lambda dtype: True)
    info = ModelInfo(input_size=(32, 32), preprocessing="caffe", width_multiplier=0.25)
    model = info.build()
    variables = {"params": jax.tree.map(lambda p: p + np.float32(0.02),
                                        throughput.random_params(32, 32, 0.25))}
    images = jnp.asarray(np.random.default_rng(9).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    expected = make_predict_fn(model, info.preprocessing)(variables, images)
    key = ("mlnet_jax.head_kernel", "multilevel_head")
    before = _counted(key)
    with throughput.patched("cand_head_kernel"):
        got = make_predict_fn(model, info.preprocessing)(variables, images)
    assert _counted(key) == before + 1 and head_kernel.ADOPTED is False
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="cand_head_kernel changed no convolution"):
        _one_train_step("cand_head_kernel", size=32)  # a size the kernel fits


@pytest.mark.parametrize("variant", ["cand_conv12t_pool", "cand_conv12t_dgrad",
                                     "cand_conv12t_bwd"])
def test_candidate_conv12t_variants_train_the_same_step_with_the_parts_they_name(monkeypatch,
                                                                               variant):
    # Each variant adopts its parts of mlnet_jax.second_conv while traced (the forward kernel,
    # with _dgrad the input gradient by conv_transposed, with _bwd the weight gradient by
    # weight_gradient too, each traced once), the same update as the code's at quarter width
    # (the kernels' 128 columns: 128×128); after the block nothing is adopted.
    from mlnet_jax import second_conv
    monkeypatch.setattr(second_conv, "_auto_takes", lambda dtype: True)  # a Hopper GPU's choice
    calls = _count_calls(monkeypatch, second_conv, "conv_transposed", "weight_gradient")
    (a, ma, start), (b, mb, _) = (_one_train_step(v, size=128) for v in (None, variant))
    assert second_conv.ADOPTED == frozenset()
    assert throughput.SECOND_CONV_PARTS == second_conv.PARTS  # (throughput.py imports no JAX)
    assert sorted(name for name, _ in calls) == {
        "cand_conv12t_dgrad": ["conv_transposed"],
        "cand_conv12t_bwd": ["conv_transposed", "weight_gradient"]}.get(variant, [])
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    moved = a.trainable["backbone"]["conv1_2"]["kernel"] - start["backbone"]["conv1_2"]["kernel"]
    assert float(jnp.abs(moved).max()) > 1e-6


@pytest.mark.parametrize("variant, changes", [("cand_conv12t_pool", False),
                                              ("cand_pooled_bias", False),
                                              ("cand_pool_argmax", False),
                                              ("cand_bias_kernels", True)])
def test_candidates_leave_keras1_pooling_to_the_package(monkeypatch, variant, changes):
    # keras1 windows (Theano's, one row and column earlier) with, in float32, every maximum
    # taking the gradient: no candidate computes those pools. Each leaves them to the package:
    # with nothing else to change it fails as measuring the code would; cand_bias_kernels
    # still takes the 256-wide unpooled layers, with the same update.
    from mlnet_jax import bias_gradients, second_conv
    for module in (bias_gradients, second_conv):  # a Hopper GPU's choice
        monkeypatch.setattr(module, "_auto_takes", lambda dtype: True)
    if not changes:
        with pytest.raises(RuntimeError, match=f"{variant} changed no convolution"):
            _one_train_step(variant, width=0.5, size=64, pooling="keras1")
        return
    (a, ma, _), (b, mb, _) = (_one_train_step(v, width=0.5, size=64, pooling="keras1")
                              for v in (None, variant))
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def test_candidate_all_puts_the_kernels_together_and_trains_the_same_step(monkeypatch):
    # cand_all: conv1_2 by the package's transposed conv + pool kernel (its gradients by
    # conv_transposed and weight_gradient), conv2_2 by the pooled bias kernel, the four
    # 256-wide unpooled layers before conv5_3 by the ReLU kernel (half width, 64×64): the same
    # update as cand_conv12t_bwd (the same conv1_2), to float32 rounding. Against the code's:
    # the transposed kernel sums each tap's products in another order than XLA's convolution,
    # so pool1's values may differ in the last bit and move a near-tie of pool1 or pool2 to
    # another winner: the layers below pool2 get the same update within 3 % of its size (a
    # wrong tap or window would move it by ~100 %), the others to 1e-5.
    from mlnet_jax import bias_gradients, second_conv
    for module in (bias_gradients, second_conv):  # a Hopper GPU's choice
        monkeypatch.setattr(module, "_auto_takes", lambda dtype: True)
    calls = _count_calls(monkeypatch, second_conv, "conv_transposed", "weight_gradient")
    key = ("mlnet_jax.second_conv", "conv_bias_relu_pool")
    counts = (_counted(key), _counted(*BIAS_GRADIENT_LAYERS))
    (a, ma, start), (b, mb, _) = (_one_train_step(v, width=0.5, size=64)
                                  for v in (None, "cand_all"))
    assert sorted(calls) == [("conv_transposed", (2, 64, 64, 32)),  # conv1_2's, half width
                             ("weight_gradient", (2, 64, 64, 32))]
    assert _counted(key) - counts[0] == 1
    assert _counted(*BIAS_GRADIENT_LAYERS) - counts[1] == 5
    assert float(mb["loss"]) == pytest.approx(float(ma["loss"]), rel=1e-6)
    conv12t, _, _ = _one_train_step("cand_conv12t_bwd", width=0.5, size=64)
    for x, y in zip(jax.tree.leaves(conv12t.trainable), jax.tree.leaves(b.trainable)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)
    below_pool2 = {"conv1_1", "conv1_2", "conv2_1", "conv2_2"}
    for path, x in jax.tree_util.tree_flatten_with_path(a.trainable)[0]:
        y, x0 = (_leaf(tree, path) for tree in (b.trainable, start))
        if {getattr(key, "key", None) for key in path} & below_pool2:
            update = float(jnp.abs(x - x0).max())
            assert float(jnp.abs(y - x).max()) <= 0.03 * update, jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def test_v4_recreates_the_code_before_any_candidate_kernel_is_adopted(monkeypatch):
    # With every candidate part adopted (as a lease's winners would be) and a faked Hopper
    # GPU, the train step and predict programs change; under v4 they are again the programs
    # of the code with nothing adopted, op for op.
    from mlnet_jax import bias_gradients, first_conv, head_kernel, second_conv
    from mlnet_jax.inference import ModelInfo, make_predict_fn
    monkeypatch.setattr(first_conv, "_lone_hopper_gpu", lambda: True)
    monkeypatch.setattr(first_conv, "interpreted", lambda: False)
    model = ModelInfo(input_size=(16, 128), preprocessing="caffe").build(jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 16, 128, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 128, 3)))

    def programs():
        predict = lowered_for_an_h200(make_predict_fn(model, "caffe").jitted.__wrapped__,
                                      params, images)
        grad = lowered_for_an_h200(jax.grad(lambda p, x: jnp.sum(model.apply(
            p, x, train=False))), params, jax.ShapeDtypeStruct((2, 16, 128, 3), jnp.float32))
        return predict, grad

    nothing_adopted = programs()
    monkeypatch.setattr(second_conv, "ADOPTED", frozenset(second_conv.PARTS))
    monkeypatch.setattr(bias_gradients, "ADOPTED", frozenset(bias_gradients.PARTS))
    monkeypatch.setattr(head_kernel, "ADOPTED", True)
    monkeypatch.setattr(first_conv, "READS_THE_IMAGE", True)
    adopted = programs()
    assert all(a.count("__gpu$xla.gpu.triton") > b.count("__gpu$xla.gpu.triton")
               for a, b in zip(adopted, nothing_adopted))
    with throughput.patched("v4"):
        assert programs() == nothing_adopted
    assert programs() == adopted  # the adoption is back after the block


def test_nothing_is_adopted_before_a_measurement():
    # The candidate kernels are the package's, each off until a lease measures it faster
    # beside the code (benchmarks/NOTES.md, "The candidates in the package"): adopting one is
    # setting its switch, here too.
    from mlnet_jax import bias_gradients, first_conv, head_kernel, second_conv
    assert second_conv.ADOPTED == frozenset() and bias_gradients.ADOPTED == frozenset()
    assert head_kernel.ADOPTED is False and first_conv.READS_THE_IMAGE is False
