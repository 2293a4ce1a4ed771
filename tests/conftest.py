"""Shared test settings: small thread counts so the suite behaves on two cores."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
