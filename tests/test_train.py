"""Tests jaxshape/train.py: the step, epochs over every example, fit under vmap."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import train

N = 70  # not a multiple of the batch size: the last batch is partial


@pytest.fixture(scope="module")
def data():
  kx, kn = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (N, 6))
  y = (x[:, 0] + 0.3 * jax.random.normal(kn, (N,)) > 0).astype(jnp.int32)
  return {"x": x, "y": y}


def _spec(defense="vanilla", **kw):
  kw = {"optimizer": "sgd", "batch_size": 16, "epochs": 3} | kw
  return train.TrainSpec(models.ClassifierLoss(models.LR(2)), defense=defense, **kw)


def test_epoch_visits_every_example_once(data):
  idx, mask = train.epoch_batches(jax.random.key(1), N, 16)
  assert idx.shape == (5, 16)
  real = np.asarray(idx)[np.asarray(mask) > 0]
  assert sorted(real.tolist()) == list(range(N))


def test_partial_batch_is_trained_on(data):
  spec = _spec(epochs=1)
  seen = lambda params, batch: jnp.sum(batch["mask"])
  result = train.fit(
    spec, train.HParams.create(0.1), jax.random.key(0), data, batch_metrics_fn=seen
  )
  # Mean over 5 batches of the number of real examples per batch = N / 5.
  np.testing.assert_allclose(result.records["batch_metrics"][0], N / 5)


def test_fit_learns_and_records(data):
  spec = _spec(epochs=20)
  ev = train.evaluator(spec.model, data["x"], data["y"])
  result = jax.jit(functools.partial(train.fit, spec, eval_fn=ev))(
    train.HParams.create(0.5), jax.random.key(0), data
  )
  for name in ("train_loss", "norm_mean", "frac_clipped", "test_acc", "num_nonfinite"):
    assert result.records[name].shape == (20,)
  assert result.records["test_acc"][-1] > 0.85
  assert result.records["train_loss"][-1] < result.records["train_loss"][0]


def test_dp_without_noise_and_huge_clip_equals_vanilla(data):
  hp = train.HParams.create(0.3, 1e9, 0.0)
  key = jax.random.key(4)
  vanilla = train.fit(_spec("vanilla"), hp, key, data)
  dp = train.fit(_spec("dp"), hp, key, data)
  chex.assert_trees_all_close(vanilla.params, dp.params, rtol=1e-4, atol=1e-6)
  assert np.all(np.isfinite(dp.records["norm_mean"]))
  assert np.all(np.isnan(vanilla.records["norm_mean"]))


@pytest.mark.parametrize("defense", ["dp", "adaptive"])
def test_vmapped_grid_equals_separate_runs(data, defense):
  spec = _spec(defense, optimizer="adam")
  hp = train.HParams.create(
    jnp.full(4, 0.05), jnp.array([0.1, 1.0, 0.5, 4.0]), jnp.array([0.0, 0.5, 1.0, 0.1])
  )
  keys = jax.random.split(jax.random.key(2), 4)
  fit = functools.partial(train.fit, spec)
  grid = jax.jit(jax.vmap(fit, in_axes=(0, 0, None)))(hp, keys, data)
  for i in range(4):
    one = jax.jit(fit)(jax.tree.map(lambda a, i=i: a[i], hp), keys[i], data)
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, i=i: a[i], grid.params), one.params, rtol=1e-4, atol=1e-6
    )


def test_clipping_statistics_and_noise_change_training(data):
  hp_small = train.HParams.create(0.1, 0.01, 0.0)
  result = train.fit(_spec("dp"), hp_small, jax.random.key(0), data)
  np.testing.assert_allclose(result.records["frac_clipped"], 1.0)
  noisy = train.fit(_spec("dp"), train.HParams.create(0.1, 0.01, 1.0), jax.random.key(0), data)
  assert not np.allclose(noisy.params["head"]["kernel"], result.params["head"]["kernel"])


def test_fine_tune_starts_from_given_params(data):
  spec = _spec(epochs=0)
  start = models.init_params(spec.model, jax.random.key(9), (6,))
  result = train.fit(spec, train.HParams.create(0.1), jax.random.key(0), data, init_params=start)
  chex.assert_trees_all_equal(result.params, start)


def test_nan_example_does_not_reach_dp_update(data):
  bad = dict(data)
  bad["x"] = data["x"].at[3, 0].set(jnp.nan)
  result = train.fit(
    _spec("dp", epochs=2), train.HParams.create(0.1, 1.0, 0.1), jax.random.key(0), bad
  )
  chex.assert_tree_all_finite(result.params)
  np.testing.assert_array_equal(result.records["num_nonfinite"], [1, 1])


def test_accuracy_in_chunks_equals_whole(data):
  model = models.LR(2)
  params = models.init_params(model, jax.random.key(0), (6,))
  whole = train.accuracy(model, params, data["x"], data["y"], chunk=1000)
  chunked = train.accuracy(model, params, data["x"], data["y"], chunk=16)
  np.testing.assert_allclose(whole, chunked)


@pytest.mark.parametrize(
  "kw,name",
  [
    ({"defense": "magic"}, "defense"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"batch_size": 0}, "batch_size"),
  ],
)
def test_bad_spec(kw, name):
  with pytest.raises(ValueError, match=name):
    _spec(**kw)


@pytest.mark.parametrize("defense", ["vanilla", "dp", "adaptive"])
def test_padding_is_never_drawn_and_changes_nothing(data, defense):
  """A set padded with masked rows trains exactly as if the rows held anything else."""
  pad = 40
  mask = jnp.concatenate([jnp.ones(N), jnp.zeros(pad)])
  x = jnp.concatenate([data["x"], jnp.zeros((pad, 6))])
  y = jnp.concatenate([data["y"], jnp.zeros(pad, jnp.int32)])
  garbage_x = x.at[N:].set(1e3)
  spec = _spec(defense, epochs=2, optimizer="adam")
  hp = train.HParams.create(0.05, 1.0, 0.3)
  drawn = lambda params, batch: jnp.sum(batch["mask"] * (batch["x"][:, 0] > 100))
  a = train.fit(spec, hp, jax.random.key(0), {"x": x, "y": y, "mask": mask}, batch_metrics_fn=drawn)
  b = train.fit(spec, hp, jax.random.key(0), {"x": garbage_x, "y": y, "mask": mask})
  chex.assert_trees_all_equal(a.params, b.params)
  np.testing.assert_array_equal(a.records["batch_metrics"], 0.0)
  # Only steps with real examples count: ceil(70 / 16) = 5 per epoch, not ceil(110 / 16) = 7.
  np.testing.assert_array_equal(a.records["step"], [5, 10])
