#!/usr/bin/env bash
# MobileNetV1 throughput on a GPU or TPU host, and where its step time goes.
#
#   bash scripts/gpu_benchmark.sh                      # results in ./benchmark_<backend>/
#   RESULTS=/tmp/h100 STEPS=20 bash scripts/gpu_benchmark.sh
#
# 1. The ImageNet form (224x224, alpha 1.0, batch 256), float32 and bfloat16,
#    every depthwise implementation that runs there (xla, shifted): train and
#    eval images/second (benchmark.jsonl).
# 2. The same network's layers timed one by one (forward + backward at their
#    shapes in the network): the share of depthwise, pointwise and BatchNorm
#    layers in the step (layers.jsonl).
# 3. The 32x32 'cifar' form at the CPU table's settings (benchmark.jsonl).
# Then set 'auto' for the backend in mobilenet/ops/depthwise.py (AUTO_BY_BACKEND)
# to the faster implementation and record the numbers in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

BACKEND=$(python3 -c 'import jax; print(jax.default_backend())')
RESULTS=${RESULTS:-benchmark_${BACKEND}}
STEPS=${STEPS:-10}
IMPLEMENTATIONS=${IMPLEMENTATIONS:-xla,shifted}  # 'cpu_kernel' runs on the CPU only.
mkdir -p "$RESULTS"
python3 -c 'import jax; print(jax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true

echo "== ImageNet form, 224x224, alpha 1.0, batch 256"
python3 scripts/benchmark.py --config configs/imagenet.py --resolutions=224 \
  --width_multipliers=1.0 --batch_sizes=256 --dtypes=bfloat16,float32 \
  --implementations="$IMPLEMENTATIONS" --warmup=3 --steps="$STEPS" --json | tee -a "$RESULTS/benchmark.jsonl"

echo "== Share of step time per kind of layer (ImageNet form, batch 256)"
for dtype in bfloat16 float32; do
  for implementation in ${IMPLEMENTATIONS//,/ }; do
    python3 scripts/benchmark_layers.py --config configs/imagenet.py --config.batch_size=256 \
      --config.model.dtype="$dtype" --config.model.depthwise_implementation="$implementation" \
      --warmup=2 --steps="$STEPS" --json | tee -a "$RESULTS/layers.jsonl"
  done
done

echo "== CIFAR form, 32x32, batch 128"
python3 scripts/benchmark.py --config configs/cifar10.py --width_multipliers=0.25,0.5,1.0 \
  --batch_sizes=128 --dtypes=float32,bfloat16 --implementations="$IMPLEMENTATIONS" \
  --warmup=3 --steps="$STEPS" --json | tee -a "$RESULTS/benchmark.jsonl"

echo "wrote $RESULTS/benchmark.jsonl $RESULTS/layers.jsonl"
