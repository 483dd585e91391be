"""Tests experiments/witches_brew on its smoke preset (real FashionMNIST, tiny): the CSV
schemas, budgets and clean labels exact, the control trained without any poison on the
poisoned victims' key, a summary that agrees with the rows, a rerun that trains nothing,
and bad configs refused before anything is written."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from experiments import common
from experiments import witches_brew
from experiments.witches_brew import config as config_lib
from experiments.witches_brew import experiment
from experiments.witches_brew import report
from experiments.witches_brew import victims
from jaxshape import data
from jaxshape import results


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  try:
    data.load("fashion_mnist", download=False)
  except FileNotFoundError as e:
    pytest.skip(f"FashionMNIST is not installed (make data): {e}")
  out = tmp_path_factory.mktemp("witches_brew")
  config = dataclasses.replace(witches_brew.PRESETS["smoke"], out=str(out), progress=False)
  return config, witches_brew.run(config)


def test_schema_and_one_row_per_target_seed_defense(smoke):
  config, out = smoke
  assert results.read_header(os.path.join(config.out, "results.csv")) == list(experiment.COLUMNS)
  header = results.read_header(os.path.join(config.out, "controls.csv"))
  assert header == list(experiment.CONTROL_COLUMNS)
  defenses = config_lib.defenses(config)
  keys = {(r["target_index"], r["defense"], r["noise_multiplier"], r["seed"]) for r in out["rows"]}
  assert len(out["rows"]) == len(keys) == config.targets * config.seeds * len(defenses)
  assert len(out["controls"]) == config.targets * config.seeds * len(defenses)
  for r in out["rows"]:
    assert r["n_poisons"] == config_lib.n_poisons(config) == round(config.budget * config.max_train)
    assert r["success"] in (0, 1) and r["control_success"] in (0, 1)
    assert 0.0 <= r["clean_acc"] <= 1.0 and -1.0 <= r["alignment"] <= 1.0
    assert (r["epsilon"] == float("inf")) == (r["defense"] == "vanilla")
  assert os.path.getsize(os.path.join(config.out, "summary.png")) > 5_000


def test_summary_agrees_with_rows(smoke):
  config, out = smoke
  for row in out["summary"]:
    rs = [r for r in out["rows"] if r["defense"] == row["defense"]
          and r["noise_multiplier"] == row["noise_multiplier"]]  # fmt: skip
    wins = sum(r["success"] for r in rs)
    assert row["n"] == len(rs) and row["successes"] == wins
    assert (row["success_low"], row["success_high"]) == results.wilson_interval(wins, len(rs))
    assert row["control_successes"] == sum(r["control_success"] for r in rs)
  assert report.summarise(out["rows"]) == out["summary"]


def test_budget_bound_and_clean_labels_exact(smoke):
  config, out = smoke
  s = experiment.setup(config)
  params_K = experiment.surrogates(config, s, common.ParamsCache(os.path.join(config.out, "cache")))
  for t in {r["target_index"] for r in out["rows"]}:
    brewed = experiment.brew_target(config, s, params_K, t)  # from the cache
    base_P = brewed["base_P"]
    assert base_P.size == config_lib.n_poisons(config) == len(set(base_P.tolist()))
    np.testing.assert_array_equal(s.y_N[base_P], config.adversarial_class)
    assert np.max(np.abs(brewed["x_P"] - s.x_N[base_P])) <= np.float32(config.epsilon)
    assert brewed["x_P"].min() >= 0.0 and brewed["x_P"].max() <= 1.0
    poisoned = experiment.poisoned_set(s, brewed)
    changed = np.flatnonzero(np.any(poisoned != s.x_N, axis=(1, 2, 3)))
    assert set(changed.tolist()) <= set(base_P.tolist()) and changed.size > 0


def test_control_is_the_clean_set_on_the_victims_key(smoke):
  config, out = smoke
  s = experiment.setup(config)
  defense = config_lib.defenses(config)[0]
  spec = experiment._spec(config, s, defense, config.epochs)
  key = jax.random.key(experiment.VICTIM_SEED)
  params = victims.train_victim(spec, experiment._hparams(config, defense), key, s.x_N, s.y_N)
  targets = np.asarray(sorted({r["target_index"] for r in out["rows"]}))
  logits = experiment.logits(s.model, params, s.x_test[targets])
  margin = logits[:, config.adversarial_class] - logits[:, config.target_class]
  for t, m in zip(targets, margin, strict=True):
    (row,) = [r for r in out["controls"] if r["target_index"] == t and defense.matches(
      {k: results.format_value(r[k]) for k in ("defense", "clip_norm", "noise_multiplier")})
      and r["seed"] == 0]  # fmt: skip
    np.testing.assert_allclose(row["control_adv_margin"], m, rtol=1e-5, atol=1e-5)


def test_targets_fit_the_margin_window_on_every_surrogate(smoke):
  config, _ = smoke
  s = experiment.setup(config)
  finals = experiment.final_surrogates(
    config, experiment.surrogates(config, s, common.ParamsCache(os.path.join(config.out, "cache")))
  )
  idx = np.flatnonzero(s.y_test == config.target_class)
  margin, correct = experiment.surrogate_margins(config, s, finals, idx)
  lo, hi = np.quantile(margin[correct], [0.3, 0.9])  # a window some correct targets fit
  windowed = dataclasses.replace(config, target_margin=(float(lo), float(hi)))
  chosen = experiment.choose_targets(windowed, s, finals)
  assert chosen.size == config.targets and len(set(chosen.tolist())) == chosen.size
  m, ok = experiment.surrogate_margins(config, s, finals, chosen)
  assert ok.all() and np.all((m > lo) & (m < hi))
  np.testing.assert_array_equal(s.y_test[chosen], config.target_class)
  with pytest.raises(ValueError, match="targets fit"):
    experiment.choose_targets(dataclasses.replace(config, target_margin=(1e6, 2e6)), s, finals)


def test_nearest_bases_are_the_nearest_points_of_the_adversarial_class(smoke):
  config, out = smoke
  s = experiment.setup(config)
  finals = experiment.final_surrogates(
    config, experiment.surrogates(config, s, common.ParamsCache(os.path.join(config.out, "cache")))
  )
  target = int(out["rows"][0]["target_index"])
  base_P = experiment.nearest_bases(config, s, finals, target)
  assert base_P.size == config_lib.n_poisons(config)
  np.testing.assert_array_equal(s.y_N[base_P], config.adversarial_class)
  feats = lambda x: np.asarray(experiment._features(s.model, finals[0], x))
  dist = np.linalg.norm(feats(s.x_N) - feats(s.x_test[target][None]), axis=1)
  others = np.setdiff1d(np.flatnonzero(s.y_N == config.adversarial_class), base_P)
  assert dist[base_P].max() <= dist[others].min() + 1e-5
  brewed = experiment.brew_target(config, s, finals, target)  # smoke: one surrogate, cached
  np.testing.assert_array_equal(np.sort(brewed["base_P"]), base_P)


def test_victim_augmentation_is_keyed(smoke):
  config, _ = smoke
  s = experiment.setup(config)
  spec = experiment._spec(config, s, common.VANILLA, 1)
  hp, key = experiment._hparams(config, common.VANILLA), jax.random.key(5)
  x, y = s.x_N[:200], s.y_N[:200]
  run = lambda shift: jax.tree.leaves(victims.train_victim(spec, hp, key, x, y, max_shift=shift))
  a, b, plain = run(2), run(2), run(None)
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)
  assert any(not np.allclose(u, w) for u, w in zip(a, plain, strict=True))


def test_rerun_trains_nothing(smoke):
  config, out = smoke
  path = os.path.join(config.out, "results.csv")
  before = open(path).read()
  again = witches_brew.run(config)
  assert open(path).read() == before and len(again["rows"]) == len(out["rows"])


@pytest.mark.parametrize(
  "change, match",
  [
    ({"adversarial_class": 0}, "must differ"),
    ({"budget": 0.0}, "budget"),
    ({"surrogate_checkpoints": (5,)}, "surrogate_checkpoints"),
    ({"target_margin": (-3.0, -8.0)}, "target_margin"),
    ({"target_margin": (-3.0,)}, "target_margin"),
    ({"include_vanilla": False, "noise_multipliers": ()}, "no defense"),
  ],
)
def test_bad_config_writes_nothing(tmp_path, change, match):
  out = str(tmp_path / "run")
  config = dataclasses.replace(witches_brew.PRESETS["smoke"], out=out, **change)
  with pytest.raises(ValueError, match=match):
    witches_brew.run(config)
  assert not os.path.exists(out)
