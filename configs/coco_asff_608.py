"""YOLOv3 + ASFF at 608 — the official ``--asff`` model (COCO test-dev AP 40.6, paper Table 4 / official README).

Load the official weights (``YOLOv3-ASFF_40.6.pth``) with::

    python -m asff_jax.convert --pth YOLOv3-ASFF_40.6.pth --config configs/coco_asff_608.py --out DIR

Training settings are added by the training issue.
"""

from asff_jax.models import default_model_config
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = default_model_config()  # fusion='asff', rfb=False, compress_c=16, official anchors
  config.input_size = 608
  config.paper_ap = 40.6  # COCO test-dev AP reported by the paper / official README
  return config
