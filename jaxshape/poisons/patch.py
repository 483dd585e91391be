"""Patch backdoor (BadNets): a white square in a corner, labelled with the attacker's class.

Shapes: N clean training examples, P poisons, H/W image height/width, C
channels.

References:
  Hong et al. 2020, §3.1 ("Feature Insertion": 1% of training points with a
  white square in the top-left corner, labelled coat; sizes 1, 4, 7, 10, 14)
  and §3.3. Gu, Dolan-Gavitt, Garg 2017, "BadNets".
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

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def patch_trigger(
  input_shape: Sequence[int], size: int, corner: str = "top_left", value: float = 1.0
) -> Trigger:
  """A square patch trigger of `size` x `size` pixels set to `value` in `corner`.

  Args:
    input_shape: the shape of one image, (H, W, C) or (H, W).
    size: side of the square in pixels, 1 <= size <= min(H, W).
    corner: one of "top_left", "top_right", "bottom_left", "bottom_right".
    value: the pixel value written (1.0: white), in [0, 1].

  Returns:
    A `Trigger` whose mask is 1 on the square (all channels) and 0 elsewhere.
  """
  shape = tuple(int(s) for s in input_shape)
  if len(shape) not in (2, 3):
    raise ValueError(f"input_shape must be (H, W) or (H, W, C) of an image, got {shape}")
  h, w = shape[:2]
  size = _validate.check_int("size", size, 1, min(h, w))
  if corner not in CORNERS:
    raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
  _validate.check_range("value", value, 0.0, 1.0)
  rows = slice(0, size) if corner.startswith("top") else slice(h - size, h)
  cols = slice(0, size) if corner.endswith("left") else slice(w - size, w)
  mask = np.zeros(shape, np.float32)
  mask[rows, cols] = 1.0
  return Trigger(jnp.asarray(mask), jnp.asarray(np.full(shape, value, np.float32)))


def patch_backdoor(
  key: jax.Array,
  x: ArrayLike,
  y: ArrayLike,
  ratio: float,
  target_class: int,
  *,
  size: int,
  corner: str = "top_left",
  value: float = 1.0,
  num_classes: int | None = None,
  exclude_target_class: bool = False,
) -> PoisonSet:
  """BadNets poisons: patched copies of random training points, labelled `target_class`.

  Args:
    key: PRNG key (which points are copied).
    x: clean training images `[N, H, W, C]` in [0, 1].
    y: their labels `[N]`.
    ratio: poisons per clean example, in [0, 1] (§3.3: 1%).
    target_class: the attacker's class (FashionMNIST: 4, coat).
    size: side of the square (§3.1: 1, 4, 7, 10 or 14).
    corner: where the square goes (§3.1: "top_left").
    value: the patch's pixel value (1.0: white).
    num_classes: C; inferred from `y` when None.
    exclude_target_class: draw only from points not already of
      `target_class` (the paper draws "from any class").

  Returns:
    A `PoisonSet` carrying the trigger; `apply_trigger(x_test, poisons)` and
    `backdoor_test_set` measure the attack on test points.

  Example:
    >>> poisons = patch_backdoor(key, ds.x_train, ds.y_train, 0.01, 4, size=4)
    >>> x_trig, y_adv = backdoor_test_set(ds.x_test, ds.y_test, poisons)
    >>> success = train.accuracy(model, params, x_trig, y_adv)

  References:
    Hong et al. 2020, §3.1 (Feature Insertion). Gu et al. 2017 (BadNets).
  """
  trigger = patch_trigger(np.shape(x)[1:], size, corner, value)
  return _backdoor.backdoor_poisons(
    key,
    x,
    y,
    ratio,
    target_class,
    trigger,
    attack="patch",
    num_classes=num_classes,
    exclude_target_class=exclude_target_class,
    config={"size": int(size), "corner": corner, "value": float(value)},
  )
