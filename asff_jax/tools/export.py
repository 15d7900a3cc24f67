"""Export inference for deployment, no custom ops: ``python -m asff_jax.export``.

::

    python -m asff_jax.export --workdir DIR --input-size 416 --out OUT \\
        [--checkpoint STEP] [--ema] [--format stablehlo|saved_model] \\
        [--batch_size N] [--image_hw H,W] [--score_thre 0.001] \\
        [--platforms cpu,cuda,tpu] [--config.key=value]

What is exported is the whole inference path, as one pure function of a uint8
image batch (:func:`make_serving_fn`):

1. pre-processing: ``(B, H, W, 3)`` uint8 RGB → bilinear resize to
   ``S x S`` (half-pixel centres, no antialias: OpenCV ``INTER_LINEAR`` and
   ``tf.image.resize``, as the official ValTransform, spec §5) → ImageNet
   mean/std;
2. the network (``train=False``: BN running statistics, DropBlock off), with
   the deformable conv written in plain JAX ops (gathers and matmuls — the
   official model needs a custom CUDA op here and cannot be exported);
3. decoding and the official post-processing: score = objectness × max class
   probability, ``score ≥ conf_thre``, fixed-size per-class NMS
   (:func:`asff_jax.evaluation.postprocess.nms_fixed`, ``eval.nms_thre``), at most
   ``eval.max_detections`` per image;
4. boxes mapped back to the input image's pixels (per-axis scale of the plain
   resize) and clipped to it.

Outputs (``D`` = ``eval.max_detections``; rows sorted by descending score,
rows ``≥ num_valid`` are zero padding):

* ``boxes`` ``(B, D, 4)`` float32 xyxy in input-image pixels (continuous corners);
* ``scores`` ``(B, D)`` float32; ``classes`` ``(B, D)`` int32 contiguous class
  index; ``category_ids`` ``(B, D)`` int32 dataset category id (COCO ids;
  0 in padding); ``num_valid`` ``(B,)`` int32.

These are the detections of ``asff_jax.predict`` (same pre-processing maths,
same network, same NMS), which a test checks on reloaded artefacts.

Formats (``--format``):

* ``stablehlo`` (default): ``OUT/model.jax_export``, a :mod:`jax.export`
  serialisation (StableHLO + calling convention, weights embedded as
  constants). Load it anywhere JAX runs, without this package::

      exp = jax.export.deserialize(open("OUT/model.jax_export", "rb").read())
      out = exp.call(images_uint8)     # dict as above

  Lowered for ``--platforms`` (default ``cpu,cuda,tpu``: one artefact for all
  three). Batch, height and width are symbolic unless fixed by
  ``--batch_size`` / ``--image_hw``: one artefact takes any image size and
  batch, XLA compiles once per concrete shape at the call site.
* ``saved_model``: ``OUT/`` is a TensorFlow SavedModel (via
  :func:`jax.experimental.jax2tf.convert`, native serialisation) with a
  ``serving_default`` signature ``images: uint8 (B, H, W, 3)`` → the dict
  above; weights are ``tf.Variable`` s. It runs under TensorFlow (TF Serving,
  ``tf.saved_model.load``) without JAX installed. Candidates before NMS are
  picked by a stable sort instead of ``lax.top_k`` (same result): ``top_k``
  lowers to a StableHLO composite newer than TF 2.21's ``XlaCallModule``
  reads. The graph is one
  ``XlaCallModule`` op, so converters that need TF-native ops (TFLite,
  TensorFlow.js, ONNX via tf2onnx) do not take it; see README "Deploying".

Both write ``OUT/asff_export.json`` (input size, thresholds, class names,
category ids, checkpoint step, input/output shapes).

Errors: a missing workdir or checkpoint raises :class:`~asff_jax.errors.MissingFileError`;
bad flag values (``--format``, ``--image_hw``, ``--platforms``, ``--input_size``)
raise :class:`~asff_jax.errors.ConfigError` naming the flag.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from asff_jax import cli  # first: quiets TensorFlow before it is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax import export  # noqa: E402

from asff_jax.boxes import rescale_boxes  # noqa: E402
from asff_jax.config import load_workdir_config  # noqa: E402
from asff_jax.data.loader import eval_input_size  # noqa: E402
from asff_jax.data.transforms import normalize_jax  # noqa: E402
from asff_jax.errors import ConfigError  # noqa: E402
from asff_jax.evaluation import inference  # noqa: E402
from asff_jax.evaluation.postprocess import nms_fixed  # noqa: E402
from asff_jax.models import create_model  # noqa: E402
from asff_jax.training import checkpoints  # noqa: E402

logger = logging.getLogger("asff_jax")

META_FILE = "asff_export.json"
STABLEHLO_FILE = "model.jax_export"
FORMATS = ("stablehlo", "saved_model")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def _bilinear_axis(n_in, n_out: int):
  """Source indices and weights of a half-pixel-centred linear resize along one axis.

  ``n_in`` may be a symbolic dimension (shape-polymorphic export). Returns
  ``(i0, i1, frac)``, each ``(n_out,)``; ``out[j] = (1 - frac) x[i0] + frac x[i1]``.
  """
  n_in_f = jnp.asarray(n_in, jnp.float32)
  pos = (jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (n_in_f / float(n_out)) - 0.5
  pos = jnp.clip(pos, 0.0, n_in_f - 1.0)
  i0 = jnp.floor(pos).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, jnp.asarray(n_in, jnp.int32) - 1)
  return i0, i1, pos - i0.astype(jnp.float32)


def resize_bilinear(images, size: int):
  """``(B, H, W, C)`` → ``(B, size, size, C)`` float32; ``H``, ``W`` may be symbolic.

  Half-pixel centres, edge clamping, no antialias — the values of
  ``tf.image.resize(..., 'bilinear')`` and OpenCV ``INTER_LINEAR`` (the
  official ValTransform, spec §5). Written as two gathers so that it lowers
  with symbolic spatial sizes (``jax.image.resize`` needs static ones).
  """
  x = images.astype(jnp.float32)
  y0, y1, fy = _bilinear_axis(x.shape[1], size)
  x0, x1, fx = _bilinear_axis(x.shape[2], size)
  fy = fy[None, :, None, None]
  fx = fx[None, None, :, None]
  rows = x[:, y0] * (1.0 - fy) + x[:, y1] * fy
  return rows[:, :, x0] * (1.0 - fx) + rows[:, :, x1] * fx


def make_serving_fn(model, *, input_size: int, conf_thre: float, nms_thre: float,
                    pre_nms_topk: int, max_detections: int,
                    category_ids: Optional[Sequence[int]] = None, sort_topk: bool = False) -> Callable:
  """Returns ``serve(variables, images) -> dict``: the exported inference path.

  Args:
    model: the detector (:func:`asff_jax.models.create_model`).
    input_size: network input side ``S`` (input pixels).
    conf_thre, nms_thre, pre_nms_topk, max_detections: post-processing, as
      :func:`asff_jax.evaluation.postprocess.nms_fixed`.
    category_ids: dataset category id of each contiguous class (default: the
      class index itself).
    sort_topk: candidate selection by stable sort (see
      :func:`asff_jax.evaluation.postprocess.nms_fixed`; needed for TensorFlow consumers).

  ``serve(variables, images)``: ``images`` ``(B, H, W, 3)`` uint8 (or float in
  [0, 255]) RGB, any ``H``, ``W``; returns the dict described in the module
  docstring (boxes in ``images``' pixels). Pure and jit/export-compatible.
  """
  size = int(input_size)
  cat_table = None if category_ids is None else np.asarray(list(category_ids), np.int32)

  def serve(variables, images):
    h, w = images.shape[1], images.shape[2]
    x = normalize_jax(resize_bilinear(images, size))
    out = model.apply(variables, x, train=False)
    det = nms_fixed(out["pred"], conf_thre=conf_thre, nms_thre=nms_thre,
                    pre_nms_topk=pre_nms_topk, max_detections=max_detections, sort_topk=sort_topk)
    wf = jnp.asarray(w, jnp.float32)
    hf = jnp.asarray(h, jnp.float32)
    upper = jnp.stack([wf, hf, wf, hf])
    boxes = jnp.clip(rescale_boxes(det["boxes"], (size, size), (hf, wf)), 0.0, upper)  # padding stays 0
    valid = jnp.arange(det["scores"].shape[1])[None, :] < det["num_valid"][:, None]
    classes = det["classes"]
    cats = classes if cat_table is None else jnp.asarray(cat_table)[classes]
    return {"boxes": boxes,
            "scores": det["scores"], "classes": classes,
            "category_ids": jnp.where(valid, cats, 0).astype(jnp.int32),
            "num_valid": det["num_valid"]}

  return serve


def input_shape_spec(batch_size: Optional[int] = None, image_hw: Optional[Sequence[int]] = None) -> str:
  """The shape-polymorphism spec of the image input, e.g. ``"b, h, w, 3"`` or ``"4, 480, 640, 3"``."""
  b = "b" if not batch_size else str(int(batch_size))
  if image_hw:
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
      raise ConfigError(f"--image_hw must be two positive integers, got {image_hw}")
    return f"{b}, {h}, {w}, 3"
  return f"{b}, h, w, 3"


def export_stablehlo(serve: Callable, variables, *, shape_spec: str = "b, h, w, 3",
                     platforms: Sequence[str] = DEFAULT_PLATFORMS):
  """``jax.export`` of ``images -> serve(variables, images)`` (weights embedded).

  Returns the :class:`jax.export.Exported`; ``.serialize()`` gives the bytes.
  """
  consts = jax.tree.map(jnp.asarray, variables)
  fn = jax.jit(lambda images: serve(consts, images))
  spec = jax.ShapeDtypeStruct(export.symbolic_shape(shape_spec), jnp.uint8)
  return export.export(fn, platforms=tuple(platforms))(spec)


def export_saved_model(serve: Callable, variables, out: str, *, shape_spec: str = "b, h, w, 3",
                       platforms: Sequence[str] = ("cpu",)) -> None:
  """Writes a TensorFlow SavedModel of ``serve`` to ``out`` (weights as ``tf.Variable`` s).

  Signature ``serving_default``: ``images`` uint8 ``(B, H, W, 3)`` (dims fixed
  where ``shape_spec`` fixes them) → the output dict.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (SavedModel only)
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel  (SavedModel only)

  leaves_np = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  names = sorted(leaves_np)
  tf_vars = [tf.Variable(leaves_np[n], trainable=False, name=n.replace("/", "__")) for n in names]

  def serve_flat(flat, images):
    return serve(traverse_util.unflatten_dict(dict(zip(names, flat)), sep="/"), images)

  tf_fn = jax2tf.convert(serve_flat, polymorphic_shapes=[None, f"({shape_spec})"], with_gradient=False,
                         native_serialization_platforms=tuple(platforms))
  dims = [None if not d.strip().isdigit() else int(d) for d in shape_spec.split(",")]
  module = tf.Module()
  module.weights = tf_vars

  @tf.function(autograph=False, input_signature=[tf.TensorSpec(dims, tf.uint8, name="images")])
  def serving(images):
    return tf_fn(module.weights, images)

  module.serve = serving
  tf.saved_model.save(module, out, signatures={"serving_default": serving.get_concrete_function()})


def parse_platforms(value) -> tuple:
  """``"cpu,cuda"`` or a sequence → a tuple of JAX platform names; ValueError names the flag."""
  items = value.split(",") if isinstance(value, str) else list(value)
  plats = tuple(p.strip().lower() for p in items if p.strip())
  bad = [p for p in plats if p not in PLATFORMS]
  if not plats or bad:
    raise ConfigError(f"--platforms: unknown platform(s) {bad or value!r}; choose from {PLATFORMS}")
  return plats


def export_workdir(workdir: str, out: str, *, config=None, step: Optional[int] = None,
                   use_ema: Optional[bool] = None, input_size: Optional[int] = None,
                   fmt: str = "stablehlo", batch_size: Optional[int] = None,
                   image_hw: Optional[Sequence[int]] = None, score_thre: Optional[float] = None,
                   platforms: Optional[Sequence[str]] = None) -> dict:
  """Exports checkpoint ``step`` (default latest) of ``workdir`` to ``out``; returns the metadata.

  ``input_size`` defaults to the evaluation size of the config; ``score_thre``
  to ``eval.conf_thre``; ``platforms`` to ``cpu,cuda,tpu`` for StableHLO and
  ``cpu`` for SavedModel (TF's ``XlaCallModule`` runs the lowering of the
  device it is placed on; add ``cuda`` for TF Serving on GPU).

  Raises:
    MissingFileError: no workdir config or checkpoint.
    ConfigError: unknown ``fmt`` / ``platforms``, bad ``image_hw`` or ``input_size``.
  """
  if fmt not in FORMATS:
    raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
  plats = parse_platforms(platforms if platforms is not None else
                          (DEFAULT_PLATFORMS if fmt == "stablehlo" else ("cpu",)))
  shape_spec = input_shape_spec(batch_size, image_hw)
  if config is None:
    config = load_workdir_config(workdir)
  variables, step = checkpoints.load_variables(workdir, step, use_ema=use_ema)
  size = int(input_size or eval_input_size(config))
  if size % 32:
    raise ConfigError(f"--input-size must be a multiple of 32 (the largest stride), got {size}")
  settings = inference.eval_settings(config)
  if score_thre is not None:
    settings["conf_thre"] = float(score_thre)
  names = [str(n) for n in config.dataset.class_names]
  cat_ids = [int(c) for c in config.dataset.category_ids]
  num_classes = int(config.model.num_classes)
  if len(cat_ids) != num_classes:
    cat_ids = list(range(num_classes))
  serve = make_serving_fn(create_model(config), input_size=size, category_ids=cat_ids,
                          sort_topk=fmt == "saved_model", **settings)

  os.makedirs(out, exist_ok=True)
  if fmt == "stablehlo":
    exp = export_stablehlo(serve, variables, shape_spec=shape_spec, platforms=plats)
    _atomic_write(os.path.join(out, STABLEHLO_FILE), bytes(exp.serialize()))
    artefact = STABLEHLO_FILE
  else:
    export_saved_model(serve, variables, out, shape_spec=shape_spec, platforms=plats)
    artefact = "saved_model.pb"
  meta = {"format": fmt, "artefact": artefact, "workdir": os.path.abspath(workdir), "step": int(step),
          "input_size": size, "image_input": {"shape": shape_spec, "dtype": "uint8", "layout": "BHWC RGB"},
          "outputs": {"boxes": "(B, D, 4) float32 xyxy image pixels", "scores": "(B, D) float32",
                      "classes": "(B, D) int32", "category_ids": "(B, D) int32", "num_valid": "(B,) int32"},
          "max_detections": settings["max_detections"], "conf_thre": settings["conf_thre"],
          "nms_thre": settings["nms_thre"], "pre_nms_topk": settings["pre_nms_topk"],
          "platforms": list(plats), "class_names": names, "category_ids": cat_ids,
          "model": {"fusion": str(config.model.fusion), "num_classes": num_classes}}
  _atomic_write(os.path.join(out, META_FILE), json.dumps(meta, indent=1).encode())
  logger.info("exported step %d of %s (%s, input %d, images %s, platforms %s) to %s", step, workdir,
              fmt, size, shape_spec, ",".join(plats), out)
  return meta


def _atomic_write(path: str, data: bytes) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def main(argv=None):
  """CLI entry point (absl flags; ``--input-size`` and ``--input_size`` both work)."""

  def define(fv, argv_):
    cli.define_model_source_flags(fv, argv_, "asff_jax.export", allow_pth=False)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer("input_size", None, "Network input side S (default: the eval size).", flag_values=fv)
    flags.DEFINE_enum("format", "stablehlo", list(FORMATS), "Artefact format.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Fix the batch size (default: symbolic).", flag_values=fv)
    flags.DEFINE_list("image_hw", None, "Fix the image height,width (default: symbolic).", flag_values=fv)
    flags.DEFINE_float("score_thre", None, "Score threshold (default: eval.conf_thre).", flag_values=fv)
    flags.DEFINE_string("platforms", None, "Lowering platforms (default: cpu,cuda,tpu; SavedModel: cpu).", flag_values=fv)
    flags.DEFINE_bool("ema", None, "Use the EMA parameters (default: if the run had EMA).", flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)

  def run(f):
    export_workdir(f.workdir, f.out, config=f.config, step=f.checkpoint, use_ema=f.ema,
                   input_size=f.input_size, fmt=f.format, batch_size=f.batch_size,
                   image_hw=[int(v) for v in f.image_hw] if f.image_hw else None,
                   score_thre=f.score_thre, platforms=f.platforms)

  return cli.run(run, "asff_jax.export", argv, define)


if __name__ == "__main__":
  sys.exit(main())
