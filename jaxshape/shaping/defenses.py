"""Shaping transforms as `train` defenses: names, construction, and each step's input.

`train.TrainSpec(defense=name)` for a name in `DEFENSES` chains
`for_defense(name, C, p)` before the noise transform; `step_input` computes
what that transform takes from a batch (the per-example engine's fast path
where the mechanism allows it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxshape import grads as grads_lib
from jaxshape import per_example
from jaxshape._typing import ArrayLike
from jaxshape._typing import Params
from jaxshape.shaping import _inputs
from jaxshape.shaping import adaptive_clip
from jaxshape.shaping import orientation
from jaxshape.shaping import robust_mean

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
    return orientation.centered_clip(l2_norm_clip, shaping_param)
  if defense == "cosine":
    return orientation.cosine_gate(shaping_param, l2_norm_clip)
  if defense == "trimmed":
    return robust_mean.trimmed_mean(shaping_param)
  if defense == "median":
    return robust_mean.coordinate_median()
  if defense == "quantile":
    return adaptive_clip.quantile_clip(shaping_param, l2_norm_clip)
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
    ref_sq = _inputs.sq_norm(ref)
    if defense == "centered":
      fn = lambda n_B, d_B: orientation.centered_clip_weights(n_B, d_B, ref_sq, l2_norm_clip)
    else:
      fn = lambda n_B, d_B: orientation.cosine_gate_weights(
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
  return _inputs.MaskedGrads(grads_B, keep_B), stats
