"""Orientation-aware shaping: centered clipping and cosine gating against a reference (§7).

Both keep a reference direction r in their state, a running average of past
aggregated updates (r <- beta r + (1 - beta) mean of the shaped batch, zero at
the first step), and see each per-example gradient only through its norm and
its dot product with r. So the sum they produce is a reweighted sum of the
per-example gradients, which the per-example engine computes in one pass
without materialising them (`per_example.reweighted_sum`, given the weights
from `centered_clip_weights` / `cosine_gate_weights` at the state's r); such a
`ReweightedSum` input is taken as already shaped, like a `ClippedSum` by
`transforms.clip_per_example`.

Shapes: B batch; `*_B` one value per example.

References:
  Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, §4 (centered clipping).
  Hong et al. 2020, §3, §7 (poisons' gradients differ in orientation).
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
from jaxshape.shaping import _inputs


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
    ref_sq = _inputs.sq_norm(ref)
    fn = lambda n_B, d_B: weights_fn(n_B, d_B, ref_sq)
    if isinstance(updates, per_example.ReweightedSum):
      transforms._check_clipped_sum(
        grads_lib.ClippedSum(updates.sum, updates.norms_B, updates.mask_B, 0.0), params
      )
      total, norms_B, dots_B, keep_B, w_B = updates
      num_nonfinite = jnp.sum(~jnp.isfinite(norms_B)).astype(jnp.int32)
    else:
      grads_B, norms_B, keep_B, num_nonfinite = _inputs.materialised(updates, params)
      dots_B = _inputs.dots(grads_B, ref)
      ok_B = keep_B > 0
      w_B = jnp.where(ok_B, fn(jnp.where(ok_B, norms_B, 0.0), jnp.where(ok_B, dots_B, 0.0)), 0.0)
      w_B = w_B * keep_B
      total = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads_lib.scale_per_example(grads_B, w_B))
    kept = jnp.sum(keep_B)
    if offset:  # centered clipping: each kept example contributes r + s_i (g_i - r)
      extra = kept - jnp.sum(w_B)
      total = jax.tree.map(lambda t, r: t + (extra * r).astype(t.dtype), total, ref)
    out = grads_lib.ClippedSum(total, norms_B, keep_B, jnp.asarray(clip, jnp.float32))
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
