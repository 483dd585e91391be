"""Tests jaxshape/transforms.py on bad inputs: each gets a ValueError naming the problem.

Hyperparameters are checked when the transform is built (concrete values
only; traced ones cannot be checked and pass, STYLE.md); gradient shapes are
static, so they are checked in `update`, jitted or not.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxshape import grads
from jaxshape import transforms

PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((4,))}
KEY = jax.random.key(0)
INF, NAN = math.inf, math.nan

# Each factory with valid arguments; a case overrides one of them.
FACTORIES = {
  "clip_per_example": lambda l2_norm_clip=1.0: transforms.clip_per_example(l2_norm_clip),
  "add_gaussian_noise": lambda noise_multiplier=1.0, l2_norm_clip=1.0, key=KEY: (
    transforms.add_gaussian_noise(noise_multiplier, l2_norm_clip, key)
  ),
  "add_adaptive_noise": lambda noise_multiplier=1.0, steps_per_epoch=3, key=KEY: (
    transforms.add_adaptive_noise(noise_multiplier, steps_per_epoch, key)
  ),
  "dp_sgd": lambda learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=KEY, **kw: (
    transforms.dp_sgd(learning_rate, l2_norm_clip, noise_multiplier, key, **kw)
  ),
  "dp_adam": lambda learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=KEY: (
    transforms.dp_adam(learning_rate, l2_norm_clip, noise_multiplier, key)
  ),
}
NOISY = ("add_gaussian_noise", "add_adaptive_noise", "dp_sgd", "dp_adam")
GAUSSIAN = ("add_gaussian_noise", "dp_sgd", "dp_adam")
WITH_CLIP = ("clip_per_example", "add_gaussian_noise", "dp_sgd", "dp_adam")

CASES = (
  [(f, {"noise_multiplier": v}, "noise_multiplier") for f in NOISY for v in (INF, -0.1, NAN)]
  + [(f, {"l2_norm_clip": v}, "l2_norm_clip") for f in WITH_CLIP for v in (0.0, -1.0, NAN, -INF)]
  # C = inf with sigma > 0: infinite noise (sigma = 0 with C = inf is fine: no noise).
  + [(f, {"l2_norm_clip": INF, "noise_multiplier": 0.5}, "l2_norm_clip = inf") for f in GAUSSIAN]
  # One bad entry in a concrete grid is enough.
  + [
    (f, {"l2_norm_clip": np.array([1.0, INF]), "noise_multiplier": np.array([0.0, 1.0])}, "inf")
    for f in GAUSSIAN
  ]
  + [
    ("add_adaptive_noise", {"steps_per_epoch": v}, "steps_per_epoch")
    for v in (1.5, INF, NAN, 0, -2, "3")
  ]
  + [(f, {"learning_rate": v}, "learning_rate") for f in ("dp_sgd", "dp_adam") for v in (INF, -1.0)]
  + [("dp_sgd", {"momentum": v}, "momentum") for v in (1.0, -0.1, NAN)]
  + [(f, {"key": None}, "key") for f in NOISY]
  + [(f, {"key": 3}, "key") for f in NOISY]
)


@pytest.mark.parametrize(
  "factory,kwargs,match", CASES, ids=[f"{f}-{k}" for f, k, _ in [(c[0], c[1], 0) for c in CASES]]
)
def test_bad_hyperparameter_raises_naming_it(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    FACTORIES[factory](**kwargs)


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_valid_edge_values_are_accepted(factory):
  edges = {
    "clip_per_example": {"l2_norm_clip": INF},
    "add_gaussian_noise": {"l2_norm_clip": INF, "noise_multiplier": 0.0},
    "add_adaptive_noise": {"steps_per_epoch": 1.0, "noise_multiplier": 0.0},
    "dp_sgd": {"l2_norm_clip": INF, "noise_multiplier": 0.0, "momentum": 0.0},
    "dp_adam": {"learning_rate": 0.0},
  }
  tx = FACTORIES[factory](**edges[factory])
  tx.update(_per_example(2), tx.init(PARAMS), PARAMS)


def test_traced_hyperparameters_are_not_checked():
  # Under jit a value is unknown at build time; the transform must still trace.
  out = jax.jit(lambda sigma: _apply(FACTORIES["add_gaussian_noise"](sigma), _per_example(2)))(
    jnp.asarray(INF)
  )
  assert not np.all(np.isfinite(out["w"]))


# ------------------------------------------------------------------ gradient shapes


def _per_example(b):
  return {"w": jnp.ones((b, 4, 3)), "b": jnp.ones((b, 4))}


def _apply(tx, g, params=PARAMS):
  return tx.update(g, tx.init(PARAMS), params)[0]


BAD_GRADIENTS = {
  # An aggregated gradient whose leaves happen to share a leading size (4).
  "no batch axis": ({"w": jnp.ones((4, 3)), "b": jnp.ones((4,))}, "shape \\(B,\\)"),
  "leading axes differ": ({"w": jnp.ones((4, 4, 3)), "b": jnp.ones((1, 4))}, "batch axis B"),
  "one leaf unbatched": ({"w": jnp.ones((2, 4, 3)), "b": jnp.ones((4,))}, "shape \\(B,\\)"),
  "empty batch": (_per_example(0), "empty"),
  "other structure": ({"w": jnp.ones((2, 4, 3))}, "structure"),
  "batched ClippedSum": (
    grads.ClippedSum(_per_example(2), jnp.ones(2), jnp.ones(2), jnp.asarray(1.0)),
    "shaped like params",
  ),
  "empty ClippedSum": (
    grads.ClippedSum(
      jax.tree.map(jnp.zeros_like, PARAMS), jnp.ones(0), jnp.ones(0), jnp.asarray(1.0)
    ),
    "empty",
  ),
  "ClippedSum norms not [B]": (
    grads.ClippedSum(
      jax.tree.map(jnp.zeros_like, PARAMS), jnp.ones((2, 1)), jnp.ones(2), jnp.asarray(1.0)
    ),
    "norms_B",
  ),
}


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize("case", sorted(BAD_GRADIENTS))
def test_bad_gradient_shapes_raise(factory, case):
  g, match = BAD_GRADIENTS[case]
  with pytest.raises(ValueError, match=match):
    _apply(FACTORIES[factory](), g)


@pytest.mark.parametrize("case", ["no batch axis", "leading axes differ"])
def test_bad_gradient_shapes_raise_under_jit(case):
  g, match = BAD_GRADIENTS[case]
  tx = transforms.dp_sgd(0.1, 1.0, 1.0, KEY)
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda g: _apply(tx, g))(g)


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_update_without_params_raises(factory):
  with pytest.raises(ValueError, match="params"):
    _apply(FACTORIES[factory](), _per_example(2), params=None)


def test_a_valid_update_has_the_params_shape():
  out = _apply(transforms.dp_sgd(0.1, 1.0, 1.0, KEY), _per_example(5))
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, PARAMS)
  new = optax.apply_updates(PARAMS, out)
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, PARAMS)
