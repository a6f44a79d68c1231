"""The paper: SALICON 2015 at 480×640, batch 10, SGD Nesterov, lr 1e-3 with Keras-1 decay,
≤ 20 epochs, early stopping (patience 5) and the best checkpoint on validation loss."""

from mlnet_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "salicon2015"
    config.init_weights = "weights/vgg16.npz"
    return config
