"""Lowering for a GPU card on a machine without one: what the kernels' tests read."""

import jax


def lowered_for_an_h200(fn, *shapes, debug_info: bool = False) -> str:
    """``fn``'s StableHLO lowered for CUDA on an H200 (newer JAX asks which card), traced as a
    new function: jit's trace cache, keyed on the function, would otherwise serve a trace
    made under a candidate's patch to a later test of the package's own kernels."""
    card = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=card)):
        return jax.jit(lambda *a: fn(*a)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text(debug_info=debug_info)
