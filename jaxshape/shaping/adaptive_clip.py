"""Quantile-adaptive clipping: the clip norm tracks a target quantile of the norms (§7).

A user does not tune C per model: C follows the gamma-quantile of the batch's
per-example gradient norms by a geometric update. The non-private form (the
fraction below C is not noised): a shaping defense, no epsilon is claimed.

Shapes: B batch; `*_B` one value per example.

References:
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021, §2, Algorithm 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape import grads as grads_lib
from jaxshape import transforms
from jaxshape._typing import ArrayLike
from jaxshape.shaping import _inputs


class QuantileClipState(NamedTuple):
  """State of `quantile_clip`."""

  l2_norm_clip: jax.Array  # [] float32: C for the next batch
  frac_below: jax.Array  # [] float32: fraction of kept examples with norm <= C, last batch
  mean_norm: jax.Array  # [] float32: mean per-example norm, last batch
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def quantile_clip(
  target_quantile: ArrayLike, initial_clip: ArrayLike = 1.0, adapt_rate: ArrayLike = 0.2
) -> optax.GradientTransformation:
  """Per-example clipping whose norm C tracks a target quantile of the gradient norms.

  Each batch is clipped at the current C_t (as `clip_per_example`); then, with
  b_t the fraction of kept examples whose norm is at most C_t,

    C_{t+1} = C_t exp(-eta (b_t - gamma)),

  the geometric update that converges to the gamma-quantile of the norms. This
  is the non-private form (b_t is not noised), a shaping defense: no epsilon
  is claimed for the data-dependent C.

  Args:
    target_quantile: gamma in [0, 1] (may be traced).
    initial_clip: C_0 in (0, inf) (may be traced).
    adapt_rate: eta in (0, inf) (may be traced; Andrew et al. use 0.2).

  Returns:
    An `optax.GradientTransformation` mapping per-example gradients (or
    `MaskedGrads`, or a `ClippedSum` already clipped at the state's C, the
    fast path) to a `ClippedSum`; its state is `QuantileClipState`.

  References:
    Andrew et al. 2021, §2, Algorithm 1 (geometric update, eta = 0.2).
  """
  _validate.check_range("target_quantile", target_quantile, 0.0, 1.0)
  _validate.check_range("initial_clip", initial_clip, 0.0, np.inf, lo_open=True, hi_open=True)
  _validate.check_range("adapt_rate", adapt_rate, 0.0, np.inf, lo_open=True, hi_open=True)

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return QuantileClipState(
      jnp.asarray(initial_clip, jnp.float32), zero, zero, jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None):
    clip = state.l2_norm_clip
    if isinstance(updates, grads_lib.ClippedSum):
      clipped = transforms.as_clipped_sum(updates, params)
    else:
      grads_B, norms_B, keep_B, _ = _inputs.materialised(updates, params)
      clipped = grads_lib.clipped_sum_from_grads(grads_B, clip, keep_B)
      clipped = clipped._replace(norms_B=norms_B, mask_B=keep_B)
    keep_B = clipped.mask_B
    n = jnp.maximum(jnp.sum(keep_B), 1.0)
    safe_B = jnp.where(keep_B > 0, clipped.norms_B, 0.0)
    below = jnp.sum(jnp.where(safe_B <= clip, keep_B, 0.0)) / n
    rate = jnp.asarray(adapt_rate, jnp.float32)
    new_clip = clip * jnp.exp(-rate * (below - jnp.asarray(target_quantile, jnp.float32)))
    num_nonfinite = transforms._num_nonfinite(clipped)
    new_state = QuantileClipState(
      new_clip, below, jnp.sum(safe_B * keep_B) / n, state.num_nonfinite + num_nonfinite
    )
    return clipped, new_state

  return optax.GradientTransformation(init_fn, update_fn)
