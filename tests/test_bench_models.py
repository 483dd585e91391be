"""Tests experiments/bench_models.py: the user models take the engine; the timing loop's budget."""

import jax
import pytest

from experiments import bench_models


@pytest.mark.parametrize("name", bench_models.USER_MODELS)
def test_user_models_take_the_engine_without_fallback(name):
  """The bench's user models (and ResNet-18) are served by fast rules only, at the real shapes."""
  from jaxshape import models
  from jaxshape import per_example

  model, _ = bench_models.spec(name)
  batch = bench_models.make_batch(name, 2, 0)
  # Shapes suffice to plan: no initializer is compiled (ResNet-18's took 30 s).
  params = jax.eval_shape(model.init, jax.random.key(0), batch["x"][:1])["params"]
  assert per_example.fallback_layers(models.ClassifierLoss(model), params, batch) == ()


def test_make_batch_shapes_and_labels():
  batch = bench_models.make_batch("transformer", 3, 0)
  assert batch["x"].shape == (3, bench_models.TOKENS) and batch["x"].max() < bench_models.VOCAB
  batch = bench_models.make_batch("lr", 5, 0)
  assert batch["x"].shape == (5, 28, 28, 1) and set(batch["y"]) <= {0, 1}
  with pytest.raises(ValueError, match="model must be one of"):
    bench_models.spec("resnet")


def test_time_interleaved_counts_rounds_and_respects_the_budget(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(bench_models.time, "perf_counter", lambda: clock[0])
  calls = {"a": 0, "b": 0}

  def runner(name, seconds):
    def run_once():
      calls[name] += 1
      clock[0] += seconds

    return run_once

  fast = {"a": runner("a", 0.001), "b": runner("b", 0.0)}
  ms = bench_models.time_interleaved(fast, repeats=5, warmup=2)
  assert calls == {"a": 2 + 2 * 5, "b": 2 + 2 * 5}
  assert ms == {"a": 1.0, "b": 0.0}
  calls.update(a=0, b=0)
  slow = {"a": runner("a", 0.02), "b": runner("b", 0.0)}
  bench_models.time_interleaved(slow, repeats=50, warmup=1, budget_s=0.1)
  assert calls["a"] == 1 + 2 * 2  # 0.1 s of 0.04 s rounds: the minimum of 2 rounds
  calls.update(a=0, b=0)
  bench_models.time_interleaved(slow, repeats=50, warmup=3, budget_s=0.05)
  assert calls["a"] == 1 + 2  # over budget / 8: one warm-up; over budget / 4: no untimed calls
  assert calls["b"] == 3 + 2
