"""glibc malloc settings under which XLA:CPU stops paying page faults every step.

XLA:CPU allocates each step's temporary buffers (hundreds of MB for a
MobileNet training step) with malloc, which serves blocks that large with a
fresh mmap and unmaps them on free: every step the kernel faults in and zeroes
all of that memory again. Measured at alpha 0.5, batch 128, 32x32: 54,500
minor faults (213 MB) and 0.18 s of system time per 0.37 s step. With the
settings below (serve large blocks from the heap, keep freed memory, back it
with transparent huge pages) the same step takes ~450 faults and 0.045 s of
system time (docs/performance.md).

glibc reads GLIBC_TUNABLES only at process start, so the CLIs call
`reexec_with_tuned_malloc()` first thing: it re-executes the same command once
with the settings added. MOBILENET_MALLOC_TUNING=0 turns it off.
"""
import os
import platform
import sys

TUNABLES = ('glibc.malloc.hugetlb=1', 'glibc.malloc.mmap_max=0',
            'glibc.malloc.trim_threshold=4294967295')
_MARKER = 'MOBILENET_MALLOC_TUNING'
# GLIBC_TUNABLES as the process found it ('' when unset), so that child processes that are not
# this project's (the PyTorch yardstick) can be started with the environment the user gave.
_ORIGINAL = 'MOBILENET_ORIGINAL_GLIBC_TUNABLES'


def tuned_environment(environ=None) -> dict:
  """A copy of `environ` (default os.environ) with TUNABLES added to GLIBC_TUNABLES."""
  environ = dict(os.environ if environ is None else environ)
  existing = [item for item in environ.get('GLIBC_TUNABLES', '').split(':') if item]
  names = {item.split('=')[0] for item in existing}
  # Settings the user gave win over ours.
  added = [item for item in TUNABLES if item.split('=')[0] not in names]
  environ.setdefault(_ORIGINAL, environ.get('GLIBC_TUNABLES', ''))
  environ['GLIBC_TUNABLES'] = ':'.join(existing + added)
  environ[_MARKER] = 'applied'
  return environ


def untuned_environment(environ=None) -> dict:
  """A copy of `environ` (default os.environ) with GLIBC_TUNABLES as it was before the re-exec.

  For child processes that are not this project's: they would otherwise inherit
  these settings (and run differently than their users run them).
  """
  environ = dict(os.environ if environ is None else environ)
  if environ.get(_MARKER) != 'applied':
    return environ
  original = environ.pop(_ORIGINAL, '')
  if original:
    environ['GLIBC_TUNABLES'] = original
  else:
    environ.pop('GLIBC_TUNABLES', None)
  del environ[_MARKER]
  return environ


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process once with the tuned malloc; returns if already done or not glibc."""
  if os.environ.get(_MARKER) in ('applied', '0'):
    return
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, tuned_environment())
