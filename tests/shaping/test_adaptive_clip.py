"""Tests jaxshape/shaping/adaptive_clip.py: quantile-adaptive clipping against NumPy (the clip
norm's geometric update and the clipped sum at the updated norm), and convergence to the
target quantile of fixed norms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import shaping
from tests.shaping.helpers import PARAMS
from tests.shaping.helpers import B
from tests.shaping.helpers import flat
from tests.shaping.helpers import per_example
from tests.shaping.helpers import two_steps
from tests.shaping.helpers import unflat


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("gamma", [0.2, 0.9])
def test_quantile_clip_matches_numpy(gamma, jit):
  g1, g2 = per_example(0), per_example(1)
  c0 = 8.0
  _, o2, s1 = two_steps(shaping.quantile_clip(gamma, c0, 0.2), g1, g2, jit)
  n1 = np.linalg.norm(flat(g1), axis=1)
  c1 = c0 * np.exp(-0.2 * (np.mean(n1 <= c0) - gamma))
  np.testing.assert_allclose(s1.l2_norm_clip, c1, rtol=1e-5)
  np.testing.assert_allclose(s1.frac_below, np.mean(n1 <= c0), rtol=1e-6)
  want2 = sum(min(1.0, c1 / np.linalg.norm(x)) * x for x in flat(g2))
  chex.assert_trees_all_close(o2.sum, unflat(want2), rtol=1e-4, atol=1e-4)


def test_quantile_clip_converges_to_the_quantile():
  norms = np.linspace(1.0, 10.0, B)
  g = {
    "b": jnp.zeros((B, 3)),
    "w": jnp.asarray(np.zeros((B, 4, 3)) + norms[:, None, None] / np.sqrt(12)),
  }
  tx = shaping.quantile_clip(0.5, 100.0, 0.2)
  step = jax.jit(lambda s: tx.update(g, s, PARAMS)[1])
  state = tx.init(PARAMS)
  for _ in range(200):
    state = step(state)
  # The median of 8 values lies between the 4th and 5th; the update oscillates around it.
  assert norms[3] - 0.3 <= float(state.l2_norm_clip) <= norms[4] + 0.3
