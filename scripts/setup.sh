#!/usr/bin/env bash
# One-time set-up on Debian 12 / Ubuntu 24.04 with only python3: the README's
# two commands and .ci/run all start with it, so CI proves the README's steps.
#
#   bash scripts/setup.sh     # then: .venv/bin/python scripts/train.py ...
#
# 1. apt packages (root, or sudo), installed only when missing:
#      dataset-fashion-mnist  Fashion-MNIST's files, so the default config trains offline
#      g++                    compiles the C++ CPU kernels on first use; without it training
#                             falls back to XLA's slower convolutions
#      python3-venv           `python3 -m venv` (Debian's python3 ships without it)
#      libtcmalloc-minimal4   the allocator the CLIs preload (mobilenet/malloc_tuning.py):
#                             glibc's malloc has XLA:CPU's step buffers faulted in afresh
#    `apt-get update` runs first: fresh images have empty package lists.
# 2. A virtual environment in .venv with requirements.txt (which ends with the
#    repository itself, editable): stock Debian/Ubuntu refuse `pip install` into
#    the system Python (PEP 668, "externally-managed-environment").
#
# Needs network access to the apt and PyPI mirrors and ~2.7 GB of disk (~2.5 GB
# for .venv: TensorFlow, JAX); takes 1-4 minutes the first time, depending on
# the download speed. Rerunning it is a no-op (a few seconds) until
# requirements.txt or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

APT_PACKAGES=(dataset-fashion-mnist g++ python3-venv libtcmalloc-minimal4)
missing=()
if command -v dpkg >/dev/null && command -v apt-get >/dev/null; then
  for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
else
  echo "setup: no apt-get here (not Debian/Ubuntu): make sure g++ and python3's venv module" \
       "are installed; Fashion-MNIST will need the network (TFDS downloads it)" >&2
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    echo "setup: missing apt packages ${missing[*]}; install them as root:" \
         "apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]} with apt-get"
  "${sudo[@]}" apt-get update -qq
  # env, not export: sudo would drop an exported variable.
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A stamp of what .venv was installed from, so a rerun skips pip (which would
# rebuild the editable package: ~20 s) unless the requirements changed.
stamp=.venv/.installed-from
wanted=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $(python3 --version)"
  python3 -m venv .venv
fi
echo "setup: installing requirements.txt into .venv (~2.5 GB, 1-4 minutes the first time)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
echo "$wanted" > "$stamp"
echo "setup: done in $((SECONDS - start)) s; run .venv/bin/python scripts/<script>.py," \
     "or '. .venv/bin/activate' and then python3"
