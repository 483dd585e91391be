"""Robust aggregation across the batch: coordinate-wise trimmed mean and median (§7).

Baselines from the Byzantine-robust literature: each coordinate of the update
is an order statistic of the batch's per-example gradients, so an example can
move it only as far as the other examples' values allow. They need
materialised per-example gradients (sorting is not a reweighting).

Shapes: B batch; K a leaf's flattened size; `*_B` one value per example.

References:
  Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018, §3 (Definitions 1 and 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape import grads as grads_lib
from jaxshape._typing import ArrayLike
from jaxshape.shaping import _inputs


class RobustAggregateState(NamedTuple):
  """State of `trimmed_mean` and `coordinate_median`."""

  num_kept: jax.Array  # [] float32: examples entering the order statistics, last batch
  num_trimmed: jax.Array  # [] float32: examples trimmed from each end per coordinate, last batch
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def sorted_rows(x_BK: jax.Array) -> jax.Array:
  """`jnp.sort(x_BK, axis=0)` by a bitonic network of elementwise min / max over rows.

  Each of the log2(B') (log2(B') + 1) / 2 stages (B' the batch padded with +inf
  rows to a power of two) compares row i with row i xor j through a reshape,
  so every stage is one fused pass over the matrix. On the CPU, for the MLP's
  [64, 203,530] per-example gradients, 0.22 s of CPU against 1.35 s for XLA's
  sort along the batch axis (measured); the values are the same.

  References:
    Batcher, "Sorting networks and their applications", AFIPS 1968.
  """
  size = x_BK.shape[0]
  n = 1 << max(size - 1, 0).bit_length()
  x = jnp.pad(x_BK, ((0, n - size), (0, 0)), constant_values=jnp.inf) if n > size else x_BK
  k = 2
  while k <= n:  # merge sorted runs of k / 2 into bitonic ... sorted runs of k
    j = k // 2
    while j >= 1:  # compare rows i and i + j within blocks of 2 j
      pairs = x.reshape(n // (2 * j), 2, j, x.shape[1])
      lo, hi = jnp.minimum(pairs[:, 0], pairs[:, 1]), jnp.maximum(pairs[:, 0], pairs[:, 1])
      up = ((np.arange(n // (2 * j)) * 2 * j) & k) == 0  # ascending blocks (static)
      up = jnp.asarray(up)[:, None, None]
      x = jnp.stack([jnp.where(up, lo, hi), jnp.where(up, hi, lo)], axis=1).reshape(x.shape)
      j //= 2
    k *= 2
  return x[:size]


def _order_statistic_mean(updates, params, lo_fn, hi_fn):
  """Coordinate-wise mean of the sorted kept values with rank in [lo, hi), times n, and stats.

  Dropped and padding rows sort last (+inf); n is the number of kept examples;
  `lo_fn(n)`, `hi_fn(n)` give the rank window (traced). The sum returned is
  n_all x the robust mean, n_all = kept + non-finite (the noise transform's
  denominator), so (sum / n_all) is the robust mean.
  """
  grads_B, norms_B, keep_B, num_nonfinite = _inputs.materialised(updates, params)
  n = jnp.sum(keep_B)
  lo, hi = lo_fn(n), hi_fn(n)
  count = jnp.maximum(hi - lo, 1.0)
  rank_B = jnp.arange(keep_B.shape[0], dtype=jnp.float32)
  in_window_B = (rank_B >= lo) & (rank_B < hi) & (rank_B < n)
  n_all = n + num_nonfinite

  def robust(g):
    flat = g.reshape(g.shape[0], -1)
    sorted_BK = sorted_rows(jnp.where(keep_B[:, None] > 0, flat, jnp.inf))
    window_BK = jnp.where(in_window_B[:, None], sorted_BK, 0.0)
    mean_K = jnp.sum(window_BK, axis=0) / count
    return (mean_K * jnp.where(n > 0, n_all, 0.0)).reshape(g.shape[1:]).astype(g.dtype)

  total = jax.tree.map(robust, grads_B)
  out = grads_lib.ClippedSum(total, norms_B, keep_B, jnp.asarray(np.inf, jnp.float32))
  return out, n, lo, num_nonfinite


def trimmed_mean(trim_fraction: ArrayLike) -> optax.GradientTransformation:
  """Coordinate-wise trimmed mean of the per-example gradients.

  For every coordinate k, with the n kept examples' values sorted,
  g_(1),k <= ... <= g_(n),k, and m = floor(beta n) (at most (n - 1) / 2):

    trmean_k = 1 / (n - 2m) sum_{j=m+1}^{n-m} g_(j),k.

  Output: a `ClippedSum` whose sum is B x the trimmed mean, so the noise
  transform's division by B returns it. Needs materialised per-example
  gradients (sorting is not a reweighting).

  Args:
    trim_fraction: beta in [0, 0.5) (may be traced; 0 is the mean).

  References:
    Yin et al. 2018, §3, Definition 2 (coordinate-wise trimmed mean).
  """
  _validate.check_range("trim_fraction", trim_fraction, 0.0, 0.5, hi_open=True)

  def trim(n):
    return jnp.minimum(
      jnp.floor(jnp.asarray(trim_fraction, jnp.float32) * n), jnp.floor((n - 1) / 2)
    )

  return _robust_transform(
    lambda n: jnp.maximum(trim(n), 0.0), lambda n: n - jnp.maximum(trim(n), 0.0)
  )


def coordinate_median() -> optax.GradientTransformation:
  """Coordinate-wise median of the per-example gradients (mean of the two middle values).

    med_k = median{g_1,k, ..., g_n,k}.

  Output as `trimmed_mean`'s (B x the median).

  References:
    Yin et al. 2018, §3, Definition 1 (coordinate-wise median).
  """
  return _robust_transform(lambda n: jnp.floor((n - 1) / 2), lambda n: jnp.floor(n / 2) + 1)


def _robust_transform(lo_fn, hi_fn):
  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return RobustAggregateState(zero, zero, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    out, n, lo, num_nonfinite = _order_statistic_mean(updates, params, lo_fn, hi_fn)
    return out, RobustAggregateState(n, lo, state.num_nonfinite + num_nonfinite)

  return optax.GradientTransformation(init_fn, update_fn)
