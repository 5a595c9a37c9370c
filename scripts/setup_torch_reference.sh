#!/usr/bin/env bash
# The PyTorch yardstick's own virtual environment, .venv-torch (torch is no dependency of the project).
#
#   bash scripts/setup_torch_reference.sh     # then: python3 scripts/compare_with_pytorch.py
#
# Installs a pinned torch (and numpy, which torch looks for) into .venv-torch; scripts/torch_reference.py runs there and imports
# nothing else (not this project, not torchvision: it writes torchvision's MobileNet
# definitions out itself, because torchvision's registry wheels are built against torch's CUDA
# build and fail to import next to its CPU build: "operator torchvision::nms does not exist").
# Where pip resolves torch==2.13.0 to the CPU build (2.13.0+cpu) this is ~200 MB; elsewhere pip
# fetches the CUDA build with its nvidia-* wheels (several GB) and runs it on the CPU all the same.
# Rerunning it is a no-op once .venv-torch has the pinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
NUMPY_VERSION=2.4.6  # Without numpy, importing torch warns "Failed to initialize NumPy".
VENV=.venv-torch
start=$SECONDS

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import sys, numpy, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup_torch_reference: $VENV has torch $TORCH_VERSION"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_torch_reference: creating $VENV with $(python3 --version)"
  python3 -m venv "$VENV"
fi
echo "setup_torch_reference: installing torch==$TORCH_VERSION into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "numpy==$NUMPY_VERSION"
"$VENV/bin/python" -c 'import torch; print("setup_torch_reference: torch", torch.__version__)'
echo "setup_torch_reference: done in $((SECONDS - start)) s"
