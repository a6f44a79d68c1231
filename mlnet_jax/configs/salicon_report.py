"""The seed report's faster setup: 240×320, batch 16, conv1_1…conv4_3 (the first 23
torchvision ``features`` modules) frozen. ``--config.prior=False`` is its "no prior" variant."""

from mlnet_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "salicon2015"
    config.init_weights = "weights/vgg16.npz"
    config.input_size = (240, 320)
    config.global_batch_size = 16
    config.eval_batch_size = 16
    config.frozen_convs = 10
    return config
