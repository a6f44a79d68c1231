"""Test-wide settings: highest matmul precision so float32 comparisons are meaningful."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
