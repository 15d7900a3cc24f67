"""What every command line shares: quiet start-up, absl flags, workdir/config flags, one-line errors.

Every ``python -m asff_jax.<command>`` goes through :func:`run`:

* the console is quiet by default: TensorFlow's C++ log, absl's and TFDS's
  INFO chatter and orbax's per-save lines are silenced (``--verbose`` brings
  them back); our own progress goes to the ``asff_jax`` logger at INFO;
* a user's mistake (:class:`asff_jax.errors.UserError`: a bad config value, a
  missing file, malformed annotations, a workdir without a checkpoint, an
  unknown ``--config.key``) ends with one line ``asff_jax.<command>: error:
  <message>`` on stderr and exit status 2, without a traceback (``--verbose``
  shows it);
* flags may be written with dashes or underscores (``--input-size 416`` or
  ``--input_size=416``).

Importing this module (or :mod:`asff_jax.data`) imports TensorFlow quietly
(:mod:`asff_jax._tensorflow`), so entry points import it first.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional, Sequence

from asff_jax import _tensorflow  # noqa: E402,F401  (quiet TensorFlow start-up)

VERBOSE = _tensorflow.VERBOSE



# pylint: disable=wrong-import-position
import tensorflow_datasets as tfds  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from asff_jax import config as config_lib  # noqa: E402
from asff_jax.errors import MissingFileError, UserError  # noqa: E402

logger = logging.getLogger("asff_jax")

#: Loggers whose INFO lines are noise for a user (warnings and errors still show).
NOISY_LOGGERS = ("absl", "orbax", "tensorflow", "jax._src.xla_bridge", "tensorflow_datasets",
                 "jax._src.distributed")


#: Warnings libraries print in normal operation (orbax restoring a checkpoint it wrote itself).
KNOWN_NOISE = ("Metadata file does not exist",)


def _drop_known_noise(record: logging.LogRecord) -> bool:
  return not any(str(record.getMessage()).startswith(n) for n in KNOWN_NOISE)


def setup_logging(verbose: bool = False) -> None:
  """INFO for ``asff_jax`` on stderr with a short format; the libraries quiet unless ``verbose``."""
  root = logging.getLogger()
  root.setLevel(logging.INFO if verbose else logging.WARNING)
  fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(fmt)
  absl_logging.use_python_logging(quiet=True)
  if not verbose:
    handler.addFilter(_drop_known_noise)
  root.handlers = [handler]
  logger.setLevel(logging.INFO)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    tfds.disable_progress_bar()


def normalize_argv(argv: Sequence[str], multi: Sequence[str] = ()) -> list[str]:
  """``--some-flag`` → ``--some_flag`` (values untouched); ``--F a b c`` → ``--F=a,b,c`` for flags in ``multi``."""
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--") and not a.startswith("--config."):
      name, eq, value = a[2:].partition("=")
      a = "--" + name.replace("-", "_") + eq + value
      if name.replace("-", "_") in multi and not eq:
        values = []
        while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
          values.append(argv[i + 1])
          i += 1
        a = f"--{name.replace('-', '_')}=" + ",".join(values)
    out.append(a)
    i += 1
  return out


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of ``--name`` in ``argv`` (``--name=v`` or ``--name v``), or None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      value = argv[i + 1]
  return value


def define_config_from_file(fv: flags.FlagValues, argv: Optional[Sequence[str]] = None,
                            required: bool = True) -> None:
  """``--config FILE`` (a ``get_config()`` file) with ``--config.key=value`` overrides.

  ``argv`` (with the program name): the arguments the overrides are found in
  (ml_collections defines one flag per override it sees; default ``sys.argv``).
  """
  config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True,
                                  flag_values=fv, sys_argv=None if argv is None else list(argv))
  if required:
    flags.mark_flags_as_required(["config"], flag_values=fv)


def define_model_source_flags(fv: flags.FlagValues, argv: Sequence[str], prog: str, *,
                              allow_pth: bool = True) -> None:
  """``--workdir DIR [--checkpoint STEP]``, or ``--pth F.pth --config FILE`` (official weights).

  ``--config`` is the workdir's saved config laid over the defaults (so every
  ``--config.key=value`` override works), or, with ``--config FILE``, that file.
  With ``--pth`` the official weights are converted on the fly.

  Raises:
    UserError: neither ``--workdir`` nor ``--pth``; a workdir without ``config.json``.
  """
  workdir = flag_value(argv, "workdir")
  config_file = flag_value(argv, "config")
  pth = flag_value(argv, "pth") if allow_pth else None
  if workdir is None and pth is None:
    raise UserError("--workdir DIR is required" + (" (or --pth F.pth --config FILE)" if allow_pth else ""))
  if config_file is not None:
    define_config_from_file(fv, argv, required=False)
  elif workdir is not None:
    config_flags.DEFINE_config_dict("config", config_lib.load_workdir_config(workdir),
                                    "config (default: the workdir's config.json)", flag_values=fv,
                                    sys_argv=list(argv))
  else:
    raise UserError("--pth needs --config FILE (the config of that model, e.g. configs/coco_asff_608.py)")
  flags.DEFINE_string("workdir", None, "Training or convert workdir.", flag_values=fv)
  flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: latest).", flag_values=fv)
  if allow_pth:
    flags.DEFINE_string("pth", None, "Official PyTorch weights (.pth), converted on the fly.", flag_values=fv)


def run(main: Callable[[flags.FlagValues], Optional[int]], prog: str,
        argv: Optional[Sequence[str]] = None,
        define: Optional[Callable[[flags.FlagValues, list[str]], None]] = None,
        multi: Sequence[str] = ()) -> int:
  """Parses ``argv`` into fresh flags (``define(fv, argv)`` declares them) and returns ``main(fv)``'s status.

  ``argv``: the arguments without the program name (default ``sys.argv[1:]``). Exit status: ``main``'s
  return value (0 if None); 2 for a bad flag or a :class:`UserError`, reported
  in one line on stderr (``--verbose``: raised with its traceback). Each call
  uses its own ``FlagValues``, so a command can run several times in one process.
  """
  argv = normalize_argv([prog] + list(sys.argv[1:] if argv is None else argv), multi)
  verbose = "--verbose" in argv or VERBOSE
  fv = flags.FlagValues()
  try:
    if define is not None:
      define(fv, argv)
    flags.DEFINE_bool("verbose", False, "Show TensorFlow/absl/orbax logs and Python tracebacks.",
                      flag_values=fv)
    flags.DEFINE_bool("help", False, "Show this help.", flag_values=fv, short_name="h")
    try:
      fv(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.KEY
      overrides = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]
      raise UserError(f"unknown config key {e} in {', '.join(overrides) or 'the overrides'}; "
                      "keys are listed in asff_jax/config.py") from e
    if fv.help:
      print(fv.main_module_help() or fv.get_help())
      return 0
    setup_logging(fv.verbose)
    return int(main(fv) or 0)
  except (UserError, flags.Error) as e:
    if verbose:
      raise
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


__all__ = ["run", "setup_logging", "normalize_argv", "flag_value", "define_model_source_flags",
           "define_config_from_file", "MissingFileError", "UserError", "logger"]
