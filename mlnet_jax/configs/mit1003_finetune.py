"""Fine-tune a SALICON-trained checkpoint on MIT1003 (fixed-seed 900/103 split); images are
letterboxed (zero-padded) to 4:3 at 480×640 like the original."""

from mlnet_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "mit1003"
    config.init_weights = "runs/salicon"  # a training workdir or a checkpoint directory
    config.num_epochs = 10
    return config
