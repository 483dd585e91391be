"""Per-batch clean and poison mean gradients and their per-epoch artifacts (PROTOCOL.md,
"Gradient artifacts"; Hong et al. 2020, §3).

Shapes: B batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import jaxshape
from jaxshape import analysis


def subset_batch_grads(loss_fn, measure: str, l2_norm_clip, params, batch) -> dict[str, Any]:
  """A batch's mean clean and poison gradients, each zeroed (with its flag) when absent.

  Returns `{"clean": tree, "poison": tree, "has_clean": [], "has_poison": []}`:
  averaging every entry over an epoch's batches and dividing a mean tree by
  its flag's mean gives the mean over the batches that hold that subset.
  With `measure="clipped"`, each example's gradient is first clipped to
  `l2_norm_clip` (inf: no clipping).
  """
  if measure == "raw":
    means = analysis.subset_mean_grads(loss_fn, params, batch)
  else:
    # The clipped sum over a subset is the library's clipped sum with the
    # subset as the mask (its exact fast path where the model has one).
    mask_B = batch.get("mask", jnp.ones_like(batch["is_poison"]))
    means = {}
    for part, sel_B in (
      ("clean", (1.0 - batch["is_poison"]) * mask_B),
      ("poison", batch["is_poison"] * mask_B),
    ):
      clipped = jaxshape.clipped_sum_and_norms(
        loss_fn, params, {**batch, "mask": sel_B}, l2_norm_clip
      )
      count = jnp.maximum(jnp.sum(sel_B), 1.0)
      means[part] = jax.tree.map(lambda g, c=count: g / c, clipped.sum)
      means[f"n_{part}"] = jnp.sum(sel_B)
  has_clean = (means["n_clean"] > 0).astype(jnp.float32)
  has_poison = (means["n_poison"] > 0).astype(jnp.float32)
  return {
    "clean": jax.tree.map(lambda g: g * has_clean, means["clean"]),
    "poison": jax.tree.map(lambda g: g * has_poison, means["poison"]),
    "has_clean": has_clean,
    "has_poison": has_poison,
  }


def epoch_artifacts(epoch_means: dict[str, Any]) -> dict[str, jax.Array]:
  """`analysis.artifacts` of an epoch's averaged `subset_batch_grads` (PROTOCOL, §3).

  `epoch_means` is `train.fit`'s `batch_metrics` record of one epoch (the mean
  over its batches, accumulated in the scan carry; a sum works as well). Each
  subset's mean gradient is its tree divided by its flag, i.e. the mean over
  the batches that hold the subset; NaN when no batch did.
  """

  def mean(part):
    count = epoch_means[f"has_{part}"]
    scale = jnp.where(count > 0, 1.0 / jnp.where(count > 0, count, 1.0), jnp.nan)
    return jax.tree.map(lambda g: g * scale, epoch_means[part])

  return analysis.artifacts({"clean": mean("clean"), "poison": mean("poison")})
