"""Tests jaxshape/shaping/orientation.py: centered clipping and cosine gating against NumPy
loops over two steps (the reference moves), jitted and eager; inject_hyperparams; the engine's
fast path (`per_example.reweighted_sum`) against the vmap path."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxshape import models
from jaxshape import per_example
from jaxshape import shaping
from tests.shaping.helpers import PARAMS
from tests.shaping.helpers import B
from tests.shaping.helpers import flat
from tests.shaping.helpers import per_example as make_grads
from tests.shaping.helpers import ref_centered
from tests.shaping.helpers import ref_cosine
from tests.shaping.helpers import two_steps
from tests.shaping.helpers import unflat

JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])


@JIT
@pytest.mark.parametrize("tau,beta", [(1.0, 0.9), (4.0, 0.0), (math.inf, 0.5)])
def test_centered_clip_matches_numpy(tau, beta, jit):
  g1, g2 = make_grads(0), make_grads(1, shift=1.0)
  o1, o2, s1 = two_steps(shaping.centered_clip(tau, beta), g1, g2, jit)
  want1 = ref_centered(flat(g1), np.zeros(15), tau)
  r1 = (1 - beta) * want1 / B
  want2 = ref_centered(flat(g2), r1, tau)
  chex.assert_trees_all_close(o1.sum, unflat(want1), rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(s1.reference, unflat(r1), rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(o2.sum, unflat(want2), rtol=2e-4, atol=2e-4)


@JIT
@pytest.mark.parametrize("kappa,clip", [(0.0, 2.0), (-1.0, math.inf), (0.3, 5.0)])
def test_cosine_gate_matches_numpy(kappa, clip, jit):
  g1, g2 = make_grads(0, shift=0.5), make_grads(1, shift=0.5)
  o1, o2, _ = two_steps(shaping.cosine_gate(kappa, clip, 0.5), g1, g2, jit)
  want1 = ref_cosine(flat(g1), np.zeros(15), kappa, clip)
  want2 = ref_cosine(flat(g2), 0.5 * want1 / B, kappa, clip)
  chex.assert_trees_all_close(o1.sum, unflat(want1), rtol=2e-4, atol=2e-4)
  chex.assert_trees_all_close(o2.sum, unflat(want2), rtol=2e-4, atol=2e-4)


def test_cosine_gate_drops_the_opposed_example():
  """An example pointing against the reference gets weight 0; its mirror keeps weight 1."""
  n_B, d_B = jnp.asarray([1.0, 1.0]), jnp.asarray([-0.9, 0.9])
  w = shaping.cosine_gate_weights(n_B, d_B, 1.0, 0.0, math.inf)
  np.testing.assert_array_equal(w, [0.0, 1.0])


def test_inject_hyperparams():
  g = make_grads(0)
  tx = optax.inject_hyperparams(shaping.centered_clip)(radius=2.0, reference_decay=0.5)
  state = tx.init(PARAMS)
  out, state = jax.jit(tx.update)(g, state, PARAMS)
  first = ref_centered(flat(g), np.zeros(15), 2.0)
  chex.assert_trees_all_close(out.sum, unflat(first), rtol=2e-4)
  state.hyperparams["radius"] = jnp.asarray(0.5)
  out, _ = jax.jit(tx.update)(g, state, PARAMS)
  want = ref_centered(flat(g), 0.5 * first / B, 0.5)
  chex.assert_trees_all_close(out.sum, unflat(want), rtol=2e-4, atol=2e-4)


LOSS = models.ClassifierLoss(models.MLP(3, hidden=(5,)))


@pytest.mark.parametrize("weights", ["centered", "cosine"])
def test_fast_reweighted_sum_equals_vmap(weights):
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(24, 6)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, 24), jnp.int32),
    "mask": jnp.asarray([1.0] * 20 + [0.0] * 4),
  }
  params = models.init_params(LOSS.model, jax.random.key(0), (6,))
  ref = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  if weights == "centered":
    fn = lambda n, d: shaping.centered_clip_weights(n, d, 2.0, 0.5)
  else:
    fn = lambda n, d: shaping.cosine_gate_weights(n, d, 1.0, 0.0, 0.5)
  both = jax.jit(
    lambda p, b, r: [
      per_example.reweighted_sum(LOSS, p, b, r, fn, method=m) for m in ("fast", "vmap")
    ]
  )
  a, b = both(params, batch, ref)
  chex.assert_trees_all_close(a.sum, b.sum, rtol=1e-4, atol=1e-5)
  for f in ("dots_B", "mask_B", "weights_B"):
    np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a.norms_B[:20], b.norms_B[:20], rtol=1e-4)
  assert float(jnp.sum(a.weights_B > 0)) > 0 and float(jnp.sum(a.mask_B)) == 20
