"""Running an absl command: user errors become one line and exit status 2.

Tracebacks are for bugs; a bad path, a wrong field or a missing dataset is the user's to fix,
so it is reported as ``error: <message>`` (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from mlnet_jax.errors import UserError


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def resolve_packaged_config(argv: list[str]) -> list[str]:
    """Let ``--config configs/X.py`` name the configs shipped in the package when there is no
    such file here (a pip install without a checkout, e.g. on Colab)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            index, path = i, arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            index, path = i + 1, argv[i + 1]
        else:
            continue
        file, sep, rest = path.partition(":")  # config_flags allows 'file.py:argument'
        parts = Path(file).parts
        if not Path(file).exists() and len(parts) == 2 and parts[0] == "configs":
            packaged = PACKAGED_CONFIGS / parts[1]
            if packaged.exists():
                resolved = f"{packaged}{sep}{rest}"
                argv[index] = f"--config={resolved}" if index == i else resolved
    return argv


def run_absl(body: Callable[[], int | None], argv: list[str] | None = None) -> int:
    """Parse absl flags, run ``body()`` and return its exit status (``--debug`` must be defined)."""
    from absl import app, flags

    argv = resolve_packaged_config(sys.argv if argv is None else argv)

    def run(_):
        try:
            return body() or 0
        except UserError as e:
            if flags.FLAGS.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2

    try:
        app.run(lambda args: sys.exit(run(args)), argv=argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0
