"""Saliency datasets as TFDS ``array_record`` builders, prepared without TensorFlow.

``python -m mlnet_jax.datasets.prepare NAME --manual_dir DIR [--data_dir DIR]`` turns a
manual download into records that :mod:`mlnet_jax.input_pipeline` reads. Importing this package
is cheap: TensorFlow Datasets is imported only when a builder is made.
"""

from __future__ import annotations

DATASET_NAMES: tuple[str, ...] = ("salicon2015", "salicon2017", "mit1003", "cat2000", "folder")


def get_builder(name: str, data_dir: str | None = None, **kwargs):
    """The TFDS builder for ``name`` (one of :data:`DATASET_NAMES`); imports TFDS lazily."""
    from mlnet_jax.datasets import builders  # noqa: PLC0415 — keeps package import light

    return builders.get_builder(name, data_dir, **kwargs)


__all__ = ["DATASET_NAMES", "get_builder"]
