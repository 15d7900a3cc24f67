"""``python -m asff_jax.predict``: the command line of :mod:`asff_jax.tools.predict` (see there)."""

import sys

from asff_jax.tools.predict import main

if __name__ == "__main__":
  sys.exit(main())
