"""Data parallelism over every device of every process with a 1-D ``data`` mesh.

Batches are split along their first axis on the ``data`` axis; parameters and optimiser state
are replicated. ``jax.jit`` with these shardings does what ``pmap`` used to, on one host or many.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with one ``data`` axis."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch, mesh: Mesh):
    """Assemble per-process NumPy batches into global arrays split on the ``data`` axis.

    Each process passes only its own rows (its shard of the global batch).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
