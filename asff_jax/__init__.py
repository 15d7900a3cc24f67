"""asff_jax: ASFF ("Learning Spatial Fusion for Single-Shot Object Detection",
Liu, Huang, Wang 2019) in JAX/Flax — YOLOv3 + Darknet-53 strong baseline,
adaptively spatial feature fusion, official-weight converter and parity tests.

Pipeline (modules in reading order): ``models`` (backbone → neck → fusion →
head) → ``targets``/``losses`` → ``postprocess`` → ``coco_eval``; ``boxes`` is
the leaf box-utility module; ``convert`` loads official PyTorch weights.
"""

__version__ = "0.1.0"
