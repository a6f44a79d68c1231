"""The demo at test size: real VGG-16 widths, 32×32 inputs, a few steps."""

import os

from mlnet_jax.configs import demo


def get_config():
    config = demo.get_config()
    config.input_size = (32, 32)
    config.width_multiplier = 1.0
    config.synthetic_train_size = 32
    config.synthetic_eval_size = 8
    config.global_batch_size = 4
    config.eval_batch_size = 4
    config.steps_per_epoch = 3
    config.num_epochs = 2
    config.learning_rate = 1e-2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    config.grid_images = 2
    # One cache shared by the suite's training processes (tests/conftest.py): the same programs
    # load instead of compiling again. Unset: off.
    config.compilation_cache_dir = os.environ.get("MLNET_JAX_TEST_COMPILATION_CACHE", "")
    return config
