"""The project's C++ kernels for XLA:CPU: built on first use, registered with jax.ffi.

`depthwise_cpu.cc` (depthwise convolution, and the depthwise layer with the
next 1x1 product in inference), `batch_norm_cpu.cc` (BatchNorm + activation),
`convolution_cpu.cc` (the stem's dense convolution) and `pointwise_cpu.cc` (the
pointwise filter gradient and inference forward) are compiled together with the
system C++ compiler (`$CXX`, else g++), `-O3 -march=native`, against jaxlib's
FFI headers (and the shared headers `cpu_loops.h`, the parallel loop,
`cpu_vectors.h`, `pointwise_tiles.h`, the 1x1 product's register tiles, and
`convolution_tiles.h`, the stem's),
into one shared library cached in `$MOBILENET_CACHE_DIR` (default `~/.cache/mobilenet`) under a
key of the sources, the jax version and the CPU's feature flags, so a change of
any of them rebuilds it; a process that finds another building the same library
waits for it instead of compiling too. No build step and no dependency besides a compiler;
without one, callers fall back to pure-XLA code (`error()` says why).
"""
import ctypes
import fcntl
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mobilenet.ops.cpu import calls

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'depthwise_cpu.cc', _HERE / 'batch_norm_cpu.cc', _HERE / 'convolution_cpu.cc',
           _HERE / 'pointwise_cpu.cc')
HEADERS = (_HERE / 'cpu_loops.h', _HERE / 'cpu_vectors.h', _HERE / 'pointwise_tiles.h',
           _HERE / 'convolution_tiles.h')
# FFI target name -> exported handler symbol.
TARGETS = {
    'mobilenet_depthwise_forward': 'DepthwiseForward',
    'mobilenet_depthwise_input_grad': 'DepthwiseInputGrad',
    'mobilenet_depthwise_filter_grad': 'DepthwiseFilterGrad',
    'mobilenet_depthwise_inference': 'DepthwiseInferenceForward',
    'mobilenet_depthwise_activated_backward': 'DepthwiseActivatedBackward',
    'mobilenet_separable_inference': 'SeparableInferenceForward',
    'mobilenet_batch_norm_stats': 'BatchNormStats',
    'mobilenet_batch_norm_apply': 'BatchNormApply',
    'mobilenet_batch_norm_backward_sums': 'BatchNormBackwardSums',
    'mobilenet_batch_norm_backward_input': 'BatchNormBackwardInput',
    'mobilenet_conv_forward': 'ConvolutionForward',
    'mobilenet_conv_filter_grad': 'ConvolutionFilterGrad',
    'mobilenet_pointwise_filter_grad': 'PointwiseFilterGrad',
    'mobilenet_pointwise_inference': 'PointwiseInferenceForward',
}


def cache_dir() -> pathlib.Path:
  """Where the compiled library is kept ($MOBILENET_CACHE_DIR, else ~/.cache/mobilenet)."""
  default = pathlib.Path.home() / '.cache' / 'mobilenet'
  return pathlib.Path(os.environ.get('MOBILENET_CACHE_DIR', default))


def cpu_features() -> bytes:
  """The CPU's feature flags: -march=native code must not run on a different CPU."""
  try:
    with open('/proc/cpuinfo', 'rb') as cpuinfo:
      return next((line for line in cpuinfo if line.startswith(b'flags')), b'')
  except OSError:
    return os.uname().machine.encode()


def build() -> pathlib.Path:
  """Compiles the kernels once per sources, jax version and CPU; returns the library's path."""
  digest = hashlib.sha256(jax.__version__.encode() + cpu_features())
  for path in SOURCES + HEADERS:
    digest.update(path.read_bytes())
  library = cache_dir() / f'mobilenet_cpu_{digest.hexdigest()[:16]}.so'
  if library.exists():
    return library
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if compiler is None:
    raise RuntimeError('no C++ compiler (g++) found to build the CPU kernels')
  library.parent.mkdir(parents=True, exist_ok=True)
  # One build per library: processes started together (a run and the test suite on a
  # fresh machine) would each spend the build's minute of both cores; the later ones
  # wait for the first and load what it built.
  with open(library.with_suffix('.lock'), 'w') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('Waiting for another process building the C++ CPU kernels into %s ...', library)
      fcntl.flock(lock, fcntl.LOCK_EX)
    if not library.exists():
      _compile(compiler, library)
  return library


def _compile(compiler: str, library: pathlib.Path) -> None:
  """Compiles SOURCES into `library` (atomically: a reader never sees a half-written file).

  Each source is compiled by its own compiler process, all at once, then linked:
  on 2 cores the build takes about as long as the largest source (depthwise_cpu.cc,
  ~9 s) instead of all of them in turn (~19 s).
  """
  # A minute of silence would look like a hang: say what runs and for how long.
  logging.info('Building the C++ CPU kernels with %s (once per machine and version; about '
               '10-40 s, longer on a busy machine) into %s ...', compiler, library)
  start = time.perf_counter()
  flags = ['-O3', '-march=native', '-std=c++17', '-fPIC', '-w']
  # Build beside the target and rename, so concurrent builds never load a half-written file.
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    objects = [pathlib.Path(tmp) / f'{source.stem}.o' for source in SOURCES]
    compiles = [(subprocess.Popen([compiler, *flags, f'-I{jax.ffi.include_dir()}', '-c',
                                   str(source), '-o', str(target)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE), source)
                for source, target in zip(SOURCES, objects)]
    for process, source in compiles:
      stdout, stderr = process.communicate()
      if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args, stdout, stderr)
    partial = pathlib.Path(tmp) / library.name
    subprocess.run([compiler, *flags, '-shared', *map(str, objects), '-o', str(partial),
                    '-lpthread'], check=True, capture_output=True)
    os.replace(partial, library)
  logging.info('Built the C++ CPU kernels in %.0f s', time.perf_counter() - start)


@functools.lru_cache(maxsize=None)
def error() -> Optional[str]:
  """Builds and registers the kernels once; returns None on success, else why they are unavailable."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (OSError, RuntimeError, subprocess.CalledProcessError) as failure:
    detail = getattr(failure, 'stderr', b'') or b''
    reason = f'{failure} {detail.decode(errors="replace")[-500:]}'.strip()
    # Once, not silently: everything still works, only slower on the CPU.
    logging.warning('The C++ CPU kernels are unavailable; on the CPU, XLA\'s slower code runs '
                    'instead (install g++: apt-get install g++): %s', reason)
    return reason
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return None


def call_strided(target: str, out_shape, first, second, strides, pads, *, reduces: bool = False):
  """Calls a strided kernel (two float32 operands, attributes sh, sw, pt, pl) -> float32.

  `strides` is (sh, sw); `pads` the explicit ((top, bottom), (left, right)) padding.
  Per-example kernels take the batch in `first` only; with `reduces` (filter
  gradients) both operands carry it and the kernel sums over it (calls.py
  shards and vmaps both kinds).
  """
  out, = calls.kernel_call(
      target, [jax.ShapeDtypeStruct(out_shape, jnp.float32)], [first, second],
      batched=(True, reduces), combine=calls.psum_combine if reduces else None,
      sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads[0][0]),
      pl=np.int64(pads[1][0]))
  return out


def available() -> bool:
  """True when the kernels are built and registered (building them if needed)."""
  return error() is None
