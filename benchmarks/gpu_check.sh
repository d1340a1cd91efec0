#!/usr/bin/env bash
# One short, prepared run on a machine with a GPU: does the CUDA path work end to end, and how fast and how
# large is each fit stage at 128x128 (the papers' reference geometry)? Prints JSON lines; writes them, the
# tiny fit's run directory and the environment to ${OUT:-gpu_out}/.
#
#   PY=python3 bash benchmarks/gpu_check.sh          # PY: a Python with a CUDA build of torch
#
# Budget: ~5-8 minutes on an H100-class GPU (simulation of 4,096 128x128 patterns runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}                      # DEVICE=cpu DETECTOR=32 N=256 BATCHES=16: a smoke test on a CPU
DETECTOR=${DETECTOR:-128}
N=${N:-4096}
BATCHES=${BATCHES:-32 128 512 1024 2048 4096}
mkdir -p "$OUT"
$PY -m pip install --quiet --no-deps -e . || true
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
$PY - <<'PYEOF' | tee "$OUT/env.json"
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PYEOF
# 1. the CUDA path end to end on a tiny data set: fit (EMC warm start, SVI, exact iterations), export, verdict
$PY -m bayes_spi.cli.main simulate 2CEX --geometry reference-32 --n-patterns 512 -o "$OUT/tiny.h5" --force --no-progress
$PY -m bayes_spi.cli.main fit "$OUT/tiny.h5" -o "$OUT/tiny_run" --device "$DEVICE" --epochs 2 --force --no-progress \
    2>&1 | tail -n 20 | tee "$OUT/tiny_fit.txt"
# 2. throughput and peak memory per stage and batch size at 128x128 (stops a stage at the first OOM)
# shellcheck disable=SC2086
$PY benchmarks/bench_gpu.py --device "$DEVICE" --detector "$DETECTOR" --n-patterns "$N" --batches $BATCHES \
    --out "$OUT/bench" | tee "$OUT/gpu_throughput.jsonl"
# 3. where the time of one training step goes at 32, 64 and 128 px (encoder, search, scores, likelihood, backward)
$PY benchmarks/bench_profile.py --device "$DEVICE" --sizes 32,64,"$DETECTOR" --batch-size 256 --patterns 512 \
    --steps 5 --workdir "$OUT/profile" | tee "$OUT/step_profile.txt"
