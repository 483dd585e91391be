"""Tests jaxshape/analysis.py: subset mean gradients, ratio/cosine, PCA, KMeans."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import analysis
from jaxshape import grads
from jaxshape import models


def test_subset_mean_grads_equal_mean_of_per_example_grads():
  model = models.MLP(num_classes=3, hidden=(8,))
  params = models.init_params(model, jax.random.key(0), (5,))
  loss_fn = models.ClassifierLoss(model)
  x = jax.random.normal(jax.random.key(1), (10, 5))
  y = jnp.arange(10) % 3
  is_poison = jnp.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 0], jnp.float32)
  mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
  batch = {"x": x, "y": y, "is_poison": is_poison, "mask": mask}
  got = analysis.subset_mean_grads(loss_fn, params, batch)
  pe = grads.per_example_grads(loss_fn, params, {"x": x, "y": y})
  for name, sel in (("clean", (1 - is_poison) * mask), ("poison", is_poison * mask)):
    want = jax.tree.map(lambda g, s=sel: jnp.tensordot(s, g, 1) / s.sum(), pe)
    chex.assert_trees_all_close(got[name], want, rtol=1e-5, atol=1e-7)
  assert float(got["n_clean"]) == 5 and float(got["n_poison"]) == 3


def test_ratio_and_cosine():
  a = {"w": jnp.array([1.0, 0.0])}
  b = {"w": jnp.array([0.0, 3.0])}
  ratio, cos = analysis.ratio_and_cosine(a, b)
  np.testing.assert_allclose([ratio, cos], [3.0, 0.0], atol=1e-7)
  ratio, cos = analysis.ratio_and_cosine(a, {"w": jnp.array([-2.0, 0.0])})
  np.testing.assert_allclose([ratio, cos], [2.0, -1.0], atol=1e-7)


def test_pca_finds_the_main_axis():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])
  z, comps, _ = analysis.pca_2d(x)
  assert abs(abs(float(comps[0, 0])) - 1) < 1e-3
  assert z.shape == (500, 2)


def test_kmeans_separates_two_blobs_and_counts_distinct():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 0.1, (30, 2)), rng.normal(5, 0.1, (20, 2))]).astype(np.float32)
  _, assign = analysis.kmeans(jax.random.key(0), jnp.asarray(x), 2)
  sizes = sorted(np.bincount(np.asarray(assign)).tolist())
  assert sizes == [20, 30]
  assert analysis.count_distinct(np.repeat(x[:3], 10, axis=0)) == 3
