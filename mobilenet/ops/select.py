"""Which implementation of each operation 'auto' means, per backend: the one place that decides.

Every operation in this package computes one function several ways (XLA's
own op first; faster swap-ins beside it) and takes an `implementation` name.
'auto' maps through `AUTO` below to the implementation measured fastest on
the backend (docs/performance.md has the measurements); where that one needs
the C++ kernels and they cannot be built (no compiler), `FALLBACK` names the
pure-XLA implementation used instead.
"""
from typing import Optional

import jax

from mobilenet.ops.cpu import kernels as cpu_kernels

IMPLEMENTATIONS = {
    'depthwise': ('xla', 'shifted', 'cpu_kernel'),
    'pointwise': ('xla', 'cpu_kernel'),
    'convolution': ('xla', 'patches', 'cpu_kernel'),
    'batch_norm': ('xla', 'cpu_kernel'),
}

# CPU: the C++ kernels, measured on this project's 2-core machines. GPU: XLA
# (cuDNN's grouped convolution; measured on an H200 with jax 0.11.2: 14,335 vs
# 10,275 training images/s for 'shifted', ImageNet form, 224, batch 256,
# bfloat16). TPU: XLA's convolution emitter handles depthwise natively.
AUTO = {
    'cpu': {'depthwise': 'cpu_kernel', 'pointwise': 'cpu_kernel', 'convolution': 'cpu_kernel',
            'batch_norm': 'cpu_kernel'},
}
DEFAULT = {'depthwise': 'xla', 'pointwise': 'xla', 'convolution': 'xla', 'batch_norm': 'xla'}
# Without a C++ compiler: the fastest pure-XLA form on the CPU.
FALLBACK = {'depthwise': 'shifted', 'pointwise': 'xla', 'convolution': 'patches',
            'batch_norm': 'xla'}


def resolve(operation: str, name: str, backend: Optional[str] = None) -> str:
  """The implementation `name` ('auto' or one of IMPLEMENTATIONS[operation]) stands for."""
  choices = IMPLEMENTATIONS[operation]
  if name != 'auto':
    if name not in choices:
      raise ValueError(f'unknown {operation} implementation {name!r}; choose one of '
                       f'{choices} or "auto"')
    return name
  choice = AUTO.get(backend or jax.default_backend(), DEFAULT)[operation]
  if choice == 'cpu_kernel' and not cpu_kernels.available():
    choice = FALLBACK[operation]
  return choice
