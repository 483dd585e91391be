"""Tests jaxshape/batching.py: example counts, the shuffled order, epochs of fixed-shape batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import batching

N = 70  # not a multiple of the batch size: the last batch is partial


def test_num_examples_counts_index_not_pool():
  pool = {"x": jnp.zeros((86, 5)), "y": jnp.zeros(86, jnp.int32)}
  pooled = {**pool, "index": jnp.arange(62), "mask": jnp.ones(62)}
  assert batching.num_examples(pooled) == 62
  assert batching.num_examples(pool) == 86


def test_epoch_visits_every_example_once():
  idx, mask = batching.epoch_batches(jax.random.key(1), N, 16)
  assert idx.shape == (5, 16)
  real = np.asarray(idx)[np.asarray(mask) > 0]
  assert sorted(real.tolist()) == list(range(N))


def test_steps_per_epoch_counts_real_examples_only():
  x, y = jnp.zeros((110, 2)), jnp.zeros(110, jnp.int32)
  assert batching.steps_per_epoch({"x": x, "y": y}, 16) == 7
  mask = jnp.concatenate([jnp.ones(70), jnp.zeros(40)])
  assert int(batching.steps_per_epoch({"x": x, "y": y, "mask": mask}, 16)) == 5


@pytest.mark.parametrize("n", [1, 2, 7, 300, 15_120])
def test_shuffled_order_is_a_permutation_valid_first(n):
  valid = (jax.random.uniform(jax.random.key(n), (n,)) < 0.7).astype(jnp.float32)
  order = np.asarray(batching.shuffled_order(jax.random.key(1), valid))
  assert sorted(order.tolist()) == list(range(n))
  k = int(valid.sum())
  assert np.all(np.asarray(valid)[order[:k]] > 0)
  assert np.all(np.asarray(valid)[order[k:]] == 0)


def test_shuffled_order_is_uniform():
  """Each of 5 examples lands in each of 5 places with probability 1/5 (4,000 keys)."""
  keys = jax.random.split(jax.random.key(0), 4000)
  orders = np.asarray(jax.vmap(lambda k: batching.shuffled_order(k, jnp.ones([5])))(keys))
  counts = np.stack([(orders == i).sum(0) for i in range(5)])  # [example, place]
  expected = 4000 / 5
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 42.0  # chi-square, 16 dof: P(chi2 > 42) ~ 4e-4 for a uniform shuffle
  # All 120 orders occur (each has probability 1/120 per key: 4,000 keys miss
  # one with probability ~ 120 e^-33), and one key gives one order.
  assert len({tuple(o) for o in orders}) == 120
  np.testing.assert_array_equal(
    batching.shuffled_order(keys[3], jnp.ones([5])), batching.shuffled_order(keys[3], jnp.ones([5]))
  )


def test_poisson_batches_sample_each_example_with_probability_b_over_n():
  n, b = 200, 20
  valid = jnp.ones([n]).at[-10:].set(0.0)  # 190 real examples, 10 padding rows
  m = batching.poisson_max_batch(b)
  keys = jax.random.split(jax.random.key(3), 50)
  idx, mask = jax.vmap(lambda k: batching.poisson_batches(k, valid, b))(keys)
  assert idx.shape == (50, n // b, m) and mask.shape == (50, n // b, m)
  taken = np.zeros(n)
  np.add.at(taken, np.asarray(idx)[np.asarray(mask) > 0], 1)
  draws = 50 * (n // b)
  assert taken[-10:].sum() == 0  # padding is never drawn
  q = b / 190
  # Each real example is in a step with probability q: counts ~ Binomial(draws, q).
  np.testing.assert_allclose(taken[:190].mean() / draws, q, rtol=0.05)
  assert taken[:190].std() / draws < 3 * np.sqrt(q * (1 - q) / draws)
  sizes = np.asarray(mask).sum(-1).ravel()
  np.testing.assert_allclose(sizes.mean(), b, rtol=0.05)
  assert sizes.std() > 2  # a Binomial batch size, not a fixed one
  # Within a step an example appears at most once.
  for i, k in zip(np.asarray(idx)[0], np.asarray(mask)[0], strict=True):
    assert len(set(i[k > 0])) == int(k.sum())
