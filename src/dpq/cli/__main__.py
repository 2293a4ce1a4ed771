"""``python -m dpq.cli``: the same as ``dpq`` (and ``python -m dpq``)."""

import sys

from dpq.cli import main

sys.exit(main())
