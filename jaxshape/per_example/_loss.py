"""Loss objects the engine understands: a Flax model plus a per-example loss.

Shapes: B batch.

A loss object is a hashable, callable value `loss(params, batch) -> []` (the
mean over the real examples of the batch, as `jax.grad` differentiates it)
that also exposes `loss.per_example(params, batch) -> [B]`, each example's
loss alone. The engine of `jaxshape.per_example` differentiates the weighted
sum of `per_example` once and reads every layer's per-example quantities from
that one backward pass; `__call__` fixes what "the gradient of example i"
means, exactly as `jaxshape.grads.per_example_grads` defines it: the gradient
of `loss(params, batch[i:i+1])`.

References:
  Hong et al. 2020, Appendix B (DP-SGD, Algorithm 1: per-example gradients
  of the training loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxshape._typing import Batch
from jaxshape._typing import Params


@dataclasses.dataclass(frozen=True)
class PerExampleLoss:
  """Mean of a per-example loss of a Flax linen model: `loss(params, batch)`.

  `per_example(params, batch)` applies `model` to `batch[input_key]` and maps
  its outputs and the batch to one loss per example with `fn(outputs, batch)
  -> [B]`. Calling the object gives the mean over real examples: `batch` may
  hold `mask` (1.0 real, 0.0 padding; the mean is over real examples) and
  `weight` (per-example loss weights). Example i's loss must depend on
  example i only (no BatchNorm in training mode; the engine rejects it).

  It is hashable (a static argument of `jit`) when `model` and `fn` are, so
  define `fn` at module level rather than as a lambda built in a loop.

  Example:
    >>> def squared_error(pred_B1, batch):
    ...   return jnp.square(pred_B1[:, 0] - batch["y"])
    >>> loss_fn = PerExampleLoss(MyRegressor(), squared_error)
    >>> cs = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, l2_norm_clip=1.0)
  """

  model: nn.Module
  fn: Callable[[Any, Batch], jax.Array]
  input_key: str = "x"

  def per_example(self, params: Params, batch: Batch) -> jax.Array:
    """Loss of each example, `[B]`, before masking and weighting."""
    outputs = self.model.apply({"params": params}, batch[self.input_key])
    return self.fn(outputs, batch)

  def __call__(self, params: Params, batch: Batch) -> jax.Array:
    loss_B = self.per_example(params, batch)
    weight_B = jnp.ones_like(loss_B)
    if "weight" in batch:
      weight_B = weight_B * batch["weight"]
    if "mask" in batch:
      weight_B = weight_B * batch["mask"]
      count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    else:
      count = loss_B.shape[0]
    return jnp.sum(weight_B * loss_B) / count


def batch_size(batch: Batch) -> int:
  """B, the leading axis shared by the batch's arrays."""
  return jax.tree.leaves(batch)[0].shape[0]


def per_example_weights(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(loss scale of example i alone `[B]`, keep weight `[B]`), as the vmap path defines them.

  `jax.grad(loss)` on the batch of example i alone is
  weight_i mask_i / max(mask_i, 1) times the gradient of its loss; the vmap
  path then keeps example i with weight mask_i.
  """
  size = batch_size(batch)
  scale_B = jnp.ones((size,), jnp.float32)
  keep_B = jnp.ones((size,), jnp.float32)
  if "weight" in batch:
    scale_B = scale_B * batch["weight"]
  if "mask" in batch:
    mask_B = jnp.asarray(batch["mask"], jnp.float32)
    scale_B = scale_B * mask_B / jnp.maximum(mask_B, 1.0)
    keep_B = keep_B * mask_B
  return scale_B, keep_B


def mean_weights(batch: Batch) -> jax.Array:
  """Weights of the per-example losses in the mean loss `loss(params, batch)`, `[B]`."""
  size = batch_size(batch)
  scale_B = jnp.ones((size,), jnp.float32)
  if "weight" in batch:
    scale_B = scale_B * batch["weight"]
  count = size
  if "mask" in batch:
    scale_B = scale_B * batch["mask"]
    count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
  return scale_B / count
