"""Blend backdoor: a fixed pattern blended into the image, labelled with the attacker's class.

Shapes: N clean training examples, P poisons.

A poison is x' = (1 - lam) x + lam * pattern, with a fixed pattern (random
noise drawn from a key, or one given, e.g. a logo); the same blend on a test
point should make it the attacker's class.

References:
  Chen, Liu, Li, Lu, Song 2017, "Targeted Backdoor Attacks on Deep Learning
  Systems Using Data Poisoning", §4 (blended injection; random-noise and
  Hello-Kitty patterns). Used in "Limitations of gradient shaping"
  (papers/limitations-of-gradient-shaping.md, §4) at 1% and 10% poisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape.poisons import _backdoor
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import Trigger
from jaxshape.poisons.poison_set import apply_trigger


def blend_trigger(
  input_shape: Sequence[int],
  lam: float,
  *,
  key: jax.Array | None = None,
  pattern: ArrayLike | None = None,
) -> Trigger:
  """The blend trigger: mask `lam` everywhere, and a pattern.

  Args:
    input_shape: the shape of one input.
    lam: blend weight of the pattern, in (0, 1].
    key: draws a uniform [0, 1] noise pattern (Chen et al.'s random pattern)
      when `pattern` is None.
    pattern: a given pattern of shape `input_shape` in [0, 1].
  """
  shape = tuple(int(s) for s in input_shape)
  _validate.check_range("lam", lam, 0.0, 1.0, lo_open=True)
  if pattern is None:
    if key is None:
      raise ValueError("key is required to draw a random pattern (or pass pattern=...)")
    _validate.check_key(key)
    pattern = jax.random.uniform(key, shape, jnp.float32)
  else:
    pattern = _validate.check_inputs("pattern", pattern, min_rank=1)
    if tuple(pattern.shape) != shape:
      raise ValueError(f"pattern must have the input shape {shape}, got {pattern.shape}")
    host = np.asarray(pattern)
    if host.min() < 0.0 or host.max() > 1.0:
      raise ValueError("pattern must lie in [0, 1]")
  return Trigger(jnp.asarray(np.full(shape, lam, np.float32)), pattern)


def apply_blend(x: ArrayLike, pattern: ArrayLike, lam: float) -> jax.Array:
  """(1 - lam) x + lam * pattern on inputs `x_N...` (or one input).

  Example:
    >>> x_trig = apply_blend(x_test, poisons.trigger.pattern, 0.2)
  """
  pattern = jnp.asarray(pattern, jnp.float32)
  return apply_trigger(x, blend_trigger(pattern.shape, lam, pattern=pattern))


def blend(
  key: jax.Array,
  x: ArrayLike,
  y: ArrayLike,
  ratio: float,
  target_class: int,
  *,
  lam: float = 0.2,
  pattern: ArrayLike | None = None,
  num_classes: int | None = None,
  exclude_target_class: bool = False,
) -> PoisonSet:
  """Blend poisons: pattern-blended copies of random training points, labelled `target_class`.

  Args:
    key: PRNG key: which points are copied and (without `pattern`) the noise
      pattern, drawn from `jax.random.fold_in(key, 1)`.
    x: clean training inputs `[N, ...]` in [0, 1].
    y: their labels `[N]`.
    ratio: poisons per clean example, in [0, 1].
    target_class: the attacker's class.
    lam: blend weight in (0, 1] (Chen et al. train with 0.2).
    pattern: a fixed pattern `[...]` in [0, 1]; random uniform noise if None.
    num_classes: C; inferred from `y` when None.
    exclude_target_class: draw only from points not already of `target_class`.

  Returns:
    A `PoisonSet` carrying the trigger (mask lam, the pattern).

  Example:
    >>> poisons = blend(key, ds.x_train, ds.y_train, 0.1, target_class=4)
    >>> x_trig, y_adv = backdoor_test_set(ds.x_test, ds.y_test, poisons)

  References:
    Chen et al. 2017, §4 (blended injection strategy).
  """
  _validate.check_key(key)
  trigger = blend_trigger(np.shape(x)[1:], lam, key=jax.random.fold_in(key, 1), pattern=pattern)
  return _backdoor.backdoor_poisons(
    jax.random.fold_in(key, 0),
    x,
    y,
    ratio,
    target_class,
    trigger,
    attack="blend",
    num_classes=num_classes,
    exclude_target_class=exclude_target_class,
    config={"lam": float(lam), "random_pattern": pattern is None},
  )
