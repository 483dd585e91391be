"""Tests of experiments/adaptive_noise/ (§7.2): the derived answer and a smoke run."""

import dataclasses
import math
import os

import pytest

from experiments import adaptive_noise
from experiments.targeted import outcome
from jaxshape import data
from jaxshape import results


def _row(mechanism, sigma, wins, n, utility, std=0.0):
  low, high = results.wilson_interval(wins, n)
  defense = {"vanilla": "vanilla", "adaptive": "adaptive"}.get(mechanism, "dp")
  return {
    "mechanism": mechanism,
    "label": f"{mechanism} {sigma}",
    "defense": defense,
    "clip_norm": 4.0,
    "noise_multiplier": sigma,
    "n": n,
    "successes": wins,
    "success_rate": wins / n,
    "ci_low": low,
    "ci_high": high,
    "utility_rad": utility,
    "utility_rad_std": std,
    "mean_poisons": 2.0,
    "std_poisons": 1.0,
  }


def _grid(fixed, adaptive, vanilla=(18, 20), clip=(16, 20, 0.0)):
  rows = [_row("vanilla", 0.0, *vanilla, 0.0), _row("clip only", 0.0, *clip)]
  rows += [_row("fixed", s, w, 20, u) for s, w, u in fixed]
  rows += [_row("adaptive", s, w, 20, u) for s, w, u in adaptive]
  return rows


def test_answer_adaptive_cheaper():
  rows = _grid(fixed=[(0.1, 12, 0.05), (0.5, 4, 0.30)], adaptive=[(0.5, 14, 0.02), (2.0, 5, 0.10)])
  text = adaptive_noise.answer(rows, level=None)
  assert text.startswith("Vanilla multi-poison success is 18/20 = 0.90")
  assert "Yes: adaptive noise reaches it at the smaller utility cost" in text
  assert "utility RAD 0.100" in text and "utility RAD 0.300" in text
  assert "0 of 2 adaptive points are dominated" in text


def test_answer_fixed_cheaper_and_levels():
  rows = _grid(fixed=[(0.1, 3, 0.05)], adaptive=[(2.0, 3, 0.20)])
  assert "No: fixed noise reaches it" in adaptive_noise.answer(rows, level=None)
  # At a level nothing reaches, the answer says so instead.
  assert "Neither mechanism reaches it" in adaptive_noise.answer(rows, level=0.05)


def test_answer_inconclusive_without_vanilla_success():
  rows = _grid(fixed=[(0.1, 0, 0.05)], adaptive=[(2.0, 0, 0.20)], vanilla=(0, 20))
  assert "inconclusive" in adaptive_noise.answer(rows, level=None)


def test_answer_clipping_alone():
  rows = _grid(fixed=[(0.1, 0, 0.05)], adaptive=[(2.0, 0, 0.20)], clip=(2, 20, 0.01))
  assert "Clipping alone already reaches it" in adaptive_noise.answer(rows, level=None)


def test_frontier_starts_at_the_clip_only_anchor():
  rows = _grid(fixed=[(0.5, 4, 0.3), (0.1, 12, 0.05)], adaptive=[])
  assert [r["noise_multiplier"] for r in adaptive_noise.frontier(rows, "fixed")] == [0.0, 0.1, 0.5]


def test_adaptive_noise_smoke(tmp_path):
  try:
    data.load("fashion_mnist", download=False)
  except FileNotFoundError as e:
    pytest.skip(f"FashionMNIST is not installed (make data): {e}")
  config = dataclasses.replace(adaptive_noise.PRESETS["smoke"], out=str(tmp_path), progress=False)
  out = adaptive_noise.run(config)
  assert results.read_header(tmp_path / "adaptive.csv") == list(adaptive_noise.COLUMNS)
  rows = results.parse(results.read_csv(tmp_path / "adaptive.csv"))
  assert [r["mechanism"] for r in rows] == ["vanilla", "clip only", "fixed", "adaptive"]
  assert rows[0]["utility_rad"] == 0.0
  for r in rows:
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(
      results.wilson_interval(r["successes"], r["n"])
    )
    assert r["n"] == config.targets * config.seeds
  assert out["answer"].startswith("Vanilla multi-poison success is")
  assert (tmp_path / "answer.txt").read_text().strip() == out["answer"]
  assert os.path.getsize(tmp_path / "adaptive.png") > 10_000
  # The underlying multi-poison run: schema, one row per target x defense x seed.
  name = config.setup.replace(":", "_")
  folder = tmp_path / "multipoison" / name
  assert results.read_header(folder / "targeted.csv") == list(outcome.TARGETED_COLUMNS)
  targeted_rows = results.parse(results.read_csv(folder / "targeted.csv"))
  assert len(targeted_rows) == config.targets * len(rows) * config.seeds
  assert {r["defense"] for r in targeted_rows} == {"vanilla", "dp", "adaptive"}
  assert all(0 <= r["n_poisons_used"] <= max(config.poison_counts) for r in targeted_rows)
  assert all(math.isfinite(r["clean_acc"]) for r in targeted_rows)
  # A rerun re-trains nothing.
  again = adaptive_noise.run(config)
  assert again["targeted"]["setups"][name]["new_rows"] == 0
  assert [r["successes"] for r in again["rows"]] == [r["successes"] for r in rows]
