"""TensorFlow imported once, quietly, and kept off accelerators (tf.data runs on the host CPU).

Imported by :mod:`asff_jax.data` and :mod:`asff_jax.cli` before anything else
touches TensorFlow. TensorFlow only runs the input pipeline, so its GPUs and
TPUs are hidden (``tf.config.set_visible_devices([], kind)``): otherwise a GPU
build of TensorFlow (Colab's) reserves most of the GPU memory JAX needs.
Unless ``--verbose`` is on the command line or ``ASFF_JAX_VERBOSE=1``:

* ``TF_CPP_MIN_LOG_LEVEL=3`` where it is unset;
* the C++ start-up lines (the oneDNN notice, absl's pre-initialisation warning)
  are written to file descriptor 2 before any log level applies, so fd 2 points
  at /dev/null for the import only (an import error still raises; its Python
  message is printed after fd 2 is restored).
"""

from __future__ import annotations

import os
import sys

VERBOSE = "--verbose" in sys.argv or os.environ.get("ASFF_JAX_VERBOSE", "") not in ("", "0")


def _import_quietly() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (with fd 2 silenced)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def hide_accelerators_from_tensorflow() -> list[str]:
  """Makes TensorFlow see no GPU or TPU; returns the kinds it had (no-op once TF has initialised them)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (imported above, quietly or not)

  hidden = []
  for kind in ("GPU", "TPU"):
    try:
      if tf.config.list_physical_devices(kind):
        tf.config.set_visible_devices([], kind)
        hidden.append(kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
  return hidden


if not VERBOSE:
  _import_quietly()
hide_accelerators_from_tensorflow()
