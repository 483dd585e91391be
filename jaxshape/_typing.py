"""Type aliases shared by the whole package, defined once.

Shapes: B batch, N examples of a data set.

These are documentation for readers and type checkers; nothing checks them at
run time (the public functions validate their arguments themselves, see
`jaxshape._validate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

ArrayLike = jax.typing.ArrayLike
"""Anything `jnp.asarray` accepts: a Python number, a NumPy or JAX array (or a tracer)."""

PRNGKey = jax.Array
"""A JAX PRNG key (`jax.random.key(...)`, or legacy raw `uint32[2]` key data)."""

Params = Any
"""Model parameters: any pytree of arrays (Flax's `{"params": ...}` for the models here)."""

Batch = Any
"""A batch: a pytree of arrays sharing a leading axis B; jaxshape's own are dicts
with `x` `[B, ...]`, `y` `[B]` int32 and optionally a float `mask` `[B]` (0: padding)."""

Data = dict[str, jax.Array]
"""A data set: a dict of arrays with a leading axis N (`x`, `y`, optional `mask`, `index`, ...)."""

LossFn = Callable[[Params, Batch], jax.Array]
"""`loss_fn(params, batch) -> scalar`: the ordinary mean loss over whatever batch it is given."""

SplitArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""A loader's raw arrays: (x_train, y_train, x_test, y_test)."""
