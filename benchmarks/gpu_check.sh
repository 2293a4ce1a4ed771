#!/usr/bin/env bash
# The GPU check of issue 14, one short script (under 8 minutes on one recent NVIDIA GPU):
#   1. the device, the torch build, and the device-handling tests;
#   2. the `cifar10` recipe trained on the GPU for a few epochs (the paper's protocol:
#      5,000 training images, 1,000 queries, the 54,000-image database encoded and searched);
#   3. the `paper` recipe (AlexNet fc7 at 227 px, batches of 16, Adam, every loss end to end)
#      for one epoch from a randomly initialised AlexNet weights file, the same protocol;
#   4. the GPU-trained checkpoint encoding the database again, on the GPU and on the CPU
#      (a model trained on one device runs on any other);
#   5. images/s of every encoding and the mAP tables (results.md of each run).
#
# It needs an environment with a CUDA build of torch and dpq installed, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# and the CIFAR-10 JPEG zip (DATA=...). Nothing is downloaded. Usage:
#   DATA=../shared/data/cifar10/cifar10-jpeg.zip OUT=/tmp/dpq-gpu bash benchmarks/gpu_check.sh
# Environment: PY (python, default .venv/bin/python), DEVICE (default cuda), EPOCHS (cifar10
# recipe epochs, default 4), PAPER_EPOCHS (default 1), WORKERS (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${DATA:-../shared/data/cifar10/cifar10-jpeg.zip}
WORDVEC=${WORDVEC:-$(dirname "$(dirname "$DATA")")/wordvec/cifar10.txt}
OUT=${OUT:-/tmp/dpq-gpu-check}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-4}
PAPER_EPOCHS=${PAPER_EPOCHS:-1}
WORKERS=${WORKERS:-4}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DPQ=("$PY" -m dpq.cli)
mkdir -p "$OUT"
started=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - started )) s)"; }

step "device and torch build"
nvidia-smi -L || true
"$PY" - <<'EOF'
import torch
from dpq.devices import describe_device, resolve_device, resolve_precision
device = resolve_device("auto")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, auto -> {describe_device(device)}")
print(f"precision auto -> {resolve_precision('auto', device)}")
assert device.type == "cuda", "no CUDA device: this check is for a GPU machine"
EOF
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_backbones.py \
    tests/test_loading.py -k "not the_adapter_says" 2>&1 | tail -3

step "cifar10 recipe, $EPOCHS epochs on $DEVICE"
rm -rf "$OUT/cifar10"
"${DPQ[@]}" reproduce cifar10 --data "$DATA" --word-vectors "$WORDVEC" --epochs "$EPOCHS" \
    --device "$DEVICE" --workers "$WORKERS" --out "$OUT/cifar10" --quiet

step "paper recipe, random AlexNet weights, $PAPER_EPOCHS epoch(s) on $DEVICE"
"$PY" - "$OUT/alexnet-random.safetensors" <<'EOF'
import sys, torch
from safetensors.torch import save_file
from dpq.model.backbones import create_backbone
torch.manual_seed(0)
state = {k: v.contiguous() for k, v in create_backbone("alexnet").state_dict().items()}
state["classifier.6.weight"] = torch.randn(1000, 4096) * 0.01  # as torchvision's file holds it
state["classifier.6.bias"] = torch.zeros(1000)
save_file(state, sys.argv[1])
EOF
rm -rf "$OUT/paper"
"${DPQ[@]}" reproduce cifar10 --config paper --weights "$OUT/alexnet-random.safetensors" \
    --data "$DATA" --word-vectors "$WORDVEC" --epochs "$PAPER_EPOCHS" --device "$DEVICE" \
    --workers "$WORKERS" --out "$OUT/paper" --quiet

step "the GPU-trained paper model encodes the 54,000-image database on $DEVICE and on the CPU"
"${DPQ[@]}" encode --model "$OUT/paper/model" --images "$DATA" --split "$OUT/paper/split.json" \
    --subset database --device "$DEVICE" --batch-size 256 --out "$OUT/db-gpu.index.npz" --quiet
"$PY" - "$OUT" "$DATA" <<'EOF'
import sys, time
from dpq.data import Split, load_source
from dpq.index import DPQIndex
from dpq.model.network import DPQModel
out = sys.argv[1]
source = load_source(sys.argv[2])
split = Split.load(f"{out}/paper/split.json")
rows = split.database[:2000]
model = DPQModel.from_checkpoint(f"{out}/paper/model", device="cpu")
began = time.perf_counter()
codes = model.encode(source.inputs[rows], batch_size=64)
seconds = time.perf_counter() - began
gpu = DPQIndex.load(f"{out}/db-gpu.index.npz")
agree = float((gpu.codes[: len(rows)] == codes).all(axis=1).mean())
print(f"CPU: {len(rows)} database images in {seconds:.1f} s ({len(rows) / seconds:.0f} images/s);"
      f" codes equal to the GPU's for {agree:.1%} of them (bf16/TF32 rounding may move a few)")
EOF

step "results"
for run in cifar10 paper; do
    echo "--- $run"
    cat "$OUT/$run/results.md"
    "$PY" - "$OUT/$run/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
w = r["wall_seconds"]
print(f"train {w['train']:.0f} s ({r['epochs']} epochs, {r['precision']}); "
      f"query + database features {55000 / w['features']:.0f} images/s; total {w['total']:.0f} s")
EOF
done
echo "gpu check done in $(( $(date +%s) - started )) s"
