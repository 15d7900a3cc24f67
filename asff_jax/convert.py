"""``python -m asff_jax.convert``: the command line of :mod:`asff_jax.tools.convert` (see there)."""

import sys

from asff_jax.tools.convert import main

if __name__ == "__main__":
  sys.exit(main())
