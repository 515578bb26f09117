"""``python -m bench [--quick] [--duration N] [--only NAME,NAME] [--out DIR]``."""

import sys

from bench.runner import main

if __name__ == "__main__":  # the load generator's processes import this module too
    sys.exit(main())
