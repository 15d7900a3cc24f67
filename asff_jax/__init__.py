"""asff_jax: ASFF ("Learning Spatial Fusion for Single-Shot Object Detection",
Liu, Huang, Wang 2019) in JAX/Flax — YOLOv3 + Darknet-53 strong baseline,
adaptively spatial feature fusion, official-weight converter and parity tests.

The package reads as the paper's pipeline (``ARCHITECTURE.md``): ``data`` →
``models`` (backbone → neck → fusion → head, targets and loss) → ``training``
→ ``evaluation``, and ``tools`` beside them. For inference from Python::

    from asff_jax import Detector
    det = Detector.from_workdir("runs/default")
    detections = det(image)          # (H, W, 3) uint8 RGB → boxes in original pixels
"""

__version__ = "0.1.0"
__all__ = ["Detector", "Detections"]


def __getattr__(name):
  # Lazy: importing asff_jax stays cheap; the API pulls in JAX, TensorFlow and the model.
  if name in ("Detector", "Detections"):
    from asff_jax.tools import detector  # pylint: disable=import-outside-toplevel  (lazy public API)
    return getattr(detector, name)
  raise AttributeError(f"module 'asff_jax' has no attribute {name!r}")
