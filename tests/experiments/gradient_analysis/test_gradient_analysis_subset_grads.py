"""Tests experiments/gradient_analysis/subset_grads.py: per-batch clean / poison gradients
(raw and per-example clipped) and their per-epoch means (PROTOCOL.md, "Gradient artifacts")."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gradient_analysis as ga
from jaxshape import analysis
from jaxshape import grads
from jaxshape import models


def _lr_batch():
  model = models.LR(2)
  params = models.init_params(model, jax.random.key(0), (6,))
  x = jax.random.uniform(jax.random.key(1), (8, 6))
  batch = {
    "x": x,
    "y": jnp.arange(8) % 2,
    "is_poison": jnp.array([0, 0, 1, 0, 1, 0, 0, 0], jnp.float32),
    "mask": jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32),
  }
  return models.ClassifierLoss(model), params, batch


@pytest.mark.parametrize("jit", [True, False])
def test_clipped_measure_clips_each_example(jit):
  loss_fn, params, batch = _lr_batch()

  def measure(kind, clip):
    fn = lambda p, b: ga.subset_batch_grads(loss_fn, kind, clip, p, b)
    return jax.jit(fn)(params, batch) if jit else fn(params, batch)

  raw = measure("raw", jnp.inf)
  chex.assert_trees_all_close(measure("clipped", jnp.inf), raw, rtol=1e-5, atol=1e-7)
  pe = grads.per_example_grads(loss_fn, params, batch)
  norms = np.asarray(grads.per_example_norms(pe))
  clip = float(np.median(norms[:7]))
  got = measure("clipped", clip)
  factor = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
  for part, sel in (
    ("clean", (1 - batch["is_poison"]) * batch["mask"]),
    ("poison", batch["is_poison"] * batch["mask"]),
  ):
    w = np.asarray(sel) * factor / np.sum(sel)
    want = jax.tree.map(lambda g, w=w: jnp.tensordot(jnp.asarray(w, jnp.float32), g, 1), pe)
    chex.assert_trees_all_close(got[part], want, rtol=1e-4, atol=1e-6)
    assert analysis.ratio_and_cosine(want, want)[0] == pytest.approx(1.0)
  assert float(got["has_clean"]) == 1 and float(got["has_poison"]) == 1


def test_epoch_mean_skips_batches_without_poisons():
  # Three batches; the poison is in one. The epoch's poison mean must be that
  # batch's mean, not a third of it (train.fit averages over all batches).
  loss_fn, params, batch = _lr_batch()
  with_poison = ga.subset_batch_grads(loss_fn, "raw", jnp.inf, params, batch)
  clean_only = ga.subset_batch_grads(
    loss_fn, "raw", jnp.inf, params, {**batch, "is_poison": jnp.zeros(8, jnp.float32)}
  )
  assert float(clean_only["has_poison"]) == 0
  epoch = jax.tree.map(lambda a, b: (a + 2 * b) / 3, with_poison, clean_only)
  got = ga.epoch_artifacts(epoch)
  want_poison = analysis.subset_mean_grads(loss_fn, params, batch)["poison"]
  np.testing.assert_allclose(
    got["poison_norm_all"],
    jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(want_poison))),
    rtol=1e-5,
  )
