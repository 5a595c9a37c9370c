r"""Float32 matrix-product rates of XLA (JAX), this project's C++ kernels or PyTorch: the pointwise layers' ground.

  python3 scripts/matmul_rates.py --framework jax
  python3 scripts/matmul_rates.py --framework mobilenet
  .venv-torch/bin/python scripts/matmul_rates.py --framework torch

For each (rows, in, out) shape of MobileNet's pointwise layers, GFLOP/s of the
three products a training step computes: x @ w (forward), x^T dy (filter
gradient) and dy @ w^T (input gradient), medians of --steps after one warm-up,
on --threads threads. 'mobilenet' is JAX calling the project's kernels
(mobilenet/ops/cpu/pointwise_cpu.cc): the forward kernel for x @ w and
dy @ w^T, the filter-gradient kernel for x^T dy. The last shapes are
V3-Small's (alpha 0.5, batch 128, 32x32): there a product takes tens of
microseconds, and a call's dispatch (JAX's or PyTorch's) is part of its
time. Imports only the framework it measures (the torch side runs in
.venv-torch, without this project). Prints one line per shape.
"""
import argparse
import os
import statistics
import time

SHAPES = ((32768, 64, 128), (32768, 128, 128), (8192, 256, 256), (2048, 512, 512),
          (512, 1024, 1024), (32768, 16, 40), (2048, 144, 24), (512, 288, 48), (128, 288, 1024))


def _rate(run, flops: float, steps: int) -> float:
  run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return flops / statistics.median(times) / 1e9


def _products(framework: str, rows: int, inputs: int, outputs: int):
  """Zero-argument callables for the forward, filter-gradient and input-gradient products."""
  if framework == 'torch':
    import torch  # pylint: disable=import-outside-toplevel
    x, w, dy = torch.rand(rows, inputs), torch.rand(inputs, outputs), torch.rand(rows, outputs)
    return (lambda: x @ w), (lambda: x.T @ dy), (lambda: dy @ w.T)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x, w, dy = (jax.numpy.asarray(rng.random(shape, np.float32))
              for shape in ((rows, inputs), (inputs, outputs), (rows, outputs)))
  if framework == 'mobilenet':
    forward, filter_grad, input_grad = _kernel_products()
  else:
    forward, filter_grad, input_grad = (jax.jit(lambda a, b: a @ b),
                                        jax.jit(lambda a, b: a.T @ b),
                                        jax.jit(lambda a, b: a @ b.T))
  return (lambda: forward(x, w).block_until_ready(), lambda: filter_grad(x, dy).block_until_ready(),
          lambda: input_grad(dy, w).block_until_ready())


def _kernel_products():
  """Jitted x @ w, x^T dy and dy @ w^T on the project's C++ kernels."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mobilenet.ops import batch_norm, pointwise  # pylint: disable=import-outside-toplevel
  from mobilenet.ops.cpu import calls, kernels  # pylint: disable=import-outside-toplevel
  if not kernels.available():
    raise SystemExit(f'error: the C++ kernels are unavailable: {kernels.error()}')

  def product(a, b):
    ones, zeros = jnp.ones(b.shape[1], jnp.float32), jnp.zeros(b.shape[1], jnp.float32)
    return pointwise.pointwise_inference(a, b, scale=ones, bias=zeros,
                                         activation=batch_norm.identity)

  def filter_grad(a, b):
    return calls.kernel_call('mobilenet_pointwise_filter_grad',
                             [jax.ShapeDtypeStruct((a.shape[1], b.shape[1]), jnp.float32)],
                             [a, b], batched=(True, True), combine=calls.psum_combine)[0]

  return jax.jit(product), jax.jit(filter_grad), jax.jit(lambda a, b: product(a, b.T))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--framework', choices=('jax', 'mobilenet', 'torch'), required=True)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--steps', type=int, default=7)
  parser.add_argument('--only_check_args', action='store_true',
                      help='Parse the flags and stop (as the absl scripts do).')
  args = parser.parse_args()
  if args.only_check_args:
    return
  os.sched_setaffinity(0, range(args.threads))  # Both frameworks then size their pools to it.
  if args.framework == 'torch':
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(args.threads)
  print(f'{args.framework}, {args.threads} threads: GFLOP/s of x @ w, x^T dy, dy @ w^T')
  for rows, inputs, outputs in SHAPES:
    flops = 2.0 * rows * inputs * outputs
    rates = [_rate(run, flops, args.steps) for run in _products(args.framework, rows, inputs,
                                                                  outputs)]
    print(f'{rows:>6} x {inputs:>4} x {outputs:>4}: ' + '  '.join(f'{r:6.0f}' for r in rates),
          flush=True)


if __name__ == '__main__':
  main()
