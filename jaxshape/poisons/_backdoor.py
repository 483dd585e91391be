"""Shared by the dirty-label backdoors (patch, blend): pick points, stamp, relabel.

Shapes: N clean training examples, P poisons.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import Trigger
from jaxshape.poisons.poison_set import apply_trigger
from jaxshape.poisons.poison_set import take_rows


@functools.partial(jax.jit, static_argnames=("num_poisons",))
def pick_points(key: jax.Array, eligible_N: jax.Array, *, num_poisons: int) -> jax.Array:
  """`num_poisons` distinct random indices among the eligible points, int32 `[P]`."""
  score_N = jnp.where(eligible_N, jax.random.uniform(key, eligible_N.shape), 2.0)
  return jnp.argsort(score_N)[:num_poisons].astype(jnp.int32)


def backdoor_poisons(
  key: jax.Array,
  x: Any,
  y: Any,
  ratio: float,
  target_class: int,
  trigger: Trigger,
  *,
  attack: str,
  num_classes: int | None,
  exclude_target_class: bool,
  config: dict[str, Any],
) -> PoisonSet:
  """round(ratio x N) triggered copies of random training points, labelled `target_class`."""
  _validate.check_key(key)
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, num_classes = _validate.check_labels("y", y, x_N.shape[0], num_classes)
  _validate.check_range("ratio", ratio, 0.0, 1.0)
  target_class = _validate.check_class("target_class", target_class, num_classes)
  if tuple(x_N.shape[1:]) != tuple(trigger.mask.shape):
    raise ValueError(f"x has inputs of shape {x_N.shape[1:]}, the trigger is {trigger.mask.shape}")
  y_host = np.asarray(y_N)
  eligible_N = (y_host != target_class) if exclude_target_class else np.ones(y_host.shape, bool)
  num_poisons = _validate.num_from_ratio(ratio, x_N.shape[0])
  available = int(np.sum(eligible_N))
  if num_poisons > available:
    raise ValueError(
      f"ratio {ratio} asks for {num_poisons} poisons but only {available} points are eligible"
    )
  idx_P = pick_points(key, jnp.asarray(eligible_N), num_poisons=num_poisons)
  return PoisonSet(
    x=apply_trigger(take_rows(x_N, idx_P), trigger),
    y=jnp.asarray(np.full([num_poisons], target_class, np.int32)),
    attack=attack,
    base_idx=idx_P,
    target_idx=jnp.asarray(np.full([num_poisons], -1, np.int32)),
    target_class=target_class,
    base_split="train",
    trigger=trigger,
    config={"ratio": float(ratio), "exclude_target_class": exclude_target_class, **config},
  )
