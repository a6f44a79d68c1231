"""The demo at test size: real VGG-16 widths, 32×32 inputs, a few steps."""

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
    config.compilation_cache_dir = ""
    return config
