"""ASFF* at 800 (paper Table 4: 43.9 AP on test-dev). The official README trains it with "480-800"
random shapes, a range its code does not have; here the sizes are 480..800 (step 32), the final and
evaluation size 800.

Train as the paper did (official recipe, :func:`asff_jax.config.coco_recipe`; TFDS ``coco/2017`` prepared in ``DATA_DIR``)::

    python -m asff_jax.train --config configs/coco_asff_star_800.py --workdir DIR --config.dataset.data_dir=DATA_DIR \\
        --config.init.checkpoint=weights/darknet53_feature_mx.pth

``init.checkpoint`` is the official ImageNet (mixup) Darknet-53 file the official recipe starts
from (spec §7; keys ``module_list.0``-``10``, loaded into the backbone, everything else fresh;
the printed init report lists what was loaded). Without it the backbone starts from random
weights, which the paper's AP does not assume.

Load the official weights (the ``--asff --rfb`` weights) with::

    python -m asff_jax.convert --pth WEIGHTS.pth --config configs/coco_asff_star_800.py --out DIR
"""

from asff_jax.config import coco_recipe


def get_config():
  c = coco_recipe(fusion="asff", rfb=True, dropblock=True, input_size=800, paper_ap=43.9)
  c.dataset.sizes = tuple(range(480, 801, 32))
  return c
