r"""Float32 matrix-product rates of XLA (JAX) or PyTorch on this machine: the pointwise layers' ground.

  python3 scripts/matmul_rates.py --framework jax
  .venv-torch/bin/python scripts/matmul_rates.py --framework torch

For each (rows, in, out) shape of MobileNet's pointwise layers, GFLOP/s of the
three products a training step computes: x @ w (forward), x^T dy (filter
gradient) and dy @ w^T (input gradient), medians of --steps after one warm-up,
on --threads threads. Imports only the framework it measures (the torch side
runs in .venv-torch, without this project). Prints one line per shape.
"""
import argparse
import os
import statistics
import time

SHAPES = ((32768, 64, 128), (32768, 128, 128), (8192, 256, 256), (2048, 512, 512),
          (512, 1024, 1024))


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
  forward, filter_grad, input_grad = (jax.jit(lambda a, b: a @ b), jax.jit(lambda a, b: a.T @ b),
                                      jax.jit(lambda a, b: a @ b.T))
  return (lambda: forward(x, w).block_until_ready(), lambda: filter_grad(x, dy).block_until_ready(),
          lambda: input_grad(dy, w).block_until_ready())


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--framework', choices=('jax', 'torch'), required=True)
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
