#!/usr/bin/env bash
# MobileNetV1 throughput on a GPU or TPU host: the ImageNet form (224x224,
# alpha 1.0, batch 256) with every depthwise implementation that runs there,
# in float32 and bfloat16, then the 32x32 'cifar' form for comparison with
# the CPU table in docs/performance.md. One JSON line per setting goes to
# $OUT (default: benchmark_<backend>.jsonl); pick the fastest for 'auto' in
# mobilenet/depthwise.py (AUTO_BY_BACKEND) and record it in the docs.
#
#   bash scripts/gpu_benchmark.sh            # needs jax with CUDA or TPU support
#   OUT=/tmp/h100.jsonl STEPS=20 bash scripts/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND=$(python -c 'import jax; print(jax.default_backend())')
OUT=${OUT:-benchmark_${BACKEND}.jsonl}
STEPS=${STEPS:-20}
# 'cpu_kernel' runs on the CPU only; the others run everywhere.
IMPLEMENTATIONS=${IMPLEMENTATIONS:-xla,shifted}
python -c 'import jax; print(jax.devices())'
: > "$OUT"

# ImageNet form, the paper's network: 224x224, alpha 1.0, batch 256.
python scripts/benchmark.py --config configs/imagenet.py \
  --resolutions=224 --width_multipliers=1.0 --batch_sizes=256 --dtypes=float32,bfloat16 \
  --implementations="$IMPLEMENTATIONS" --warmup=3 --steps="$STEPS" --json | tee -a "$OUT"

# CIFAR form at the CPU table's settings, to compare the implementations at small maps.
python scripts/benchmark.py --config configs/cifar10.py --width_multipliers=0.25,0.5,1.0 \
  --batch_sizes=128 --dtypes=float32,bfloat16 --implementations="$IMPLEMENTATIONS" \
  --warmup=3 --steps="$STEPS" --json | tee -a "$OUT"

echo "wrote $OUT"
