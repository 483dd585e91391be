"""Gradient-shaping optax transforms: per-example clipping, Gaussian and adaptive noise.

Shapes: B batch; `grads_B` is a pytree like the parameters with a leading
batch axis.

Every transform takes its input through one conversion, `as_clipped_sum`:
a `jaxshape.grads.ClippedSum` (the clipped sum, each example's norm and the
mask of examples kept; what `clipped_sum_and_norms` produces) passes as is,
per-example gradients (checked against the parameters' shapes) are clipped
and summed. `clip_per_example` clips (per-example gradients in, `ClippedSum`
out); a noise transform turns the sum into one update,
(sum_i clip(g_i) + N(0, std^2 I)) / B, the TensorFlow-Privacy convention the
paper used. So the same chain serves materialised gradients and the fast path.

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


# ------------------------------------------------------------------ the one way in

_NO_PARAMS = (
  "needs params: call tx.update(grads, state, params), so the gradients can be checked "
  "against the parameters' shapes (per-example gradients are (B,) + each parameter's shape)"
)


def _check_per_example(grads_B: Params, params: Params) -> None:
  """Raises ValueError unless every leaf of `grads_B` is (B,) + its parameter's shape, B >= 1.

  Shapes are static, so this runs under `jit` and `vmap` too.
  """
  if params is None:
    raise ValueError(f"a jaxshape transform {_NO_PARAMS}")
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(grads_B)
  if not paths_leaves:
    raise ValueError("per-example gradients have no leaves")
  param_leaves, param_treedef = jax.tree.flatten(params)
  if treedef != param_treedef:
    raise ValueError(
      f"per-example gradients must have the structure of params: got {treedef}, "
      f"params have {param_treedef}"
    )
  sizes = {}
  for (path, g), p in zip(paths_leaves, param_leaves, strict=True):
    name = jax.tree_util.keystr(path) or "the gradient"
    if np.ndim(g) != np.ndim(p) + 1 or tuple(np.shape(g)[1:]) != tuple(np.shape(p)):
      raise ValueError(
        f"per-example gradients must have shape (B,) + the parameter's shape: {name} has "
        f"shape {np.shape(g)} for a parameter of shape {np.shape(p)} (an already aggregated "
        "gradient has no batch axis: pass per-example gradients or a ClippedSum)"
      )
    sizes.setdefault(np.shape(g)[0], name)
  if len(sizes) > 1:
    found = ", ".join(f"{b} ({name})" for b, name in sizes.items())
    raise ValueError(f"per-example gradients must share one batch axis B; leading sizes: {found}")
  if 0 in sizes:
    raise ValueError("the batch is empty (B = 0): per-example gradients need B >= 1 examples")


def _check_clipped_sum(clipped: grads_lib.ClippedSum, params: Params) -> None:
  """Raises ValueError unless `clipped.sum` is shaped like `params` and the batch is not empty."""
  if params is None:
    raise ValueError(f"a jaxshape transform {_NO_PARAMS}")
  got, want = jax.tree.map(np.shape, clipped.sum), jax.tree.map(np.shape, params)
  same_tree = jax.tree.structure(clipped.sum) == jax.tree.structure(params)
  if not same_tree or got != want:
    raise ValueError(
      "ClippedSum.sum must be shaped like params (one summed gradient, no batch axis): "
      f"got {got}, params have {want}"
    )
  if np.ndim(clipped.norms_B) != 1 or np.shape(clipped.mask_B) != np.shape(clipped.norms_B):
    raise ValueError(
      f"ClippedSum.norms_B and mask_B must both be [B], got {np.shape(clipped.norms_B)} and "
      f"{np.shape(clipped.mask_B)}"
    )
  if np.shape(clipped.norms_B)[0] == 0:
    raise ValueError("the batch is empty (B = 0): a ClippedSum needs B >= 1 examples")


def as_clipped_sum(
  updates: Params | grads_lib.ClippedSum, params: Params, l2_norm_clip: ArrayLike = np.inf
) -> grads_lib.ClippedSum:
  """The one conversion every transform applies to its input: a checked `ClippedSum`.

  A `ClippedSum` (already clipped, e.g. by `clipped_sum_and_norms`) is checked
  against `params` and returned as is. Per-example gradients (each leaf
  `(B,) + param.shape`) are checked, clipped to `l2_norm_clip` (inf: summed
  unclipped) and summed by `grads.clipped_sum_from_grads`; a non-finite
  example is dropped.

  Raises:
    ValueError: `params` is None; a leaf lacks the batch axis (an aggregated
      gradient) or leaves disagree on B; the batch is empty.
  """
  if isinstance(updates, grads_lib.ClippedSum):
    _check_clipped_sum(updates, params)
    return updates
  _check_per_example(updates, params)
  return grads_lib.clipped_sum_from_grads(updates, l2_norm_clip)


class ClipStatistics(NamedTuple):
  """Norm statistics of one batch, from its `ClippedSum` (examples kept by its mask)."""

  mean_norm: jax.Array  # [] float32: mean per-example norm before clipping
  max_norm: jax.Array  # [] float32: max per-example norm before clipping
  frac_clipped: jax.Array  # [] float32: fraction of kept examples with norm > C
  num_nonfinite: jax.Array  # [] int32: examples dropped for a non-finite gradient


def clip_statistics(clipped: grads_lib.ClippedSum) -> ClipStatistics:
  """The batch's `ClipStatistics`, the one place they are computed (transforms and `train`)."""
  mean, max_norm, frac = grads_lib.norm_statistics(
    clipped.norms_B, clipped.mask_B, clipped.l2_norm_clip
  )
  return ClipStatistics(mean, max_norm, frac, _num_nonfinite(clipped))


def _num_nonfinite(clipped: grads_lib.ClippedSum) -> jax.Array:
  return jnp.sum(~jnp.isfinite(clipped.norms_B)).astype(jnp.int32)


def _num_examples(clipped: grads_lib.ClippedSum) -> jax.Array:
  """Denominator of the update: the batch's real examples, dropped non-finite ones included."""
  return jnp.maximum(jnp.sum(clipped.mask_B) + _num_nonfinite(clipped), 1.0)


# ------------------------------------------------------------------ clipping


class ClipPerExampleState(NamedTuple):
  """State of `clip_per_example`: the last batch's norm statistics."""

  mean_norm: jax.Array  # [] float32: mean per-example norm (before clipping), last batch
  max_norm: jax.Array  # [] float32: max per-example norm, last batch
  frac_clipped: jax.Array  # [] float32: fraction of examples with norm > C, last batch
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def clip_per_example(l2_norm_clip: ArrayLike) -> optax.GradientTransformation:
  """Clips each example's gradient to l2 norm C, sums: per-example gradients in, `ClippedSum` out.

  Example i is scaled by min(1, C / ||g_i||); the output is their sum with
  each example's norm before clipping and the mask of examples kept (a
  non-finite example gradient is dropped and counted), which the noise
  transforms turn into one update. A `ClippedSum` in (already clipped by
  `clipped_sum_and_norms`) passes through unchanged; its norms feed the
  statistics.

  Args:
    l2_norm_clip: C in (0, inf] (may be a traced array; inf: no clipping).

  Returns:
    An `optax.GradientTransformation` whose state is `ClipPerExampleState`.
    Its `update` needs `params` (to check the batch axis).

  Example:
    >>> tx = optax.chain(clip_per_example(1.0), add_gaussian_noise(1.0, 1.0, key))
    >>> updates, state = tx.update(per_example_grads(loss_fn, params, batch), state, params)

  References:
    Hong et al. 2020, §5.1 and Appendix B (Algorithm 1, line "clip gradient").
  """
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, np.inf, lo_open=True)

  def init_fn(params):
    del params
    zero = jnp.zeros([], jnp.float32)
    return ClipPerExampleState(zero, zero, zero, jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    clipped = as_clipped_sum(updates, params, l2_norm_clip)
    stats = clip_statistics(clipped)
    num_nonfinite = state.num_nonfinite + stats.num_nonfinite
    return clipped, ClipPerExampleState(*stats[:3], num_nonfinite)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ noise


def _check_noise(noise_multiplier: ArrayLike, l2_norm_clip: ArrayLike | None = None) -> None:
  """sigma in [0, inf); with C given, C in (0, inf] and no C = inf where sigma > 0."""
  _validate.check_range("noise_multiplier", noise_multiplier, 0.0, np.inf, hi_open=True)
  if l2_norm_clip is None:
    return
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, np.inf, lo_open=True)
  if _validate.is_traced(noise_multiplier) or _validate.is_traced(l2_norm_clip):
    return
  if np.any(np.isinf(np.asarray(l2_norm_clip)) & (np.asarray(noise_multiplier) > 0)):
    raise ValueError(
      "l2_norm_clip = inf with noise_multiplier > 0 asks for infinite noise (std sigma x C): "
      "give a finite l2_norm_clip, or noise_multiplier = 0 for no noise"
    )


def _noise_std(noise_multiplier: ArrayLike, scale: ArrayLike) -> jax.Array:
  """sigma x scale, and exactly 0 when sigma = 0 whatever the scale (inf included).

  With C = inf (no clipping) and sigma = 0, sigma * C would be NaN; `jnp.where`
  keeps both traceable (no Python branch), so grids may mix such rows.
  """
  sigma = jnp.asarray(noise_multiplier, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  return jnp.where(sigma == 0, jnp.zeros_like(sigma * scale), sigma * scale)


def _noisy_mean(clipped: grads_lib.ClippedSum, std: jax.Array, key: jax.Array) -> Params:
  """(sum + N(0, std^2 I)) / number of examples; no normal is drawn when std = 0.

  `lax.cond` skips the draw at run time for a clip-only step; under `vmap` over
  a grid of std it becomes a select (both sides computed, as without it).
  """

  def add_noise(total):
    leaves, treedef = jax.tree.flatten(total)
    keys = jax.random.split(key, len(leaves))
    noisy = [
      g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
      for g, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)

  noisy = jax.lax.cond(std > 0, add_noise, lambda total: total, clipped.sum)
  denom = _num_examples(clipped)
  return jax.tree.map(lambda g: g / denom.astype(g.dtype), noisy)


class AddGaussianNoiseState(NamedTuple):
  """State of `add_gaussian_noise`."""

  count: jax.Array  # [] int32: updates so far (folded into the key)
  key: jax.Array  # [2] uint32: base key data
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def add_gaussian_noise(
  noise_multiplier: ArrayLike, l2_norm_clip: ArrayLike, key: jax.Array
) -> optax.GradientTransformation:
  """Adds N(0, (sigma C)^2 I) to the sum of per-example gradients, divides by B.

  The Gaussian mechanism of DP-SGD in TensorFlow-Privacy's convention: the
  noise std on the *sum* is `noise_multiplier * l2_norm_clip`. Feed it a
  `ClippedSum` (from `clip_per_example` or `clipped_sum_and_norms`) for a DP
  guarantee; raw per-example gradients are summed unclipped. B counts the
  batch's real examples (dropped non-finite ones included, padding not). The
  noise of step t is drawn with `jax.random.fold_in(key, t)`: same key, same
  bits.

  Args:
    noise_multiplier: sigma in [0, inf) (may be traced); 0 adds no noise at
      all, even with C = inf (where sigma * C would be NaN).
    l2_norm_clip: C in (0, inf] (may be traced); C = inf only with sigma = 0.
    key: a PRNG key (required).

  Returns:
    An `optax.GradientTransformation` mapping a `ClippedSum` (or per-example
    gradients) to one update shaped like the parameters. Its `update` needs
    `params` (to check the batch axis).

  References:
    Hong et al. 2020, Appendix B (Algorithm 1, "add noise"); Abadi et al. 2016.
  """
  _check_noise(noise_multiplier, l2_norm_clip)
  _validate.check_key(key)

  def init_fn(params):
    del params
    return AddGaussianNoiseState(
      jnp.zeros([], jnp.int32), _raw_key(jnp.asarray(key)), jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None):
    clipped = as_clipped_sum(updates, params)
    std = _noise_std(noise_multiplier, l2_norm_clip)
    out = _noisy_mean(clipped, std, _step_key(state.key, state.count))
    num_nonfinite = state.num_nonfinite + _num_nonfinite(clipped)
    return out, AddGaussianNoiseState(state.count + 1, state.key, num_nonfinite)

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
  Epoch boundaries come from the step count and `steps_per_epoch`. Given a
  `ClippedSum` (after `clip_per_example`), the norms it averages are the
  clipped ones, min(||g_i||, C).

  This is a gradient-shaping defense, not a DP mechanism: the scale depends on
  the data, so no epsilon is claimed for it.

  Args:
    noise_multiplier: sigma in [0, inf) (may be traced).
    steps_per_epoch: updates per epoch, a whole number >= 1 (may be traced).
    key: a PRNG key (required).

  Returns:
    An `optax.GradientTransformation` like `add_gaussian_noise`'s.

  References:
    Hong et al. 2020, §7.2 ("noise proportional to the gradient magnitude").
  """
  _check_noise(noise_multiplier)
  _validate.check_count("steps_per_epoch", steps_per_epoch, 1)
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
    clipped = as_clipped_sum(updates, params)
    keep_B = clipped.mask_B
    # The norms it receives are those of the clipped gradients (C = inf: unclipped).
    norms_B = jnp.where(keep_B > 0, jnp.minimum(clipped.norms_B, clipped.l2_norm_clip), 0.0)
    spe = jnp.asarray(steps_per_epoch, jnp.int32)
    new_epoch = (state.count > 0) & (state.count % spe == 0)
    epoch_mean = state.epoch_norm_sum / jnp.maximum(state.epoch_norm_count, 1.0)
    prev_mean = jnp.where(new_epoch, epoch_mean, state.prev_epoch_mean_norm)
    norm_sum = jnp.where(new_epoch, 0.0, state.epoch_norm_sum) + jnp.sum(norms_B * keep_B)
    norm_count = jnp.where(new_epoch, 0.0, state.epoch_norm_count) + jnp.sum(keep_B)
    in_first_epoch = state.count < spe
    scale = jnp.where(in_first_epoch, norm_sum / jnp.maximum(norm_count, 1.0), prev_mean)
    std = _noise_std(noise_multiplier, scale)
    out = _noisy_mean(clipped, std, _step_key(state.key, state.count))
    new_state = AddAdaptiveNoiseState(
      state.count + 1,
      state.key,
      norm_sum,
      norm_count,
      prev_mean,
      std,
      state.num_nonfinite + _num_nonfinite(clipped),
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

  Its `update` takes per-example gradients (or a `ClippedSum`) and `params`.
  Arguments as in `clip_per_example` and `add_gaussian_noise`; learning_rate
  in [0, inf), momentum None or in [0, 1).

  Example:
    >>> tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, key=jax.random.key(0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example_grads(loss_fn, params, batch), state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Hong et al. 2020, Appendix B (Algorithm 1); Abadi et al. 2016.
  """
  _validate.check_range("learning_rate", learning_rate, 0.0, np.inf, hi_open=True)
  if momentum is not None:
    _validate.check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
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

  Its `update` takes per-example gradients (or a `ClippedSum`) and `params`;
  arguments as in `dp_sgd`.

  References:
    Hong et al. 2020, §6.1-6.2 (LR trained with DP-Adam), Appendix B.
  """
  _validate.check_range("learning_rate", learning_rate, 0.0, np.inf, hi_open=True)
  return optax.chain(
    clip_per_example(l2_norm_clip),
    add_gaussian_noise(noise_multiplier, l2_norm_clip, key),
    optax.adam(learning_rate),
  )
