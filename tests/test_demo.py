"""The README's first command: `python -m mlnet_jax.train` with no flags runs the embedded demo."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)  # the demo must finish in ≤ 5 minutes on a 2-core CPU
def test_demo_beats_the_centre_bias_baseline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mlnet_jax.train"], cwd=tmp_path,
                            capture_output=True, text=True,
                            env={**__import__("os").environ, "MLNET_JAX_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "runs" / "demo" / "final_metrics.json").read_text())
    assert final["num_images"] == 200
    assert final["cc"] >= final["centre_bias_cc"] + 0.2
    assert "vs centre bias" in result.stdout
