"""Memory allocator settings under which XLA:CPU stops paying page faults every step.

XLA:CPU allocates each step's temporary buffers (hundreds of MB for a
MobileNet training step) with malloc, which serves blocks that large with a
fresh mmap and unmaps them on free: every step the kernel faults in and zeroes
all of that memory again. Measured at alpha 0.5, batch 128, 32x32: 54,500
minor faults (213 MB) and 0.18 s of system time per 0.37 s step. With the
glibc settings below (serve large blocks from the heap, keep freed memory,
back it with transparent huge pages) the same step takes ~450 faults and
0.045 s of system time (docs/performance.md).

Those settings reach only part of it: XLA's worker threads allocate from
glibc arenas of their own, whose heaps hold at most 64 MB each; glibc maps a
larger block afresh whatever mmap_max says and unmaps a heap once it empties.
Their buffers were still zeroed by the kernel every step (V3-Large's cifar
training step: ~410 faults and 45-60 ms of system time in 170-180 ms; V1's
first layers ran 4-8x slower than alone while the kernel cleared their
output). One arena for every thread (glibc.malloc.arena_max=1) ended the
faults but fragmented the heap (V3-Large's training 10-30% slower). So where
gperftools' tcmalloc is installed (Debian's libtcmalloc-minimal4, which
scripts/setup.sh installs) the CLIs preload it, told to keep freed memory
(TCMALLOC_RELEASE_RATE=0): no faults after the first steps. Elsewhere the
glibc settings alone apply.

The dynamic loader and glibc read these variables only at process start, so
the CLIs call `reexec_with_tuned_malloc()` first thing: it re-executes the
same command once with the settings added. MOBILENET_MALLOC_TUNING=0 turns it
off; MOBILENET_MALLOC=glibc keeps glibc's malloc where tcmalloc is installed.
"""
import ctypes.util
import functools
import json
import os
import platform
import sys
from typing import Optional

TUNABLES = ('glibc.malloc.hugetlb=1', 'glibc.malloc.mmap_max=0',
            'glibc.malloc.trim_threshold=4294967295')
TCMALLOC = 'tcmalloc_minimal'  # find_library's name for gperftools' libtcmalloc_minimal.so.4
ALLOCATORS = ('tcmalloc', 'glibc')
_MARKER = 'MOBILENET_MALLOC_TUNING'
_CHOICE = 'MOBILENET_MALLOC'
# The variables the settings change, as the process found them (None: unset), so that child
# processes that are not this project's (the PyTorch yardstick) can be started with the
# environment the user gave.
_ORIGINAL = 'MOBILENET_ORIGINAL_MALLOC_ENVIRONMENT'
_CHANGED = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'TCMALLOC_RELEASE_RATE', _CHOICE)


@functools.lru_cache(maxsize=None)  # find_library runs `ldconfig -p`; asked up to 3 times per start.
def tcmalloc_library() -> Optional[str]:
  """The installed tcmalloc's library name (for LD_PRELOAD), or None."""
  return ctypes.util.find_library(TCMALLOC)


def allocator(environ=None) -> str:
  """'tcmalloc' or 'glibc': MOBILENET_MALLOC if set, else tcmalloc where it is installed."""
  environ = os.environ if environ is None else environ
  choice = environ.get(_CHOICE) or ('tcmalloc' if tcmalloc_library() else 'glibc')
  if choice not in ALLOCATORS:
    raise SystemExit(f'{_CHOICE}={choice!r} is not one of {", ".join(ALLOCATORS)}; '
                     f'unset it to use tcmalloc where installed')
  if choice == 'tcmalloc' and not tcmalloc_library():
    raise SystemExit(f'{_CHOICE}=tcmalloc, but libtcmalloc_minimal.so.4 is not installed: '
                     f'apt-get install libtcmalloc-minimal4, or set {_CHOICE}=glibc')
  return choice


def tuned_environment(environ=None) -> dict:
  """A copy of `environ` (default os.environ) with the allocator settings added."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(_MARKER) == 'applied':
    return environ
  environ[_ORIGINAL] = json.dumps({name: environ.get(name) for name in _CHANGED})
  chosen = allocator(environ)
  existing = [item for item in environ.get('GLIBC_TUNABLES', '').split(':') if item]
  names = {item.split('=')[0] for item in existing}
  # Settings the user gave win over ours.
  added = [item for item in TUNABLES if item.split('=')[0] not in names]
  environ['GLIBC_TUNABLES'] = ':'.join(existing + added)
  if chosen == 'tcmalloc':
    library = tcmalloc_library()
    preloaded = [item for item in environ.get('LD_PRELOAD', '').split(':') if item]
    environ['LD_PRELOAD'] = ':'.join([library] + [item for item in preloaded if item != library])
    environ.setdefault('TCMALLOC_RELEASE_RATE', '0')
  environ[_CHOICE] = chosen
  environ[_MARKER] = 'applied'
  return environ


def untuned_environment(environ=None) -> dict:
  """A copy of `environ` (default os.environ) as it was before the re-exec.

  For child processes that are not this project's: they would otherwise inherit
  these settings (and run differently than their users run them).
  """
  environ = dict(os.environ if environ is None else environ)
  if environ.get(_MARKER) != 'applied':
    return environ
  for name, value in json.loads(environ.pop(_ORIGINAL, '{}')).items():
    if value is None:
      environ.pop(name, None)
    else:
      environ[name] = value
  del environ[_MARKER]
  return environ


def active_allocator() -> str:
  """The allocator this process runs with: 'tcmalloc' or 'glibc' once re-executed, else 'untuned'."""
  return os.environ.get(_CHOICE, 'glibc') if os.environ.get(_MARKER) == 'applied' else 'untuned'


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process once with the tuned allocator; returns if already done or not glibc."""
  if os.environ.get(_MARKER) in ('applied', '0'):
    return
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, tuned_environment())
