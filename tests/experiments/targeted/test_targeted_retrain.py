"""Tests of experiments/targeted/retrain.py: the shared shuffling (controls are the poisoned
runs without the poison), poisons in displaced slots, rounds, vmapped = separate runs."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments.targeted import config as config_lib
from experiments.targeted import crafting
from experiments.targeted import retrain
from experiments.targeted import setups
from jaxshape import models
from jaxshape import sweep


@pytest.fixture(scope="module")
def world():
  """A 3-class synthetic setup: 120 training points of 6 features, two targets of class 0,
  two poisons each (toward class 1), a vanilla and a clip arm."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(120, 6)).astype(np.float32)
  y = (np.arange(120) % 3).astype(np.int32)
  ds = types.SimpleNamespace(x_train=x, y_train=y, x_test=x[:30], y_test=y[:30], num_classes=3)
  config = dataclasses.replace(
    config_lib.SMOKE,
    target_class=0,
    base_class=1,
    max_train=None,
    max_test=None,
    hidden=(5,),
    batch_size=20,
    retrain_epochs=3,
    attempts=2,
  )
  ctx = setups.make_context(config, setups.Setup("synthetic", "mlp", "synthetic:mlp"), ds)
  params = models.init_params(ctx.model, jax.random.key(1), (6,))
  params = jax.tree.map(np.asarray, params)
  targets = np.asarray([0, 3], np.int32)
  c = crafting.Crafted(
    targets,
    rng.uniform(size=(2, 2, 6)).astype(np.float32),
    np.full((2, 2), -1, np.int32),
    np.asarray([[0.1, 0.2], [0.3, 0.4]], np.float32),
    np.asarray([2, 1], np.int32),
  )
  arms = retrain.make_arms("standard", [common.VANILLA, common.Defense("dp", 1.0, 0.0)])
  pre = {(a.pre, 0): params for a in arms}
  crafted = {("poison_frogs", m): c for m in range(len(arms))}
  margins = {k: np.zeros(2, np.float32) for k in pre}
  plan = retrain.make_plan(ctx, config, arms, [0], pre, crafted, margins)
  return ctx, config, plan


def _run(world, job):
  ctx, config, plan = world
  program = jax.jit(retrain.build_program(ctx, config)(job.group))
  values = {k: jnp.float32(v) for k, v in job.values.items()}
  return jax.tree.map(np.asarray, program(values, jax.random.key(job.seed), plan.shared))


def test_poisons_take_displaced_slots_and_controls_are_the_clean_set(world):
  ctx, _, plan = world
  n = ctx.x.shape[0]
  shared = jax.tree.map(jnp.asarray, plan.shared)
  clean = retrain.training_set(shared, n, 1, 0)["index"]
  np.testing.assert_array_equal(clean, np.arange(n))
  poisoned = np.asarray(retrain.training_set(shared, n, 1, 1)["index"])
  changed = np.flatnonzero(poisoned != np.arange(n))
  slot = plan.shared["displace_P"][0]
  assert changed.tolist() == [slot]
  assert ctx.y[slot] not in (0, 1)  # never a target- or base-class point
  p = plan.shared["base_VP"].shape[1]
  row = poisoned[slot]
  assert row == n + 1 * p
  np.testing.assert_array_equal(plan.shared["pool_x"][row], plan.shared["pool_x"][n:][p])
  assert plan.shared["pool_y"][row] == 1


def test_control_is_bitwise_the_poisoned_run_without_its_poison(world):
  ctx, _, plan = world
  arm = plan.arms[1]  # clip C = 1: the noise key is shared too
  (control,) = [j for j in retrain.control_jobs(plan, ctx) if j.values["model"] == 1]
  same = retrain.job(plan, ctx, arm, 0, 2, 0, {"attack": "x"})
  assert control.seed == same.seed
  a, b = _run(world, control), _run(world, same)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  poisoned = _run(world, retrain.job(plan, ctx, arm, 0, 2, 1, {"attack": "x"}))
  assert not np.array_equal(poisoned["margin_T"], a["margin_T"])


def test_attack_jobs_cover_every_usable_attempt_with_one_key(world):
  ctx, config, plan = world
  jobs = retrain.attack_jobs(plan, ctx, config)
  # Target 0 has two usable poisons, target 3 one; two arms.
  got = sorted((j.key["defense"], j.key["target_index"], j.key["attempt"]) for j in jobs)
  assert got == sorted((d, t, a) for d in ("vanilla", "dp") for t, a in ((0, 0), (0, 1), (3, 0)))
  controls = retrain.control_jobs(plan, ctx)
  assert {j.seed for j in jobs + controls} == {retrain.RETRAIN_SEED}
  multi = retrain.attack_jobs(plan, ctx, dataclasses.replace(config, mode="multipoison"))
  assert all(j.key["n_poisons"] <= 2 for j in multi)


def test_vmapped_attempts_equal_separate_runs(world, tmp_path):
  ctx, config, plan = world
  jobs = [j for j in retrain.attack_jobs(plan, ctx, config) if j.group == "vanilla"]
  outputs = {}

  def to_rows(job, out):
    outputs[job.key["target_index"], job.key["attempt"]] = out
    return [{"target_index": job.key["target_index"]}]

  sweep.run(
    retrain.build_program(ctx, config),
    jobs,
    tmp_path / "a.csv",
    to_rows=to_rows,
    columns=retrain.ATTEMPT_COLUMNS,
    progress=False,
    shared=plan.shared,
  )
  for job in jobs:
    alone = _run(world, job)
    for k in alone:
      got = outputs[job.key["target_index"], job.key["attempt"]][k]
      np.testing.assert_allclose(got, alone[k], atol=1e-5)


def test_displaced_points_avoid_classes_and_are_fixed():
  y = np.arange(100) % 5
  idx = retrain.displaced_points(y, 8, (3, 4))
  assert not np.isin(y[idx], [3, 4]).any() and len(set(idx.tolist())) == 8
  np.testing.assert_array_equal(retrain.displaced_points(y, 8, (3, 4)), idx)
  with pytest.raises(ValueError, match="to displace"):
    retrain.displaced_points(y, 100, (3, 4))


def test_arms_pair_defenses_by_scenario():
  dp = common.Defense("dp", 4.0, 0.01)
  grid = [common.VANILLA, dp]
  assert [tuple(a) for a in retrain.make_arms("standard", grid)] == [
    (common.VANILLA, common.VANILLA),
    (dp, dp),
  ]
  assert [a.key for a in retrain.make_arms("vanilla_then_dp", grid)] == grid
  assert [a.pre for a in retrain.make_arms("dp_then_vanilla", grid)] == grid
  assert [a.key for a in retrain.make_arms("dp_then_vanilla", grid)] == grid
