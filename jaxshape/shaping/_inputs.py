"""The inputs every shaping transform accepts, reduced to (gradients, norms, keep mask).

Shapes: B batch; `grads_B` a pytree like the parameters with a leading batch
axis; `*_B` one value per example.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxshape import grads as grads_lib
from jaxshape import transforms
from jaxshape._typing import Params


class MaskedGrads(NamedTuple):
  """Per-example gradients with the mask of real examples (padding rows 0)."""

  grads_B: Params  # like params with a leading axis B
  mask_B: jax.Array  # [B] float32: 1 for real examples


def materialised(updates, params) -> tuple[Params, jax.Array, jax.Array, jax.Array]:
  """(grads_B with dropped rows zeroed, norms_B, keep_B, num_nonfinite) of per-example gradients.

  `updates` is a gradient pytree with a batch axis or `MaskedGrads`. keep_B is 1
  for a real example with a finite gradient; norms_B is 0 on padding rows and
  keeps a real example's non-finite norm (so `transforms`' denominator, kept +
  non-finite, counts it); num_nonfinite counts those examples (int32).
  """
  grads_B, real_B = (
    (updates.grads_B, updates.mask_B)
    if isinstance(updates, MaskedGrads)
    else (
      updates,
      None,
    )
  )
  transforms._check_per_example(grads_B, params)
  keep_B = grads_lib.finite_mask(grads_B)
  norms_B = grads_lib.per_example_norms(grads_B)
  if real_B is not None:
    real_B = jnp.asarray(real_B, jnp.float32)
    keep_B = keep_B * real_B
    norms_B = jnp.where(real_B > 0, norms_B, 0.0)
  num_nonfinite = jnp.sum(~jnp.isfinite(norms_B)).astype(jnp.int32)
  return grads_lib.scale_per_example(grads_B, keep_B), norms_B, keep_B, num_nonfinite


def dots(grads_B: Params, reference: Params) -> jax.Array:
  """<g_i, reference> for each example, `[B]`."""
  return sum(
    jnp.einsum("bk,k->b", g.reshape(g.shape[0], -1), r.reshape(-1).astype(g.dtype))
    for g, r in zip(jax.tree.leaves(grads_B), jax.tree.leaves(reference), strict=True)
  )


def sq_norm(tree: Params) -> jax.Array:
  """||tree||^2 over all leaves, `[]`."""
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))
