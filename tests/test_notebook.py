"""The Colab notebook runs top to bottom in its demo setting (DEMO = True), so it cannot rot:
install, weights, data, training, resume, evaluation, predictions, video and the Python API."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "colab.ipynb"


def test_the_notebook_runs_in_its_demo_setting(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    assert re.search(r"^DEMO = True\b", first_code.source, re.M), "the demo switch is at the top"

    # The kernel that ran the Python API: on a GPU, it must not have taken 75 % of the memory
    # that the training cells' own processes need (JAX reads this when its backend starts).
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import jax, os\nprint('preallocate:', os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))"))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its error, if any cell fails

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "resuming from" in text                  # the resume cell continued the run
    assert "AUC-Judd" in text                       # the evaluation table
    assert "preallocate: false" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4                         # curves, eval grid, predictions, API overlay

    workdir = tmp_path / "runs" / "colab_demo"
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == 8 and final["cc"] > final["centre_bias_cc"]
    assert (workdir / "eval_synthetic_validation.json").is_file()
    overlays = sorted(p.name for p in (tmp_path / "predictions").glob("sample*_overlay.png"))
    assert overlays == [f"sample{i}_overlay.png" for i in range(4)]
    if importlib.util.find_spec("av") is not None:  # with the video extra, the video cell ran
        assert (tmp_path / "predictions" / "clip_overlay.mp4").stat().st_size > 0


def test_interrupting_a_command_cell_lets_the_command_save_its_work(tmp_path):
    """The notebook's sh(), interrupted as Jupyter interrupts a kernel (SIGINT to its process
    group, the command included): the command's output is drained until it has saved and
    exited, rather than the pipe closed under it (training died of a broken pipe before
    saving)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    cell = next("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]
                if "def sh(*args):" in "".join(c["source"]))
    (tmp_path / "cell.py").write_text(cell.split("def mlnet(")[0])
    (tmp_path / "child.py").write_text(
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    time.sleep(0.5)  # saving a checkpoint\n"
        "    for _ in range(200):  # a progress bar's worth of output while it does\n"
        "        print('saving', flush=True)\n"
        "    print('saved at the interrupt', flush=True)\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n")
    kernel = subprocess.Popen(
        [sys.executable, "-c", f"exec(open({str(tmp_path / 'cell.py')!r}).read()); "
         f"sh(sys.executable, {str(tmp_path / 'child.py')!r})"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert kernel.stdout.readline().startswith("$") and kernel.stdout.readline() == "training\n"
    time.sleep(0.2)
    os.killpg(kernel.pid, signal.SIGINT)  # as jupyter_client interrupts a kernel
    out, err = kernel.communicate(timeout=60)
    assert out.splitlines()[-1] == "saved at the interrupt"
    assert "KeyboardInterrupt" in err  # and the cell still stops
