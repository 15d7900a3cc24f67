"""``python -m asff_jax.benchmark``: the command line of :mod:`asff_jax.tools.benchmark` (see there)."""

import sys

from asff_jax.tools.benchmark import main

if __name__ == "__main__":
  sys.exit(main())
