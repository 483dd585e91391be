"""Watermark feature collision: base images overlaid with target images, base labels.

Shapes: N clean training examples, P poisons.

A poison is clip((1 - alpha) * base + alpha * target, 0, 1) labelled as the
base; alpha sets the intensity of the collision (Figure 2, upper row).

References:
  Hong et al. 2020, §3.1 ("Feature Collision": dress images overlaid with coat
  images, labelled dress) and §3.2 (100 poisons, alpha in {0.1, ..., 1.0}).
  Shafahi et al. 2018, "Poison Frogs!", §4.2 (watermarking).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import take_rows


@jax.jit
def overlay(x_base_P: jax.Array, x_target_P: jax.Array, alpha: ArrayLike) -> jax.Array:
  """clip((1 - alpha) x_base + alpha x_target, 0, 1); alpha may be traced."""
  return jnp.clip((1.0 - alpha) * x_base_P + alpha * x_target_P, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("num_pairs",))
def _pairs(key, y_N, base_class, target_class, *, num_pairs):
  key_base, key_target = jax.random.split(key)

  def pick(k, cls):
    # Random distinct members of `cls`: the first num_pairs of a random order
    # in which members of the class come first.
    score_N = jnp.where(y_N == cls, jax.random.uniform(k, y_N.shape), 2.0)
    return jnp.argsort(score_N)[:num_pairs].astype(jnp.int32)

  return pick(key_base, base_class), pick(key_target, target_class)


def collision_pairs(
  key: jax.Array,
  y: ArrayLike,
  num_pairs: int,
  base_class: int,
  target_class: int,
  *,
  num_classes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Random (base, target) index pairs from two classes, as in §3.1.

  Returns:
    `(base_idx_P, target_idx_P)`: distinct random points of `base_class` and
    of `target_class`, int32.
  """
  _validate.check_key(key)
  y_N, num_classes = _validate.check_labels("y", y, np.shape(y)[0], num_classes)
  base_class = _validate.check_class("base_class", base_class, num_classes)
  target_class = _validate.check_class("target_class", target_class, num_classes)
  counts = np.bincount(np.asarray(y_N), minlength=num_classes)
  limit = int(min(counts[base_class], counts[target_class]))
  num_pairs = _validate.check_int("num_pairs", num_pairs, 0, limit)
  return _pairs(key, y_N, base_class, target_class, num_pairs=num_pairs)


def watermark(
  x: ArrayLike,
  y: ArrayLike,
  base_idx: ArrayLike,
  target_idx: ArrayLike,
  alpha: float,
  *,
  x_targets: ArrayLike | None = None,
) -> PoisonSet:
  """Watermark collision poisons: target overlaid on base, labelled as the base.

  Args:
    x: clean training inputs `[N, ...]` in [0, 1] (the bases).
    y: their labels `[N]` (the poisons keep the base's label).
    base_idx: `[P]` indices of the bases in `x`.
    target_idx: `[P]` indices of the targets in `x_targets`.
    alpha: overlay intensity in [0, 1] (0: the base itself, 1: the target).
    x_targets: where the targets come from; defaults to `x` (§3.1 draws
      both from the training set).

  Returns:
    A `PoisonSet` (attack "watermark"); `target_class` is -1 (the targets'
    class is read from the data when needed).

  Example:
    >>> b, t = collision_pairs(key, ds.y_train, 100, base_class=0, target_class=1)
    >>> poisons = watermark(ds.x_train, ds.y_train, b, t, alpha=0.6)

  References:
    Hong et al. 2020, §3.1 (Feature Collision).
  """
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, _ = _validate.check_labels("y", y, x_N.shape[0], None)
  x_T = x_N if x_targets is None else _validate.check_inputs("x_targets", x_targets, min_rank=2)
  if x_T.shape[1:] != x_N.shape[1:]:
    raise ValueError(f"x_targets has inputs of shape {x_T.shape[1:]}, x has {x_N.shape[1:]}")
  base_P = _validate.check_indices("base_idx", base_idx, x_N.shape[0])
  target_P = _validate.check_indices("target_idx", target_idx, x_T.shape[0])
  if base_P.shape != target_P.shape:
    raise ValueError(
      f"base_idx and target_idx differ in length: {base_P.shape} vs {target_P.shape}"
    )
  _validate.check_range("alpha", alpha, 0.0, 1.0)
  x_base_P, y_P = take_rows((x_N, y_N), base_P)
  return PoisonSet(
    x=overlay(x_base_P, take_rows(x_T, target_P), alpha),
    y=y_P,
    attack="watermark",
    base_idx=base_P,
    target_idx=target_P,
    base_split="train",
    target_split="train" if x_targets is None else "",
    config={"alpha": float(alpha)},
  )
