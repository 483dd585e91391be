"""Tests experiments/bench_models.py: the user models take the engine; the timing loop's budget."""

import time

import pytest

from experiments import bench_models


@pytest.mark.parametrize("name", bench_models.USER_MODELS)
def test_user_models_take_the_engine_without_fallback(name):
  """The bench's user models (and ResNet-18) are served by fast rules only, at the real shapes."""
  from jaxshape import models
  from jaxshape import per_example

  model, params = bench_models.init(name, 0)
  batch = bench_models.make_batch(name, 2, 0)
  assert per_example.fallback_layers(models.ClassifierLoss(model), params, batch) == ()


def test_make_batch_shapes_and_labels():
  batch = bench_models.make_batch("transformer", 3, 0)
  assert batch["x"].shape == (3, bench_models.TOKENS) and batch["x"].max() < bench_models.VOCAB
  batch = bench_models.make_batch("lr", 5, 0)
  assert batch["x"].shape == (5, 28, 28, 1) and set(batch["y"]) <= {0, 1}
  with pytest.raises(ValueError, match="model must be one of"):
    bench_models.spec("resnet")


def test_time_interleaved_counts_rounds_and_respects_the_budget():
  calls = {"a": 0, "b": 0}

  def runner(name, seconds):
    def run_once():
      calls[name] += 1
      time.sleep(seconds)

    return run_once

  runners = {"a": runner("a", 0.0), "b": runner("b", 0.0)}
  ms = bench_models.time_interleaved(runners, repeats=5, warmup=2)
  assert set(ms) == {"a", "b"} and calls == {"a": 2 + 2 * 5, "b": 2 + 2 * 5}
  calls.update(a=0, b=0)
  slow = {"a": runner("a", 0.02), "b": runner("b", 0.0)}
  ms = bench_models.time_interleaved(slow, repeats=50, warmup=1, budget_s=0.1)
  assert calls["a"] == 1 + 2 * 2  # 0.1 s of 0.04 s rounds: the minimum of 2 rounds
  assert ms["a"] >= 20.0
