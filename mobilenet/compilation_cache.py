"""JAX's persistent compilation cache for the CLIs: a rerun compiles nothing it compiled before.

Compiling is most of a small run's start-up on CPU (the initializer, the
training and the eval step: docs/performance.md), and the same programs are
compiled again by every resume, every eval of the same architecture and every
process of a multi-process run on one machine. `enable()` points JAX's cache
at $MOBILENET_CACHE_DIR/jax-<CPU> (default ~/.cache/mobilenet), next to the
C++ kernels' build: XLA:CPU compiles for this CPU's features, so a cache on a
home folder shared by different machines keeps one folder per CPU kind.

A JAX_COMPILATION_CACHE_DIR the user set wins (JAX reads it itself), and
MOBILENET_COMPILATION_CACHE=0 turns the cache off. The benchmarks leave it
off: they report compile times.
"""
import hashlib
import os

import jax
from absl import logging

from mobilenet.ops.cpu import kernels

_SWITCH = 'MOBILENET_COMPILATION_CACHE'


def directory() -> str:
  """This machine's cache folder (one per CPU kind, beside the C++ kernels' build)."""
  cpu = hashlib.sha256(kernels.cpu_features()).hexdigest()[:12]
  return str(kernels.cache_dir() / f'jax-{cpu}')


def enable() -> None:
  """Turns JAX's persistent compilation cache on, unless the user chose otherwise."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.environ.get(_SWITCH) == '0':
    return
  jax.config.update('jax_compilation_cache_dir', directory())
  logging.info('compiled programs are cached in %s (%s=0 turns this off)', directory(), _SWITCH)
