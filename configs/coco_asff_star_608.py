"""ASFF* at 608: ASFF + RFB in the heads (compress_c 8), trained with DropBlock and 320–608 random shapes.

COCO test-dev AP 42.4 (paper Table 4 / official README). Official weights are
loaded with this config (``--asff --rfb`` in the official code).
"""

from asff_jax.models import default_model_config
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = default_model_config()
  config.model.rfb = True
  config.model.dropblock = True
  config.input_size = 608
  config.paper_ap = 42.4
  return config
