"""Tests jaxshape/train.py's pooled training sets (`data["index"]`): fit and vmapped grids."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import train

N_CLEAN, P_MAX, V = 50, 12, 3  # clean points, poisons per variant, variants


@pytest.fixture(scope="module")
def pool():
  kx, kp = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (N_CLEAN + V * P_MAX, 5))
  y = (x[:, 0] > 0).astype(jnp.int32)
  return {"x": x, "y": y}


def _spec(defense):
  loss = models.ClassifierLoss(models.LR(2))
  return train.TrainSpec(loss, optimizer="adam", defense=defense, batch_size=16, epochs=3)


def _job_data(pool, variant, n_poisons):
  rows = N_CLEAN + variant * P_MAX + jnp.arange(P_MAX)
  active = (jnp.arange(P_MAX) < n_poisons).astype(jnp.float32)
  mask = jnp.concatenate([jnp.ones([N_CLEAN]), active])
  index = jnp.concatenate([jnp.arange(N_CLEAN), rows])
  copied = {k: v[index] for k, v in pool.items()} | {"mask": mask}
  return copied, {**pool, "index": index, "mask": mask}


@pytest.mark.parametrize("defense", ["vanilla", "dp"])
def test_pooled_fit_equals_fit_on_the_copied_set(pool, defense):
  spec = _spec(defense)
  hp = train.HParams.create(0.05, 1.0, 0.5)
  fit = jax.jit(functools.partial(train.fit, spec))
  copied, pooled = _job_data(pool, 2, 7)
  a = fit(hp, jax.random.key(3), copied)
  b = fit(hp, jax.random.key(3), pooled)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(a.records, b.records, rtol=1e-6, atol=1e-7)


def test_pooled_grid_under_vmap_uses_each_jobs_poisons(pool):
  """Jobs differing only in variant train on different poisons (the pool is shared)."""
  spec = _spec("vanilla")
  hp = train.HParams.create(0.05)

  def job(variant, n_poisons):
    rows = N_CLEAN + variant * P_MAX + jnp.arange(P_MAX)
    data = {
      **pool,
      "index": jnp.concatenate([jnp.arange(N_CLEAN), rows]),
      "mask": jnp.concatenate([jnp.ones([N_CLEAN]), (jnp.arange(P_MAX) < n_poisons) * 1.0]),
    }
    return train.fit(spec, hp, jax.random.key(0), data).params

  grid = jax.jit(jax.vmap(job))(jnp.arange(V), jnp.array([12, 12, 0]))
  for v, count in enumerate([12, 12, 0]):
    single = jax.jit(job)(v, count)
    chex.assert_trees_all_close(
      jax.tree.map(lambda g, v=v: g[v], grid), single, rtol=1e-5, atol=1e-6
    )
  leaves = jax.tree.leaves(grid)
  assert not np.allclose(leaves[0][0], leaves[0][1])
