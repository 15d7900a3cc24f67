"""The official COCO training recipe (spec §7) as a config builder for ``configs/coco_*.py``.

* data: TFDS ``coco/2017`` prepared under ``dataset.data_dir`` (or, with
  ``--config.dataset.source=coco_folder --config.dataset.root=/data/coco
  --config.dataset.train_split=train2017 --config.dataset.eval_split=val2017``,
  an extracted COCO folder); crowd boxes are trained on, as official;
* random shape 320..608 every 10 iterations starting at 608, fixed to the
  final size for the last 10 epochs; mixup Beta(1.5, 1.5), off for the last 29
  epochs (official: from epoch 272 of 0..300);
* SGD momentum 0.9, LR 0.001 (not scaled with the batch), weight decay 5e-4 on
  all parameters; 4th-power burn-in over 5 epochs, constant to epoch 20,
  cosine to 1e-5 at epoch 270, then 1e-5; 301 epochs (0..300);
* global batch 64 (the paper's 4 GPUs × 16; the official README trains with
  10 × 5 = 50 at the same LR);
* evaluation every 10 epochs (official ``--eval_interval 10``) with score
  threshold 0.001, NMS 0.65, at most 100 detections per image.
"""

from __future__ import annotations

import ml_collections

COCO_TRAIN_IMAGES = 117266  # train2017 images with annotations (the official loader's count)


def coco_config(*, fusion: str = "asff", rfb: bool = False, dropblock: bool = False,
                input_size: int = 608, paper_ap: float = -1.0) -> ml_collections.ConfigDict:
  """Full training config of an official COCO model (see the module docstring).

  ``paper_ap``: the COCO AP the paper reports for this model (documentation;
  -1 if none).
  """
  from asff_jax.train import default_config  # pylint: disable=import-outside-toplevel

  c = default_config()
  steps_per_epoch = COCO_TRAIN_IMAGES // 64
  c.batch_size = 64
  c.num_epochs = 301
  c.steps_per_epoch = steps_per_epoch
  c.dataset.source = "coco_tfds"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.dataset.input_size = input_size
  c.dataset.first_size = input_size
  c.dataset.sizes = tuple(range(320, input_size + 1, 32))
  c.dataset.num_train_examples = COCO_TRAIN_IMAGES
  c.model.num_classes = 80
  c.model.fusion = fusion
  c.model.rfb = rfb
  c.model.dropblock = dropblock
  c.eval_every_steps = 10 * steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch
  c.log_every_steps = 100
  c.paper_ap = float(paper_ap)
  return c
