"""Random label flipping: copies of training points with a wrong label.

Shapes: N clean training examples, P poisons, C classes.

References:
  Hong et al. 2020, §6.2 (random label flipping, poisons *added* at 0-40% of
  the training set). Barreno et al. 2006, "Can Machine Learning Be Secure?".
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


@functools.partial(jax.jit, static_argnames=("num_poisons", "num_classes"))
def flip_labels(
  key: jax.Array, y_N: jax.Array, *, num_poisons: int, num_classes: int
) -> tuple[jax.Array, jax.Array]:
  """Picks `num_poisons` distinct training points and a wrong label for each.

  Binary labels flip to the other class; with more classes the new label is
  uniform over the C - 1 others.

  Returns:
    `(idx_P, y_P)`: indices into the training set (int32) and the new labels.
  """
  key_pick, key_label = jax.random.split(key)
  idx_P = jax.random.permutation(key_pick, y_N.shape[0])[:num_poisons].astype(jnp.int32)
  y_old_P = y_N[idx_P]
  if num_classes == 2:
    return idx_P, (1 - y_old_P).astype(jnp.int32)
  offset_P = jax.random.randint(key_label, (num_poisons,), 1, num_classes)
  return idx_P, ((y_old_P + offset_P) % num_classes).astype(jnp.int32)


def label_flip(
  key: jax.Array,
  x: ArrayLike,
  y: ArrayLike,
  ratio: float,
  *,
  num_classes: int | None = None,
) -> PoisonSet:
  """Random label-flipping poisons: round(ratio x N) relabelled copies of training points.

  Args:
    key: PRNG key (which points, which wrong labels).
    x: clean training inputs `[N, ...]` in [0, 1].
    y: their labels `[N]`.
    ratio: poisons per clean example, in [0, 1] (the paper: 0-40%).
    num_classes: C; inferred as max(y) + 1 (at least 2) when None.

  Returns:
    A `PoisonSet` of round(ratio x N) copies of distinct random training
    points, each with a label different from its own; `base_idx` indexes the
    training set.

  Example:
    >>> poisons = label_flip(jax.random.key(0), ds.x_train, ds.y_train, 0.4)
    >>> data = merge(ds, poisons)   # 10,800 clean + 4,320 flipped

  References:
    Hong et al. 2020, §6.2 (random label flipping, LF).
  """
  _validate.check_key(key)
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, num_classes = _validate.check_labels("y", y, x_N.shape[0], num_classes)
  _validate.check_range("ratio", ratio, 0.0, 1.0)
  num_poisons = _validate.num_from_ratio(ratio, x_N.shape[0])
  idx_P, y_P = flip_labels(key, y_N, num_poisons=num_poisons, num_classes=num_classes)
  return PoisonSet(
    x=take_rows(x_N, idx_P),
    y=y_P,
    attack="label_flip",
    base_idx=idx_P,
    target_idx=jnp.asarray(np.full([num_poisons], -1, np.int32)),
    base_split="train",
    config={"ratio": float(ratio), "num_classes": num_classes},
  )
