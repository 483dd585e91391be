"""Per-example gradients, their norms, and clipped sums.

Shapes: B batch; `grads_B` is a pytree shaped like the parameters with a
leading batch axis B.

The reference path is `jax.vmap(jax.grad(loss))` over single examples under
`jit` (works for any pure loss), and the clipping arithmetic shared with the
fast exact engine of `jaxshape.per_example` (which imports this module, never
the other way round): `ClippedSum`, clip factors, norm statistics.

References:
  Hong et al. 2020, §5.1 (gradient shaping) and Appendix B (DP-SGD,
  Algorithm 1: per-example clipping to l2 norm C).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxshape._typing import Batch
from jaxshape._typing import LossFn
from jaxshape._typing import Params


class ClippedSum(NamedTuple):
  """Per-example gradients already clipped and summed (what noise transforms consume).

  The DP transforms of `jaxshape.transforms` accept this in place of
  per-example gradients, so the fast engine (`jaxshape.per_example`), which
  never materialises them, feeds the same optax chain.
  """

  sum: Params  # like params: sum over real, finite examples of the clipped gradients
  norms_B: jax.Array  # [B] float32: l2 norm of each example's gradient before clipping
  mask_B: jax.Array  # [B] float32: 1 for real examples with finite gradients, else 0
  l2_norm_clip: jax.Array  # [] float32: the clip norm C used


def _single_example_grad(loss_fn: LossFn, params: Params, example: Batch) -> Params:
  batch_of_one = jax.tree.map(lambda a: a[None], example)
  return jax.grad(loss_fn)(params, batch_of_one)


@functools.partial(jax.jit, static_argnums=0)
def per_example_grads(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
  """Gradient of `loss_fn` for each example of `batch` alone.

  Args:
    loss_fn: `loss_fn(params, batch) -> scalar`, the ordinary mean loss over
      whatever batch it is given. It must be hashable (a function or a frozen
      dataclass such as `jaxshape.models.ClassifierLoss`).
    params: the parameters (any pytree).
    batch: a pytree of arrays sharing a leading axis B.

  Returns:
    A pytree shaped like `params` with a leading axis B: entry i is
    `jax.grad(loss_fn)(params, batch[i:i+1])`.

  Example:
    >>> grads_B = per_example_grads(loss_fn, params, {"x": x_B, "y": y_B})
    >>> norms_B = per_example_norms(grads_B)
  """
  return jax.vmap(_single_example_grad, in_axes=(None, None, 0))(loss_fn, params, batch)


def per_example_norms(grads_B: Params) -> jax.Array:
  """Global l2 norm of each example's gradient over all leaves, `[B]`."""
  leaves = jax.tree.leaves(grads_B)
  if not leaves:
    raise ValueError("grads_B has no leaves")
  sq_B = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves)
  return jnp.sqrt(sq_B)


def finite_mask(grads_B: Params) -> jax.Array:
  """1.0 for examples whose gradient is finite everywhere, 0.0 otherwise, `[B]`."""
  ok_B = None
  for g in jax.tree.leaves(grads_B):
    ok = jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
    ok_B = ok if ok_B is None else ok_B & ok
  return ok_B.astype(jnp.float32)


def clip_factors(norms_B: jax.Array, l2_norm_clip: jax.typing.ArrayLike) -> jax.Array:
  """min(1, C / ||g_i||) for each example, `[B]` (1 for a zero gradient)."""
  safe_B = jnp.where(norms_B > 0, norms_B, 1.0)
  return jnp.minimum(1.0, l2_norm_clip / safe_B)


def scale_per_example(grads_B: Params, scale_B: jax.Array) -> Params:
  """Multiplies example i's gradient by `scale_B[i]`; non-finite examples become 0."""
  ok_B = finite_mask(grads_B) > 0

  def scale(g):
    s = scale_B.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)
    ok = ok_B.reshape(s.shape)
    return jnp.where(ok, g * s, jnp.zeros_like(g))

  return jax.tree.map(scale, grads_B)


def norm_statistics(
  norms_B: jax.Array, keep_B: jax.Array, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean, max, fraction above C) of the norms of the kept examples (`keep_B` = 1)."""
  count = jnp.maximum(jnp.sum(keep_B), 1.0)
  safe_B = jnp.where(keep_B > 0, norms_B, 0.0)
  mean = jnp.sum(safe_B) / count
  frac = jnp.sum(jnp.where(safe_B > l2_norm_clip, keep_B, 0.0)) / count
  return mean, jnp.max(safe_B), frac


def clipped_sum_from_grads(
  grads_B: Params, l2_norm_clip: jax.typing.ArrayLike, mask_B: jax.Array | None = None
) -> ClippedSum:
  """Clips materialised per-example gradients and sums them (non-finite ones dropped)."""
  norms_B = per_example_norms(grads_B)
  keep_B = finite_mask(grads_B)
  if mask_B is not None:
    keep_B = keep_B * mask_B
  clipped_B = scale_per_example(grads_B, clip_factors(norms_B, l2_norm_clip) * keep_B)
  total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped_B)
  return ClippedSum(total, norms_B, keep_B, jnp.asarray(l2_norm_clip, jnp.float32))
