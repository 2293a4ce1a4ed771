"""``python -m dpq ...``: the command line (so ``torchrun -m dpq train ...`` works)."""

import sys

from dpq.cli import main

sys.exit(main())
