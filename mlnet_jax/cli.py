"""Running an absl command: user errors become one line and exit status 2.

Tracebacks are for bugs; a bad path, a wrong field or a missing dataset is the user's to fix,
so it is reported as ``error: <message>`` (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import sys
from typing import Callable

from mlnet_jax.errors import UserError


def run_absl(body: Callable[[], int | None], argv: list[str] | None = None) -> int:
    """Parse absl flags, run ``body()`` and return its exit status (``--debug`` must be defined)."""
    from absl import app, flags

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
