"""What every configuration shares: the paper's optimiser, model and checkpoint policy."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data: a prepared TFDS dataset (python -m mlnet_jax.datasets.prepare) or 'synthetic'.
    config.dataset = "salicon2015"
    config.data_dir = ""                  # TFDS data_dir; empty: TFDS's default (~/tensorflow_datasets)
    config.train_split = "train"
    config.eval_split = "validation"
    config.synthetic_train_size = 0       # records of the synthetic dataset (dataset='synthetic')
    config.synthetic_eval_size = 0
    config.worker_count = -1              # grain decoding processes (0: in the main process;
                                          # -1: none on CPU, else cores/4 up to 4)

    # Model.
    config.input_size = (480, 640)        # rows, cols; divisible by 8
    config.prior = True
    config.pooling = "auto"               # auto: from init_weights, else 'standard'
    config.preprocessing = "auto"         # auto: from init_weights, else 'caffe'
    config.width_multiplier = 1.0         # < 1 narrows VGG-16: CPU demo only
    config.dropout_rate = 0.5
    config.compute_dtype = "float32"      # or 'bfloat16' (parameters and loss stay float32)
    config.first_conv = "auto"            # the Pallas kernels (conv1_1's + those adopted): 'auto' (on
                                          # one Hopper GPU in bfloat16, else XLA), 'xla', 'pallas'
    config.init_weights = ""              # converted VGG-16 / ML-Net .npz or a checkpoint dir
    config.frozen_convs = 0               # VGG convs frozen from conv1_1 (10 = conv1_1…conv4_3)

    # Optimiser (original): SGD, Nesterov momentum 0.9, lr 1e-3 / (1 + 5e-4·t).
    config.learning_rate = 1e-3
    config.lr_decay = 5e-4
    config.momentum = 0.9
    config.global_batch_size = 10
    config.num_epochs = 20
    config.steps_per_epoch = -1           # -1: N // global_batch_size steps, about one pass
    #                                       (the stream is continuous: the images left over
    #                                       start the next epoch, reshuffled)
    config.early_stopping_patience = 5    # Keras 1's: stop at the 6th epoch in a row without a
                                          # better validation loss; 0 disables

    # Evaluation, logging, checkpoints.
    config.eval_batch_size = 10
    config.eval_max_images = -1           # -1: the whole evaluation split; N: its first N
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.grid_images = 4                # images in each evaluation's PNG grid
    config.compilation_cache_dir = "~/.cache/mlnet_jax/jax_cache"  # empty: disabled
    config.seed = 0
    return config
