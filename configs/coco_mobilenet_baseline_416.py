"""The MobileNetV2 baseline at 416: the official ``yolov3_mobilev2.py`` with ``asff=False`` (official
README: 29.0 AP on COCO test-dev).

The same model as ``configs/coco_mobilenet_asff_416.py`` with, per level, a 3×3 conv-BN-ReLU6 on its
own neck output in place of ``ASFFmobile`` (the official ``level_l_conv``). Recipe and sizes as there.

Train::

    python -m asff_jax.train --config configs/coco_mobilenet_baseline_416.py --workdir DIR \\
        --config.dataset.data_dir=DATA_DIR
"""

from asff_jax.config import coco_recipe


def get_config():
  c = coco_recipe(fusion="none", input_size=608, paper_ap=29.0, backbone="mobilenet_v2")
  c.eval.input_size = 416
  return c
