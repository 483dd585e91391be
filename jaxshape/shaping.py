"""Gradient shaping beyond DP-SGD: mechanisms that bound orientation, not only magnitude.

Shapes: B batch; `grads_B` is a pytree like the parameters with a leading
batch axis; `*_B` one value per example.

The paper's §7 concludes that a defense must "bound gradient magnitudes and
minimize differences in orientation", and that DP-SGD's clipping does only the
first. These optax transforms shape the batch's per-example gradients and
aggregate them into the same `jaxshape.grads.ClippedSum` the clipping
transforms produce, so they chain with `add_gaussian_noise` (which divides by
the batch size B) and a base optimizer exactly like `clip_per_example`:

  centered_clip       clip each example's deviation from a reference
                      (Karimireddy, He, Jaggi 2021);
  cosine_gate         drop examples whose cosine with a reference is below a
                      threshold, clip the rest;
  trimmed_mean,       coordinate-wise trimmed mean / median of the batch
  coordinate_median   (Yin et al. 2018);
  quantile_clip       clip norm tracking a target quantile of the norms
                      (Andrew et al. 2021).

The reference of `centered_clip` and `cosine_gate` is a running average of
past aggregated updates (r <- beta r + (1 - beta) mean of the shaped batch),
kept in the state and zero at the first step. Both see each gradient only
through its norm and its dot product with r, so the per-example engine serves
them in one pass (`per_example.reweighted_sum`, given the weights from
`centered_clip_weights` / `cosine_gate_weights`); such a `ReweightedSum` is
taken as already shaped, like a `ClippedSum` by `clip_per_example`.

Inputs: per-example gradients (all examples real), `MaskedGrads` (with a mask
of real examples, e.g. a padded batch) or, for the fast path, a
`ReweightedSum` (`centered_clip`, `cosine_gate`) or a `ClippedSum` clipped at
the state's norm (`quantile_clip`). Numeric hyperparameters may be traced
(`jit`, `vmap` over a grid, `optax.inject_hyperparams`); a non-finite example
is dropped and counted.

References:
  Hong et al. 2020, §7 (the call for better gradient-shaping mechanisms).
  Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, §4 (centered clipping).
  Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018, §3 (trimmed mean, median).
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021, §2 (quantile-based clip norm).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape import grads as grads_lib
from jaxshape import per_example
from jaxshape import transforms
from jaxshape._typing import ArrayLike
from jaxshape._typing import Params


class MaskedGrads(NamedTuple):
  """Per-example gradients with the mask of real examples (padding rows 0)."""

  grads_B: Params  # like params with a leading axis B
  mask_B: jax.Array  # [B] float32: 1 for real examples


def _materialised(updates, params) -> tuple[Params, jax.Array, jax.Array]:
  """(grads_B with dropped rows zeroed, norms_B, keep_B) from per-example gradients."""
  grads_B, mask_B = (
    (updates.grads_B, updates.mask_B)
    if isinstance(updates, MaskedGrads)
    else (
      updates,
      None,
    )
  )
  transforms._check_per_example(grads_B, params)
  keep_B = grads_lib.finite_mask(grads_B)
  if mask_B is not None:
    keep_B = keep_B * jnp.asarray(mask_B, jnp.float32)
  return grads_lib.scale_per_example(grads_B, keep_B), grads_lib.per_example_norms(grads_B), keep_B


def _dots(grads_B: Params, reference: Params) -> jax.Array:
  """<g_i, reference> for each example, `[B]`."""
  return sum(
    jnp.einsum("bk,k->b", g.reshape(g.shape[0], -1), r.reshape(-1).astype(g.dtype))
    for g, r in zip(jax.tree.leaves(grads_B), jax.tree.leaves(reference), strict=True)
  )


def _sq_norm(tree: Params) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _nonfinite(norms_B, keep_B):
  """Examples dropped for a non-finite gradient (norms of padding rows already set to 0)."""
  del keep_B
  return jnp.sum(~jnp.isfinite(norms_B)).astype(jnp.int32)


def _real(updates) -> jax.Array | None:
  return updates.mask_B if isinstance(updates, MaskedGrads) else None


def _as_clipped(total, norms_B, keep_B, real_B, clip) -> grads_lib.ClippedSum:
  """A `ClippedSum`; a real example's non-finite norm stays, so the noise transform's
  denominator (kept + non-finite) counts it; padding rows get norm 0."""
  if real_B is not None:
    norms_B = jnp.where(real_B > 0, norms_B, 0.0)
  return grads_lib.ClippedSum(total, norms_B, keep_B, jnp.asarray(clip, jnp.float32))


# ------------------------------------------------------------------ reference-based


def centered_clip_weights(norms_B, dots_B, reference_sq_norm, radius) -> jax.Array:
  """s_i = min(1, tau / ||g_i - r||), from ||g_i||, <g_i, r> and ||r||^2, `[B]`.

  ||g_i - r||^2 = ||g_i||^2 - 2 <g_i, r> + ||r||^2 (clamped at 0).
  """
  dev_sq_B = jnp.maximum(jnp.square(norms_B) - 2.0 * dots_B + reference_sq_norm, 0.0)
  return grads_lib.clip_factors(jnp.sqrt(dev_sq_B), radius)


def cosine_gate_weights(norms_B, dots_B, reference_norm, threshold, l2_norm_clip) -> jax.Array:
  """w_i = 1[cos(g_i, r) >= kappa] min(1, C / ||g_i||), `[B]`; every example passes if r = 0."""
  denom_B = norms_B * reference_norm
  cos_B = jnp.where(denom_B > 0, dots_B / jnp.where(denom_B > 0, denom_B, 1.0), 1.0)
  passes_B = (cos_B >= threshold) | (reference_norm == 0)
  return passes_B.astype(jnp.float32) * grads_lib.clip_factors(norms_B, l2_norm_clip)


class ReferenceShapingState(NamedTuple):
  """State of `centered_clip` and `cosine_gate`."""

  reference: Params  # like params: running average of past aggregated updates
  count: jax.Array  # [] int32: updates so far
  mean_weight: jax.Array  # [] float32: mean weight s_i / w_i of kept examples, last batch
  frac_shaped: jax.Array  # [] float32: fraction of kept examples with weight < 1, last batch
  mean_cosine: jax.Array  # [] float32: mean cosine with the reference, last batch (0 if r = 0)
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def _reference_transform(weights_fn, offset: bool, clip, reference_decay):
  """The shared body: weights from (norm, dot), sum_i w_i g_i (+ (n - sum w) r), new r."""

  def init_fn(params):
    zero = jnp.zeros([], jnp.float32)
    ref = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return ReferenceShapingState(
      ref, jnp.zeros([], jnp.int32), zero, zero, zero, jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None):
    ref = state.reference
    ref_sq = _sq_norm(ref)
    fn = lambda n_B, d_B: weights_fn(n_B, d_B, ref_sq)
    if isinstance(updates, per_example.ReweightedSum):
      transforms._check_clipped_sum(
        grads_lib.ClippedSum(updates.sum, updates.norms_B, updates.mask_B, 0.0), params
      )
      total, norms_B, dots_B, keep_B, w_B = updates
      num_nonfinite = jnp.sum(~jnp.isfinite(norms_B)).astype(jnp.int32)
    else:
      grads_B, norms_B, keep_B = _materialised(updates, params)
      if _real(updates) is not None:
        norms_B = jnp.where(_real(updates) > 0, norms_B, 0.0)
      num_nonfinite = _nonfinite(norms_B, keep_B)
      dots_B = _dots(grads_B, ref)
      ok_B = keep_B > 0
      w_B = jnp.where(ok_B, fn(jnp.where(ok_B, norms_B, 0.0), jnp.where(ok_B, dots_B, 0.0)), 0.0)
      w_B = w_B * keep_B
      total = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads_lib.scale_per_example(grads_B, w_B))
    kept = jnp.sum(keep_B)
    if offset:  # centered clipping: each kept example contributes r + s_i (g_i - r)
      extra = kept - jnp.sum(w_B)
      total = jax.tree.map(lambda t, r: t + (extra * r).astype(t.dtype), total, ref)
    out = _as_clipped(total, norms_B, keep_B, None, clip)
    denom = jnp.maximum(kept + num_nonfinite, 1.0)
    beta = jnp.asarray(reference_decay, jnp.float32)
    new_ref = jax.tree.map(lambda r, t: beta * r + (1.0 - beta) * t / denom, ref, total)
    n = jnp.maximum(kept, 1.0)
    safe_w = jnp.where(keep_B > 0, w_B / jnp.where(keep_B > 0, keep_B, 1.0), 0.0)
    denom_B = jnp.where(keep_B > 0, norms_B, 0.0) * jnp.sqrt(ref_sq)
    cos_B = jnp.where(
      denom_B > 0, jnp.where(keep_B > 0, dots_B, 0.0) / jnp.where(denom_B > 0, denom_B, 1.0), 0.0
    )
    new_state = ReferenceShapingState(
      new_ref,
      state.count + 1,
      jnp.sum(safe_w * keep_B) / n,
      jnp.sum(jnp.where(safe_w < 1.0 - 1e-6, keep_B, 0.0)) / n,
      jnp.sum(cos_B * keep_B) / n,
      state.num_nonfinite + num_nonfinite,
    )
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _check_decay(reference_decay):
  _validate.check_range("reference_decay", reference_decay, 0.0, 1.0, hi_open=True)


def centered_clip(
  radius: ArrayLike, reference_decay: ArrayLike = 0.9
) -> optax.GradientTransformation:
  """Centered clipping: clip each example's deviation from a reference, not its norm.

  With r the reference (a running average of past aggregated updates, zero at
  the first step, where this is plain clipping at tau), the batch sum is

    sum_i [ r + min(1, tau / ||g_i - r||) (g_i - r) ]
      = sum_i s_i g_i + (n - sum_i s_i) r,

  a reweighted sum of per-example gradients plus a multiple of r, so the
  per-example engine computes it from norms and dot products (||g_i - r||^2 =
  ||g_i||^2 - 2 <g_i, r> + ||r||^2). An example whose direction disagrees with
  the history moves the update by at most tau / B whatever its norm. After the
  step r <- beta r + (1 - beta) (sum / B).

  Args:
    radius: tau in (0, inf] (may be traced).
    reference_decay: beta in [0, 1) (0: the reference is the last update).

  Returns:
    An `optax.GradientTransformation` mapping per-example gradients (or
    `MaskedGrads`, or a fast-path `ReweightedSum` computed with
    `centered_clip_weights` at this state's reference) to a `ClippedSum`; its
    state is `ReferenceShapingState`. Chain `add_gaussian_noise` after it.

  Example:
    >>> tx = optax.chain(centered_clip(1.0), add_gaussian_noise(0.0, 1.0, key), optax.adam(1e-2))

  References:
    Karimireddy, He, Jaggi 2021, §4, eq. (CC): v <- v + (1/n) sum_i
    clip_tau(x_i - v). Hong et al. 2020, §7.
  """
  _validate.check_range("radius", radius, 0.0, np.inf, lo_open=True)
  _check_decay(reference_decay)
  weights = lambda n_B, d_B, ref_sq: centered_clip_weights(n_B, d_B, ref_sq, radius)
  return _reference_transform(weights, True, radius, reference_decay)


def cosine_gate(
  threshold: ArrayLike, l2_norm_clip: ArrayLike = np.inf, reference_decay: ArrayLike = 0.9
) -> optax.GradientTransformation:
  """Cosine gating: drop examples that disagree in direction with a reference, clip the rest.

  With r the reference (a running average of past aggregated updates; at the
  first step r = 0 and every example passes), the batch sum is

    sum_i 1[cos(g_i, r) >= kappa] min(1, C / ||g_i||) g_i,   cos = <g_i, r> / (||g_i|| ||r||),

  and the noise transform divides by the whole batch size (gated examples
  count as zero gradients). A reweighted sum: the engine computes it from
  norms and dot products. After the step r <- beta r + (1 - beta) (sum / B).

  Args:
    threshold: kappa in [-1, 1] (may be traced; -1 keeps every example).
    l2_norm_clip: C in (0, inf] for the examples that pass (may be traced).
    reference_decay: beta in [0, 1).

  Returns:
    An `optax.GradientTransformation` like `centered_clip`'s (fast-path input:
    a `ReweightedSum` computed with `cosine_gate_weights`).

  References:
    Hong et al. 2020, §3 and §7 (poisons' gradients differ in orientation);
    the reference as in Karimireddy, He, Jaggi 2021.
  """
  _validate.check_range("threshold", threshold, -1.0, 1.0)
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, np.inf, lo_open=True)
  _check_decay(reference_decay)

  def weights(n_B, d_B, ref_sq):
    return cosine_gate_weights(n_B, d_B, jnp.sqrt(ref_sq), threshold, l2_norm_clip)

  return _reference_transform(weights, False, l2_norm_clip, reference_decay)


# ------------------------------------------------------------------ robust aggregation


class RobustAggregateState(NamedTuple):
  """State of `trimmed_mean` and `coordinate_median`."""

  num_kept: jax.Array  # [] float32: examples entering the order statistics, last batch
  num_trimmed: jax.Array  # [] float32: examples trimmed from each end per coordinate, last batch
  num_nonfinite: jax.Array  # [] int32: non-finite per-example gradients dropped so far


def _order_statistic_mean(updates, params, lo_fn, hi_fn):
  """Coordinate-wise mean of the sorted kept values with rank in [lo, hi), times n, and stats.

  Dropped and padding rows sort last (+inf); n is the number of kept examples;
  `lo_fn(n)`, `hi_fn(n)` give the rank window (traced). The sum returned is
  n_all x the robust mean, n_all = kept + non-finite (the noise transform's
  denominator), so (sum / n_all) is the robust mean.
  """
  grads_B, norms_B, keep_B = _materialised(updates, params)
  if _real(updates) is not None:
    norms_B = jnp.where(_real(updates) > 0, norms_B, 0.0)
  num_nonfinite = _nonfinite(norms_B, keep_B)
  n = jnp.sum(keep_B)
  lo, hi = lo_fn(n), hi_fn(n)
  count = jnp.maximum(hi - lo, 1.0)
  rank_B = jnp.arange(keep_B.shape[0], dtype=jnp.float32)
  in_window_B = (rank_B >= lo) & (rank_B < hi) & (rank_B < n)
  n_all = n + num_nonfinite

  def robust(g):
    flat = g.reshape(g.shape[0], -1)
    sorted_BK = jnp.sort(jnp.where(keep_B[:, None] > 0, flat, jnp.inf), axis=0)
    window_BK = jnp.where(in_window_B[:, None], sorted_BK, 0.0)
    mean_K = jnp.sum(window_BK, axis=0) / count
    return (mean_K * jnp.where(n > 0, n_all, 0.0)).reshape(g.shape[1:]).astype(g.dtype)

  total = jax.tree.map(robust, grads_B)
  out = _as_clipped(total, norms_B, keep_B, None, np.inf)
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


# ------------------------------------------------------------------ adaptive clip norm


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
      grads_B, norms_B, keep_B = _materialised(updates, params)
      clipped = grads_lib.clipped_sum_from_grads(grads_B, clip, keep_B)
      if _real(updates) is not None:
        norms_B = jnp.where(_real(updates) > 0, norms_B, 0.0)
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


# ------------------------------------------------------------------ as `train` defenses

# `train.TrainSpec(defense=...)` names: C is `HParams.l2_norm_clip`, p is `HParams.shaping_param`.
DEFENSES = {
  "centered": "centered_clip(radius=C, reference_decay=p)",
  "cosine": "cosine_gate(threshold=p, l2_norm_clip=C)",
  "trimmed": "trimmed_mean(trim_fraction=p)",
  "median": "coordinate_median()",
  "quantile": "quantile_clip(target_quantile=p, initial_clip=C)",
}


def for_defense(defense: str, l2_norm_clip: ArrayLike, shaping_param: ArrayLike):
  """The shaping transform a `train` defense name stands for (see `DEFENSES`)."""
  if defense == "centered":
    return centered_clip(l2_norm_clip, shaping_param)
  if defense == "cosine":
    return cosine_gate(shaping_param, l2_norm_clip)
  if defense == "trimmed":
    return trimmed_mean(shaping_param)
  if defense == "median":
    return coordinate_median()
  if defense == "quantile":
    return quantile_clip(shaping_param, l2_norm_clip)
  raise ValueError(f"defense must be one of {tuple(DEFENSES)}, got {defense!r}")


def step_input(
  defense: str, loss_fn, params: Params, batch, shaper_state, l2_norm_clip, shaping_param
):
  """(what the shaping transform takes, a `ClippedSum` for the step's norm statistics).

  The one place `train` computes a shaping defense's per-example quantities:
  centered clipping and cosine gating through `per_example.reweighted_sum` at
  the state's reference (the engine's fast path when it serves the model);
  quantile clipping through `clipped_sum_and_norms` at the state's C; the
  robust aggregators from materialised per-example gradients.
  """
  mask_B = batch.get("mask") if isinstance(batch, dict) else None
  if defense in ("centered", "cosine"):
    ref = shaper_state.reference
    ref_sq = _sq_norm(ref)
    if defense == "centered":
      fn = lambda n_B, d_B: centered_clip_weights(n_B, d_B, ref_sq, l2_norm_clip)
    else:
      fn = lambda n_B, d_B: cosine_gate_weights(
        n_B, d_B, jnp.sqrt(ref_sq), shaping_param, l2_norm_clip
      )
    rs = per_example.reweighted_sum(loss_fn, params, batch, ref, fn)
    stats = grads_lib.ClippedSum(
      rs.sum, rs.norms_B, rs.mask_B, jnp.asarray(l2_norm_clip, jnp.float32)
    )
    return rs, stats
  if defense == "quantile":
    cs = per_example.clipped_sum_and_norms(loss_fn, params, batch, shaper_state.l2_norm_clip)
    return cs, cs
  grads_B = grads_lib.per_example_grads(loss_fn, params, batch)
  keep_B = (
    jnp.ones(jax.tree.leaves(grads_B)[0].shape[:1], jnp.float32) if mask_B is None else mask_B
  )
  norms_B = grads_lib.per_example_norms(grads_B)
  stats = grads_lib.ClippedSum(params, norms_B, keep_B * grads_lib.finite_mask(grads_B), jnp.inf)
  return MaskedGrads(grads_B, keep_B), stats
