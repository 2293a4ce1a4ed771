#!/bin/bash
# The Table 2 ablations and the two schedules on CIFAR-10 as run for docs/RESULTS.md:
# a 6-minute budget each, one torch thread each, so that two invocations of this script can
# run side by side on two cores; flip-averaging off to halve feature extraction.
#
#   benchmarks/cifar10_ablations.sh full end-to-end E E+LS &
#   benchmarks/cifar10_ablations.sh E+LC two-step no-soft &
#
# Rows are appended to results/cifar10_ablations.json (+ .md); logs go to runs/abl-NAME.log.
# Environment: DATA (CIFAR-10 source), MINUTES (budget per run, default 6).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10/cifar10-jpeg.zip}
MINUTES=${MINUTES:-6}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p runs
recipe=runs/ablation-recipe.json
[ -f "$recipe" ] || "$PYTHON" -c "
from dpq.recipes import cifar10_recipe
open('$recipe', 'w').write(cifar10_recipe().replace(model={'tta_flip': False}).to_json())"
for name in "$@"; do
  OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 "$PYTHON" benchmarks/cifar10_ablations.py \
    --config "$name" --minutes "$MINUTES" --threads 1 --recipe "$recipe" \
    --data "$DATA" --quiet > "runs/abl-$name.log" 2>&1
done
