"""One training step of the real train_step on a fixed global batch, for the data-parallel
tests. Run as a separate process so the device count can be chosen:

    python one_train_step.py OUT.npz --devices N
    python one_train_step.py OUT.npz --coordinator 127.0.0.1:PORT --num_processes 2 --process_id K
"""

import argparse
import sys

import jax

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--coordinator", default="")
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
args = parser.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices)
jax.config.update("jax_default_matmul_precision", "highest")
if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

import numpy as np  # noqa: E402

from mlnet_jax.inference import ModelInfo  # noqa: E402
from mlnet_jax.optim import make_optimizer  # noqa: E402
from mlnet_jax.sharding import data_mesh, replicated, shard_batch  # noqa: E402
from mlnet_jax.train import compile_steps, create_train_state, initial_params  # noqa: E402

GLOBAL_BATCH, SIZE = 4, (32, 32)
info = ModelInfo(input_size=SIZE, preprocessing="caffe")
model = info.build()
tx = make_optimizer(1e-2, 5e-4, 0.9)
params = initial_params(model, info, jax.random.PRNGKey(0), None)
state = create_train_state(params, tx, frozen_convs=0, seed=0)
mesh = data_mesh()
assert mesh.size == args.devices * args.num_processes, (mesh.size, args)
state = jax.device_put(state, replicated(mesh))
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (GLOBAL_BATCH, *SIZE, 3), dtype=np.uint8),
         "target": rng.uniform(0, 1, (GLOBAL_BATCH, SIZE[0] // 8, SIZE[1] // 8, 1)).astype(np.float32)}
# Each process feeds only its own rows of the global batch.
per_process = GLOBAL_BATCH // args.num_processes
local = {k: v[args.process_id * per_process:(args.process_id + 1) * per_process] for k, v in batch.items()}
train_fn, _ = compile_steps(model, tx, info.preprocessing, mesh)
for _ in range(2):
    state, metrics = train_fn(state, shard_batch(local, mesh))
if args.process_id == 0:
    from flax import traverse_util
    flat = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    np.savez(args.out, loss=np.asarray(jax.device_get(metrics["loss"])), **flat)
print("ok", file=sys.stderr)
