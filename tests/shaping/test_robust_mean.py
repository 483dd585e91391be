"""Tests jaxshape/shaping/robust_mean.py: coordinate-wise trimmed mean and median against
NumPy, jitted and eager; a large outlier moves the median not at all."""

import chex
import jax
import numpy as np
import pytest

from jaxshape import shaping
from tests.helpers import run
from tests.shaping.helpers import B
from tests.shaping.helpers import flat
from tests.shaping.helpers import per_example
from tests.shaping.helpers import ref_trimmed
from tests.shaping.helpers import unflat
from tests.shaping.helpers import update

JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])


@JIT
@pytest.mark.parametrize("beta", [0.0, 0.125, 0.3, 0.49])
def test_trimmed_mean_matches_numpy(beta, jit):
  g = per_example(2)
  out, state = run(lambda g: update(shaping.trimmed_mean(beta), g), g, jit=jit)
  want = B * ref_trimmed(flat(g), beta)
  chex.assert_trees_all_close(out.sum, unflat(want), rtol=1e-5, atol=1e-5)
  assert float(state.num_trimmed) == min(int(np.floor(beta * B)), (B - 1) // 2)


@JIT
def test_median_matches_numpy(jit):
  g = per_example(3)
  out, state = run(lambda g: update(shaping.coordinate_median(), g), g, jit=jit)
  chex.assert_trees_all_close(out.sum, unflat(B * np.median(flat(g), 0)), rtol=1e-5, atol=1e-5)
  assert float(state.num_kept) == B


def test_median_ignores_an_outlier():
  """One example moved to 1e6: each coordinate's median stays between the clean batch's 4th and
  6th order statistics (of 8), the mean would move by 1e6 / 8."""
  g = per_example(3)
  outlier = {k: v.at[0].set(1e6) for k, v in g.items()}
  total = update(shaping.coordinate_median(), outlier)[0].sum
  got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(total)]) / B
  s = np.sort(flat(g), axis=0)
  assert np.all(got >= s[3] - 1e-5) and np.all(got <= s[5] + 1e-5)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13])
def test_sorted_rows_equals_numpy_sort(rows):
  """The bitonic network sorts each column like np.sort, for any batch size, ties and +inf."""
  from jaxshape.shaping import robust_mean

  rng = np.random.default_rng(rows)
  x = rng.integers(-3, 4, size=(rows, 37)).astype(np.float32)  # many ties
  x[rng.random(x.shape) < 0.1] = np.inf  # dropped rows' values
  np.testing.assert_array_equal(jax.jit(robust_mean.sorted_rows)(x), np.sort(x, axis=0))
