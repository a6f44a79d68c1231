"""The embedded demo: trains on synthetic data in a few minutes on a 2-core CPU.

It is the ML-Net architecture (VGG-16 layout, multi-level head, learned prior) with two
reductions that only this config makes: every VGG layer is a quarter as wide and the input
is 96×128. There are no pretrained weights offline, so training starts from random weights,
with a larger learning rate than the paper's.
"""

from mlnet_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "synthetic"
    config.synthetic_train_size = 800
    config.synthetic_eval_size = 200
    config.input_size = (96, 128)
    config.width_multiplier = 0.25
    config.preprocessing = "caffe"
    config.pooling = "standard"
    config.init_weights = ""
    config.learning_rate = 1e-2
    config.global_batch_size = 16
    config.eval_batch_size = 50
    config.num_epochs = 4
    config.steps_per_epoch = 40
    config.early_stopping_patience = 0    # 0: disabled
    config.log_every_steps = 10
    config.checkpoint_every_steps = 40
    config.keep_checkpoints = 2
    return config
