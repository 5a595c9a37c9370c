"""Calling the C++ kernels so that they shard over the batch and vmap.

An FFI call is opaque to XLA's partitioner and to `jax.vmap`. On a mesh that
splits the batch, XLA gathers the whole global batch onto every device before
the call (every device then computes every example), and `jax.vmap` has no
rule for it at all. Each kernel call here is therefore wrapped twice:

- Under a context mesh (`jax.set_mesh`, or training/parallel.on_mesh around
  the traced step as training/train.py and experiments/evaluate.py use) whose
  devices split the batch evenly, the call runs inside `jax.shard_map` on each
  device's local shard: per-example kernels (forward passes, input gradients,
  BatchNorm apply) map over the shard directly; kernels that reduce over the
  batch (filter gradients, BatchNorm statistics and backward sums) reduce
  their shard and the partial results are all-reduced (`psum`), so they stay
  over the GLOBAL batch. The mesh is read from the context, never passed
  through the model; without one, on one device, or inside a shard_map of the
  caller's, the kernel is called as is.
- Under `jax.vmap` (`jax.custom_batching.custom_vmap`), a per-example kernel
  whose per-channel operands are not vmapped runs once on the vmapped axis
  folded into its batch axis (V x N examples); everything else (a reduction
  over the batch per vmapped element, or per-channel operands that differ per
  element) runs as a loop over the vmapped axis (`lax.map`), as those kernels
  compute one reduction per call.
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

# combine(local_outputs, axis_names) -> global outputs, inside the shard_map.
Combine = Callable[[tuple, tuple], tuple]


def psum_combine(outputs, axes):
  """Per-shard partial sums -> sums over the global batch."""
  return tuple(lax.psum(output, axes) for output in outputs)


def _batch_axes(operands, batched: Sequence[bool]) -> Optional[tuple]:
  """The context mesh's axes to split the batch (axis 0) over, or None to call the kernel as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  batch_sizes = {operand.shape[0] for operand, b in zip(operands, batched) if b}
  if len(batch_sizes) != 1 or next(iter(batch_sizes)) % mesh.size:
    return None
  return tuple(mesh.axis_names)


def _sharded(call, operands, batched, combine: Optional[Combine], reduced: tuple):
  """`call(*operands)` on each device's shard of the batch (see the module docstring)."""
  axes = _batch_axes(operands, batched)
  if axes is None:
    return call(*operands)
  in_specs = tuple(PartitionSpec(axes) if b else PartitionSpec() for b in batched)

  def local(*shards):
    outputs = call(*shards)
    if combine is None:
      return outputs
    combined = iter(combine(tuple(o for o, r in zip(outputs, reduced) if r), axes))
    return tuple(next(combined) if r else o for o, r in zip(outputs, reduced))

  # The outputs of a per-example kernel are split like its batch; a
  # combined reduction is the same on every device.
  out_specs = tuple(PartitionSpec() if r else PartitionSpec(axes) for r in reduced)
  return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs)(*operands)


def kernel_call(target: str, out_shapes, operands, *, batched: Sequence[bool],
                combine: Optional[Combine] = None, reduced: Optional[Sequence[bool]] = None,
                **attributes):
  """Calls FFI `target` on `operands` -> tuple of outputs, sharded and vmappable.

  `batched[i]` says whether operand i has the batch as its axis 0 (activations
  and their gradients; not filters and per-channel vectors). Without
  `combine` the kernel is per-example and every output has the batch as axis
  0; with it the kernel reduces over the batch and `combine` turns the
  per-shard outputs into the global ones (`psum_combine` for sums). A kernel
  with outputs of both kinds says which are reductions in `reduced` (all of
  them by default with `combine`); `combine` gets those alone.
  """
  out_shapes = tuple(out_shapes)
  batched = tuple(batched)
  reduced = tuple(reduced) if reduced is not None else (combine is not None,) * len(out_shapes)
  if any(reduced) != (combine is not None) or len(reduced) != len(out_shapes):
    raise ValueError(f'{target}: `reduced` {reduced} does not fit the outputs and `combine`')

  def call(*args):
    shapes = tuple(_with_batch(shape, args, batched, r) for shape, r in zip(out_shapes, reduced))
    return tuple(jax.ffi.ffi_call(target, shapes)(*args, **attributes))

  @jax.custom_batching.custom_vmap
  def vmappable(*args):
    return _sharded(call, args, batched, combine, reduced)

  @vmappable.def_vmap
  def rule(axis_size, in_batched, *args):
    fold = combine is None and not any(v and not b for v, b in zip(in_batched, batched))
    if fold:
      # V vmapped batches of N examples are V * N examples to a per-example kernel.
      merged = [_fold(arg if v else jnp.broadcast_to(arg, (axis_size, *arg.shape))) if b else arg
                for arg, v, b in zip(args, in_batched, batched)]
      outputs = kernel_call(target, out_shapes, merged,
                            batched=batched, **attributes)
      outputs = tuple(o.reshape(axis_size, o.shape[0] // axis_size, *o.shape[1:])  # Even if empty.
                      for o in outputs)
    else:
      def one(mapped):
        it = iter(mapped)
        element = [next(it) if v else arg for arg, v in zip(args, in_batched)]
        return kernel_call(target, out_shapes, element, batched=batched, combine=combine,
                           reduced=reduced, **attributes)
      outputs = lax.map(one, [arg for arg, v in zip(args, in_batched) if v])
    return tuple(outputs), (True,) * len(outputs)

  return vmappable(*operands)


def _fold(array):
  """(V, N, ...) -> (V * N, ...)."""
  return array.reshape(-1, *array.shape[2:])


def _with_batch(shape: jax.ShapeDtypeStruct, args, batched, reduced: bool):
  """An output shape for the operands actually passed (a shard's batch inside shard_map)."""
  if reduced:
    return shape
  batch = next(arg.shape[0] for arg, b in zip(args, batched) if b)
  return jax.ShapeDtypeStruct((batch, *shape.shape[1:]), shape.dtype)
