"""The official "strong baseline" YOLOv3 at 608 (no ASFF; COCO test-dev AP 38.8, paper Table 1 / official README).

SPP, guided anchors with deformable feature adaption, anchor-free slot — the
same backbone, neck and heads as ASFF, with a per-level 3×3 conv in place of
fusion. Official weights load with ``--config configs/coco_baseline_608.py``.
"""

from asff_jax.models import default_model_config
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = default_model_config()
  config.model.fusion = "none"
  config.input_size = 608
  config.paper_ap = 38.8
  return config
