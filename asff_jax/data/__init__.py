"""Data: dataset sources, the official augmentations, the deterministic input pipeline, config glue.

Modules: ``sources`` (digits, COCO-format folders, TFDS COCO, synthetic;
``coco_folder`` validates and prepares folders, ``make_digits`` generates the
built-in dataset, ``synthetic`` the test images), ``transforms`` (the official
TrainTransform / ValTransform as TF ops), ``pipeline`` (index-based tf.data,
a pure function of (seed, step)), ``loader`` (config → sources and iterators).
This package imports nothing from models, training or evaluation.
"""

from asff_jax import _tensorflow  # noqa: F401  (quiet TensorFlow start-up, before any data module)
