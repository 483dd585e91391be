"""Gradient-shaping optax transforms: per-example clipping, Gaussian and adaptive noise.

Shapes: B batch; `grads_B` is a pytree like the parameters with a leading
batch axis.

Clipping maps per-example gradients to per-example gradients; a noise
transform aggregates them into one update, (sum_i g_i + N(0, std^2 I)) / B,
the TensorFlow-Privacy convention the paper used. Noise transforms also accept
a `jaxshape.grads.ClippedSum` (what the fast exact paths produce), and
`clip_per_example` passes one through, so the same chain serves both paths.

Every numeric hyperparameter may be a traced array: the transforms work under
`jit`, under `vmap` over a grid of values, and under `optax.inject_hyperparams`.
A non-finite per-example gradient is dropped (never reaches the update) and
counted in the state.

References:
  Hong et al. 2020, §5.1 (gradient shaping), §5.3 and Appendix B (DP-SGD,
  Algorithm 1), §7.2 (noise scaled to the previous epoch's gradient norms).
  Abadi et al. 2016, "Deep Learning with Differential Privacy".
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
from jaxshape._typing import Params


def _raw_key(key: jax.Array) -> jax.Array:
  """The key as raw uint32 data, so it can live in state and in inject_hyperparams."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def _step_key(key: jax.Array, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(_raw_key(key)), step)


# ------------------------------------------------------------------ clipping


class ClipPerExampleState(NamedTuple):
  """State of `clip_per_example`: the last batch's norm statistics."""

  mean_norm: jax.Array  # [] float32: mean per-example norm (before clipping), last batch
  max_norm: jax.Array  # [] float32: max per-example norm, last batch
  frac_clipped: jax.Array  # [] float32: fraction of examples with norm > C, last batch
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def clip_per_example(l2_norm_clip: ArrayLike) -> optax.GradientTransformation:
  """Rescales each example's gradient by min(1, C / ||g_i||) on its global l2 norm.

  Per-example gradients in (a pytree with a leading batch axis B), per-example
  gradients out. A non-finite example gradient becomes zero and is counted.
  A `ClippedSum` (already clipped by a fast path) passes through unchanged;
  its norms feed the statistics.

  Args:
    l2_norm_clip: C > 0 (may be a traced array).

  Returns:
    An `optax.GradientTransformation` whose state is `ClipPerExampleState`.

  Example:
    >>> tx = optax.chain(clip_per_example(1.0), add_gaussian_noise(1.0, 1.0, key))
    >>> updates, state = tx.update(per_example_grads(loss_fn, params, batch), state)

  References:
    Hong et al. 2020, §5.1 and Appendix B (Algorithm 1, line "clip gradient").
  """
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, np.inf, lo_open=True)

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return ClipPerExampleState(zero, zero, zero, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    if isinstance(updates, grads_lib.ClippedSum):
      keep_B = updates.mask_B
      nonfinite = jnp.sum(~jnp.isfinite(updates.norms_B))
      stats = grads_lib.norm_statistics(updates.norms_B, keep_B, l2_norm_clip)
      return updates, ClipPerExampleState(*stats, state.num_nonfinite + nonfinite.astype(jnp.int32))
    norms_B = grads_lib.per_example_norms(updates)
    finite_B = grads_lib.finite_mask(updates)
    factors_B = grads_lib.clip_factors(norms_B, l2_norm_clip)
    clipped_B = grads_lib.scale_per_example(updates, factors_B)
    stats = grads_lib.norm_statistics(norms_B, finite_B, l2_norm_clip)
    nonfinite = jnp.sum(1.0 - finite_B).astype(jnp.int32)
    return clipped_B, ClipPerExampleState(*stats, state.num_nonfinite + nonfinite)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ noise


def _aggregate(updates) -> tuple[Params, jax.Array, jax.Array, jax.Array]:
  """(sum over kept examples, keep mask [B], number non-finite, per-example norms [B]).

  Norms of dropped examples are 0 in the result.
  """
  if isinstance(updates, grads_lib.ClippedSum):
    nonfinite = jnp.sum(~jnp.isfinite(updates.norms_B)).astype(jnp.int32)
    keep_B = updates.mask_B
    return updates.sum, keep_B, nonfinite, jnp.where(keep_B > 0, updates.norms_B, 0.0)
  keep_B = grads_lib.finite_mask(updates)
  norms_B = grads_lib.per_example_norms(updates)
  kept_B = grads_lib.scale_per_example(updates, keep_B)
  total = jax.tree.map(lambda g: jnp.sum(g, axis=0), kept_B)
  nonfinite = jnp.sum(1.0 - keep_B).astype(jnp.int32)
  return total, keep_B, nonfinite, jnp.where(keep_B > 0, norms_B, 0.0)


def _batch_size(updates) -> jax.Array:
  """Denominator of the update: the real examples of the batch (non-finite ones included)."""
  if isinstance(updates, grads_lib.ClippedSum):
    real = jnp.sum(updates.mask_B) + jnp.sum(~jnp.isfinite(updates.norms_B))
    return jnp.maximum(real, 1.0)
  leaf = jax.tree.leaves(updates)[0]
  return jnp.asarray(leaf.shape[0], jnp.float32)


def _noise_std(noise_multiplier: ArrayLike, scale: ArrayLike) -> jax.Array:
  """sigma x scale, and exactly 0 when sigma = 0 whatever the scale (inf included).

  With C = inf (no clipping) and sigma = 0, sigma * C would be NaN; `jnp.where`
  keeps both traceable (no Python branch), so grids may mix such rows.
  """
  sigma = jnp.asarray(noise_multiplier, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  return jnp.where(sigma == 0, jnp.zeros_like(sigma * scale), sigma * scale)


def _add_noise(total, std, key):
  leaves, treedef = jax.tree.flatten(total)
  keys = jax.random.split(key, len(leaves))
  noisy = [
    g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
    for g, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, noisy)


class AddGaussianNoiseState(NamedTuple):
  """State of `add_gaussian_noise`."""

  count: jax.Array  # [] int32: updates so far (folded into the key)
  key: jax.Array  # [2] uint32: base key data
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def add_gaussian_noise(
  noise_multiplier: ArrayLike, l2_norm_clip: ArrayLike, key: jax.Array
) -> optax.GradientTransformation:
  """Sums per-example gradients, adds N(0, (sigma C)^2 I), divides by B.

  The Gaussian mechanism of DP-SGD in TensorFlow-Privacy's convention: the
  noise std on the *sum* is `noise_multiplier * l2_norm_clip`. Feed it
  clipped gradients (`clip_per_example` first) for a DP guarantee. The noise of
  step t is drawn with `jax.random.fold_in(key, t)`: same key, same bits.

  Args:
    noise_multiplier: sigma >= 0 (may be traced); 0 adds no noise at all, even
      with C = inf (where sigma * C would be NaN).
    l2_norm_clip: C > 0 (may be traced; inf: no clipping).
    key: a PRNG key (required).

  Returns:
    An `optax.GradientTransformation` mapping per-example gradients (or a
    `ClippedSum`) to one aggregated update shaped like the parameters.

  References:
    Hong et al. 2020, Appendix B (Algorithm 1, "add noise"); Abadi et al. 2016.
  """
  _validate.check_range("noise_multiplier", noise_multiplier, 0.0, np.inf)
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, np.inf, lo_open=True)
  _validate.check_key(key)

  def init_fn(params):
    del params
    return AddGaussianNoiseState(
      jnp.zeros([], jnp.int32), _raw_key(jnp.asarray(key)), jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None):
    del params
    total, _, nonfinite, _ = _aggregate(updates)
    denom = _batch_size(updates)
    std = _noise_std(noise_multiplier, l2_norm_clip)
    noisy = _add_noise(total, std, _step_key(state.key, state.count))
    out = jax.tree.map(lambda g: g / denom.astype(g.dtype), noisy)
    return out, AddGaussianNoiseState(state.count + 1, state.key, state.num_nonfinite + nonfinite)

  return optax.GradientTransformation(init_fn, update_fn)


class AddAdaptiveNoiseState(NamedTuple):
  """State of `add_adaptive_noise`."""

  count: jax.Array  # [] int32: updates so far; epoch = count // steps_per_epoch
  key: jax.Array  # [2] uint32: base key data
  epoch_norm_sum: jax.Array  # [] float32: sum of per-example norms in the current epoch
  epoch_norm_count: jax.Array  # [] float32: examples seen in the current epoch
  prev_epoch_mean_norm: jax.Array  # [] float32: mean norm over the previous epoch
  noise_std: jax.Array  # [] float32: std of the noise added to the last sum
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def add_adaptive_noise(
  noise_multiplier: ArrayLike, steps_per_epoch: ArrayLike, key: jax.Array
) -> optax.GradientTransformation:
  """Gaussian noise scaled to the gradients' own size: std = sigma x (mean norm).

  The mechanism the paper proposes in §7.2 and never built. The std of the
  noise on the sum is `noise_multiplier` times the mean per-example gradient
  norm this transform received over the previous epoch; during the first
  epoch, the mean over the batches seen so far, the current one included.
  Epoch boundaries come from the step count and `steps_per_epoch`. Chained
  after `clip_per_example`, the norms it sees are the clipped ones.

  This is a gradient-shaping defense, not a DP mechanism: the scale depends on
  the data, so no epsilon is claimed for it.

  Args:
    noise_multiplier: sigma >= 0 (may be traced).
    steps_per_epoch: updates per epoch, >= 1 (may be traced).
    key: a PRNG key (required).

  References:
    Hong et al. 2020, §7.2 ("noise proportional to the gradient magnitude").
  """
  _validate.check_range("noise_multiplier", noise_multiplier, 0.0, np.inf)
  _validate.check_range("steps_per_epoch", steps_per_epoch, 1.0, np.inf)
  _validate.check_key(key)

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return AddAdaptiveNoiseState(
      jnp.zeros([], jnp.int32),
      _raw_key(jnp.asarray(key)),
      zero,
      zero,
      zero,
      zero,
      jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    total, keep_B, nonfinite, norms_B = _aggregate(updates)
    if isinstance(updates, grads_lib.ClippedSum):
      # The norms it receives are those of the clipped gradients.
      norms_B = jnp.minimum(norms_B, updates.l2_norm_clip)
    spe = jnp.asarray(steps_per_epoch, jnp.int32)
    new_epoch = (state.count > 0) & (state.count % spe == 0)
    epoch_mean = state.epoch_norm_sum / jnp.maximum(state.epoch_norm_count, 1.0)
    prev_mean = jnp.where(new_epoch, epoch_mean, state.prev_epoch_mean_norm)
    norm_sum = jnp.where(new_epoch, 0.0, state.epoch_norm_sum) + jnp.sum(norms_B * keep_B)
    norm_count = jnp.where(new_epoch, 0.0, state.epoch_norm_count) + jnp.sum(keep_B)
    in_first_epoch = state.count < spe
    scale = jnp.where(in_first_epoch, norm_sum / jnp.maximum(norm_count, 1.0), prev_mean)
    std = _noise_std(noise_multiplier, scale)
    noisy = _add_noise(total, std, _step_key(state.key, state.count))
    denom = _batch_size(updates)
    out = jax.tree.map(lambda g: g / denom.astype(g.dtype), noisy)
    new_state = AddAdaptiveNoiseState(
      state.count + 1,
      state.key,
      norm_sum,
      norm_count,
      prev_mean,
      std,
      state.num_nonfinite + nonfinite,
    )
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ chains


def dp_sgd(
  learning_rate: ArrayLike,
  l2_norm_clip: ArrayLike,
  noise_multiplier: ArrayLike,
  key: jax.Array,
  momentum: ArrayLike | None = None,
) -> optax.GradientTransformation:
  """DP-SGD: clip each example to C, sum, add N(0, (sigma C)^2), divide by B, SGD.

  Its `update` takes per-example gradients (or a `ClippedSum`).

  Example:
    >>> tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, key=jax.random.key(0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example_grads(loss_fn, params, batch), state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Hong et al. 2020, Appendix B (Algorithm 1); Abadi et al. 2016.
  """
  _validate.check_range("learning_rate", learning_rate, 0.0, np.inf)
  return optax.chain(
    clip_per_example(l2_norm_clip),
    add_gaussian_noise(noise_multiplier, l2_norm_clip, key),
    optax.sgd(learning_rate, momentum=momentum),
  )


def dp_adam(
  learning_rate: ArrayLike,
  l2_norm_clip: ArrayLike,
  noise_multiplier: ArrayLike,
  key: jax.Array,
) -> optax.GradientTransformation:
  """DP-Adam: the DP-SGD aggregation followed by Adam (the paper's LR optimizer, §6.2).

  Its `update` takes per-example gradients (or a `ClippedSum`).

  References:
    Hong et al. 2020, §6.1-6.2 (LR trained with DP-Adam), Appendix B.
  """
  _validate.check_range("learning_rate", learning_rate, 0.0, np.inf)
  return optax.chain(
    clip_per_example(l2_norm_clip),
    add_gaussian_noise(noise_multiplier, l2_norm_clip, key),
    optax.adam(learning_rate),
  )
