"""``python -m asff_jax.export``: the command line of :mod:`asff_jax.tools.export` (see there)."""

import sys

from asff_jax.tools.export import main

if __name__ == "__main__":
  sys.exit(main())
