"""Tests jaxshape/train.py: the step, epochs over every example, fit under vmap."""

import functools
import math

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


@pytest.mark.parametrize("clip", [1e9, math.inf])
def test_dp_without_noise_and_huge_clip_equals_vanilla(data, clip):
  # sigma = 0 is no noise even with C = inf (sigma * C would be NaN).
  hp = train.HParams.create(0.3, clip, 0.0)
  key = jax.random.key(4)
  vanilla = train.fit(_spec("vanilla"), hp, key, data)
  dp = train.fit(_spec("dp"), hp, key, data)
  chex.assert_trees_all_close(vanilla.params, dp.params, rtol=1e-4, atol=1e-6)
  assert np.all(np.isfinite(dp.records["norm_mean"]))
  assert np.all(np.isnan(vanilla.records["norm_mean"]))


def test_vanilla_with_norms_is_dp_with_infinite_clip_and_no_noise(data):
  """The same code: bit-identical parameters and records, and close to plain vanilla."""
  key = jax.random.key(4)
  tracked = train.fit(
    _spec("vanilla", track_norms=True), train.HParams.create(0.3, 0.5, 2.0), key, data
  )
  dp = train.fit(_spec("dp"), train.HParams.create(0.3, math.inf, 0.0), key, data)
  plain = train.fit(_spec("vanilla"), train.HParams.create(0.3), key, data)
  chex.assert_trees_all_equal(tracked, dp)
  chex.assert_trees_all_close(tracked.params, plain.params, rtol=1e-5, atol=1e-6)
  assert np.all(tracked.records["norm_mean"] > 0)
  np.testing.assert_array_equal(tracked.records["frac_clipped"], 0.0)  # vanilla clips nothing


def test_fit_builds_the_optimizer_once(data, monkeypatch):
  calls = []
  real = train.make_optimizer
  monkeypatch.setattr(train, "make_optimizer", lambda *a: calls.append(1) or real(*a))
  train.fit(
    _spec("adaptive", epochs=2), train.HParams.create(0.1, 1.0, 0.5), jax.random.key(0), data
  )
  assert len(calls) == 1


@pytest.mark.parametrize("defense", ["dp", "adaptive"])
def test_norm_statistics_reach_the_records(data, defense):
  """Records hold the epoch means of each step's statistics, computed once in the step."""
  spec = _spec(defense, epochs=1, batch_size=N)  # one step: the epoch mean is that step's
  hp = train.HParams.create(0.1, 0.05, 0.0)
  params = models.init_params(spec.model, jax.random.key(0), (6,))
  result = train.fit(spec, hp, jax.random.key(1), data, init_params=params)
  norms = jnp.stack(
    [
      jnp.sqrt(
        sum(
          jnp.sum(g**2)
          for g in jax.tree.leaves(
            jax.grad(spec.loss_fn)(params, {"x": data["x"][i : i + 1], "y": data["y"][i : i + 1]})
          )
        )
      )
      for i in range(N)
    ]
  )
  np.testing.assert_allclose(result.records["norm_mean"][0], jnp.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(result.records["norm_max"][0], jnp.max(norms), rtol=1e-5)
  np.testing.assert_allclose(result.records["frac_clipped"][0], jnp.mean(norms > 0.05), rtol=1e-6)


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
    ({"batch_size": 1.5}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"epochs": -1}, "epochs"),
    ({"epochs": 2.0}, "epochs"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.5}, "momentum"),
    ({"track_norms": "yes"}, "track_norms"),
  ],
)
def test_bad_spec(kw, name):
  with pytest.raises(ValueError, match=name):
    _spec(**kw)


@pytest.mark.parametrize(
  "loss_fn", [None, "ClassifierLoss", lambda params, batch: 0.0], ids=["none", "str", "ok"]
)
def test_spec_loss_fn_must_be_a_hashable_callable(loss_fn):
  if callable(loss_fn):
    train.TrainSpec(loss_fn)
    with pytest.raises(ValueError, match="hashable"):
      train.TrainSpec(_Unhashable())
  else:
    with pytest.raises(ValueError, match="loss_fn"):
      train.TrainSpec(loss_fn)


class _Unhashable:
  __hash__ = None

  def __call__(self, params, batch):
    return 0.0


@pytest.mark.parametrize(
  "args,name",
  [
    ((math.inf,), "learning_rate"),
    ((math.nan,), "learning_rate"),
    ((-0.1,), "learning_rate"),
    ((0.1, 0.0), "l2_norm_clip"),
    ((0.1, -1.0), "l2_norm_clip"),
    ((0.1, math.nan), "l2_norm_clip"),
    ((0.1, 1.0, -0.5), "noise_multiplier"),
    ((0.1, 1.0, math.inf), "noise_multiplier"),
    ((0.1, np.array([1.0, 0.0]), 0.0), "l2_norm_clip"),  # one bad row of a grid
  ],
)
def test_bad_hparams(args, name):
  with pytest.raises(ValueError, match=name):
    train.HParams.create(*args)


def test_hparams_create_accepts_traced_values():
  hp = jax.jit(lambda lr: train.HParams.create(lr, math.inf, 0.0))(jnp.asarray(0.1))
  np.testing.assert_allclose(hp.learning_rate, 0.1)


def test_fit_rejects_bad_inputs(data):
  spec, key = _spec("dp", epochs=1), jax.random.key(0)
  hp = train.HParams.create(0.1, 1.0, 0.5)
  with pytest.raises(ValueError, match="l2_norm_clip = inf"):
    train.fit(spec, train.HParams.create(0.1, math.inf, 0.5), key, data)
  with pytest.raises(ValueError, match="noise_multiplier"):  # HParams built without create
    train.fit(spec, train.HParams(*map(jnp.asarray, (0.1, 1.0, math.inf))), key, data)
  with pytest.raises(ValueError, match="N = 0"):
    train.fit(spec, hp, key, {"x": jnp.zeros((0, 6)), "y": jnp.zeros(0, jnp.int32)})
  with pytest.raises(ValueError, match="mask"):
    train.fit(spec, hp, key, data | {"mask": jnp.zeros(N)})
  with pytest.raises(ValueError, match="dict with x"):
    train.fit(spec, hp, key, {"x": data["x"]})
  with pytest.raises(ValueError, match="HParams"):
    train.fit(spec, (0.1, 1.0, 0.5), key, data)
  # Adaptive noise scales with the norms, not C: C = inf with sigma > 0 is valid there.
  train.fit(_spec("adaptive", epochs=1), train.HParams.create(0.1, math.inf, 0.5), key, data)


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


def _stacked_epoch(spec, hp, optimizer, state, data, key, batch_metrics_fn):
  """The former `train_epoch`: stack every step's outputs over the scan, then average."""
  idx_SB, mask_SB = train.epoch_batches(key, data["mask"], spec.batch_size)

  def body(state, xs):
    idx_B, mask_B = xs
    batch = {k: v[idx_B] for k, v in data.items() if k != "mask"}
    batch["mask"] = mask_B
    extra = batch_metrics_fn(state.params, batch)
    new_state, metrics = train.train_step(spec, hp, optimizer, state, batch)
    has_real = jnp.any(mask_B > 0)
    new_state = jax.tree.map(lambda a, b: jnp.where(has_real, a, b), new_state, state)
    return new_state, (metrics, extra)

  state, (metrics_S, extra_S) = jax.lax.scan(body, state, (idx_SB, mask_SB))
  real_S = jnp.any(mask_SB > 0, axis=1).astype(jnp.float32)

  def mean(m_S):
    w_S = real_S.reshape((-1,) + (1,) * (m_S.ndim - 1))
    return jnp.sum(jnp.where(w_S > 0, m_S, 0) * w_S, axis=0) / jnp.sum(real_S)

  return state, jax.tree.map(mean, metrics_S), jax.tree.map(mean, extra_S), metrics_S


@pytest.mark.parametrize("defense", ["vanilla", "dp"])
def test_epoch_sums_in_carry_equal_stacked_mean(data, defense):
  """Accumulating in the scan carry gives the mean of the stacked per-step outputs.

  The set is padded (40 masked rows: steps 6-7 of 7 hold no real example) and
  the batch metric is a pytree with a NaN on padded steps, which must not leak.
  """
  pad = 40
  padded = {
    "x": jnp.concatenate([data["x"], jnp.zeros((pad, 6))]),
    "y": jnp.concatenate([data["y"], jnp.zeros(pad, jnp.int32)]),
    "mask": jnp.concatenate([jnp.ones(N), jnp.zeros(pad)]),
  }
  spec = _spec(defense, epochs=1, optimizer="adam", track_norms=True)
  hp = train.HParams.create(0.05, 1.0, 0.3)
  loss_fn = spec.loss_fn

  def metrics_fn(params, batch):
    grad = jax.grad(loss_fn)(params, batch)
    real = jnp.sum(batch["mask"])
    return {
      "grad": grad,
      "real": real,
      "nan_if_empty": jnp.where(real > 0, jnp.sum(batch["x"] * batch["mask"][:, None]), jnp.nan),
    }

  params = models.init_params(spec.model, jax.random.key(3), (6,))
  steps = train.steps_per_epoch(padded, spec.batch_size)
  optimizer = train.make_optimizer(spec, hp, jax.random.key(5), steps)
  state = train.init_state(optimizer, params)
  key = jax.random.key(6)
  got_state, got_metrics, got_extra = jax.jit(
    lambda s: train.train_epoch(spec, hp, optimizer, s, padded, key, metrics_fn)
  )(state)
  want_state, want_metrics, want_extra, metrics_S = jax.jit(
    lambda s: _stacked_epoch(spec, hp, optimizer, s, padded, key, metrics_fn)
  )(state)
  assert metrics_S.loss.shape == (7,)  # 5 real steps, 2 padded
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(
    got_metrics._replace(num_nonfinite=0), want_metrics._replace(num_nonfinite=0), rtol=1e-5
  )
  assert int(got_metrics.num_nonfinite) == int(jnp.sum(metrics_S.num_nonfinite)) == 0
  chex.assert_tree_all_finite(got_extra)
  chex.assert_trees_all_close(got_extra, want_extra, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_extra["real"], N / 5, rtol=1e-6)


def test_poisson_sampling_trains_and_differs_from_shuffling(data):
  hp = train.HParams.create(0.5, 1.0, 0.0)
  poisson = train.fit(_spec("dp", epochs=20, sampling="poisson"), hp, jax.random.key(0), data)
  again = train.fit(_spec("dp", epochs=20, sampling="poisson"), hp, jax.random.key(0), data)
  shuffled = train.fit(_spec("dp", epochs=20), hp, jax.random.key(0), data)
  chex.assert_trees_all_equal(poisson.params, again.params)
  assert not np.allclose(poisson.records["train_loss"], shuffled.records["train_loss"])
  assert poisson.records["train_loss"][-1] < 0.7 * poisson.records["train_loss"][0]
  with pytest.raises(ValueError, match="sampling"):
    _spec(sampling="uniform")
