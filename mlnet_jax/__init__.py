"""ML-Net saliency prediction (Cornia et al., ICPR 2016) in JAX/Flax."""

from mlnet_jax import metrics
from mlnet_jax.inference import ModelInfo, Predictor, load_model, make_predict_fn
from mlnet_jax.loss import mlnet_loss
from mlnet_jax.models import MLNet
from mlnet_jax.prior import prior_penalty
from mlnet_jax.vgg import VGG16
from mlnet_jax.weights_file import load_vgg16

__all__ = ["MLNet", "VGG16", "ModelInfo", "Predictor", "load_model", "load_vgg16",
           "make_predict_fn", "metrics", "mlnet_loss", "prior_penalty"]
__version__ = "0.1.0"
