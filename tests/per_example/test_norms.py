"""Tests jaxshape/per_example/_norms.py: norms without overflow (issue 13), and the engine's."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxshape
from jaxshape import models
from jaxshape.per_example import _norms


def test_safe_norms_do_not_overflow_or_underflow():
  x = np.array([[3e20, 4e20, 0.0], [3e-30, 4e-30, 0.0], [0.0, 0.0, 0.0], [np.nan, 1.0, 1.0]])
  got = np.asarray(_norms.safe_norms(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got[:3], [5e20, 5e-30, 0.0], rtol=1e-6)
  assert np.isnan(got[3])
  np.testing.assert_allclose(
    _norms.combine([jnp.array([3e30]), jnp.array([4e30])]), [5e30], rtol=1e-6
  )


def test_engine_norm_of_huge_finite_gradient_is_finite_and_exact():
  model = models.LR(num_classes=2)
  loss_fn = models.ClassifierLoss(model)
  params = models.init_params(model, jax.random.key(0), (4,))
  params = jax.tree.map(jnp.zeros_like, params)  # softmax 1/2 each: delta = +-1/2
  x = np.array([[1e20, 2e20, 0.0, 2e20], [1.0, 0.0, 0.0, 0.0]], np.float32)
  batch = {"x": jnp.asarray(x), "y": jnp.array([0, 1])}
  cs = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, 1.0, method="fast")
  # |g| = |delta| sqrt(|x|^2 + 1) with |delta| = sqrt(2)/2: 3e20 / sqrt(2)
  np.testing.assert_allclose(cs.norms_B[0], 3e20 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(cs.norms_B[1], np.sqrt(2.0) / 2 * np.sqrt(2.0), rtol=1e-6)
  np.testing.assert_array_equal(cs.mask_B, [1.0, 1.0])
  clipped_kernel_0 = np.outer(x[0], [-0.5, 0.5]) / (3e20 / np.sqrt(2))
  want = clipped_kernel_0 + np.outer(x[1], [0.5, -0.5]) * min(1.0, 1.0 / 1.0)
  np.testing.assert_allclose(cs.sum["head"]["kernel"], want, rtol=1e-5, atol=1e-7)
