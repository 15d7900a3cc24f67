"""MobileNetV2 + ASFF at 416: the official ``yolov3_mobilev2.py`` with ``asff=True`` (official README:
30.6 AP on COCO test-dev; the MobileNetV2 baseline 29.0).

The model (``model.backbone='mobilenet_v2'``): MobileNetV2 features, the YOLOv3 + SPP neck with
ReLU6 and without its last 3×3 conv, ``ASFFmobile`` fusion (dims 512/256/128, ReLU6, the level-1
compress at level 2), heads without deformable adaption (official ``sep=True``) and the YOLOv3
anchor set with (373, 326) (``model.anchors='yolov3'``), as the official mobile heads use.

Recipe: the official one of :func:`asff_jax.config.coco_recipe` (spec §7). The spec does not record
the mobile cfg's own training values, so this keeps the recipe the official ``main.py`` applies to
every backbone: random shapes 320–608 (hard-coded there), starting at 608; evaluation at 416, the
size of the published result (``eval.py -s``'s default). No backbone file is published for
MobileNetV2 in the official repository's recipe; ``--config.init.checkpoint`` takes an ImageNet
MobileNetV2 state dict in the official names (``module_list.0``–``18``) if you have one.

Train::

    python -m asff_jax.train --config configs/coco_mobilenet_asff_416.py --workdir DIR \\
        --config.dataset.data_dir=DATA_DIR

Evaluate the official weights::

    python -m asff_jax.evaluate --pth WEIGHTS.pth --config configs/coco_mobilenet_asff_416.py
"""

from asff_jax.config import coco_recipe


def get_config():
  c = coco_recipe(fusion="asff", input_size=608, paper_ap=30.6, backbone="mobilenet_v2")
  c.eval.input_size = 416
  return c
