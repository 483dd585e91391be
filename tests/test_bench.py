"""Tests experiments/bench.py: a tiny run writes bench.csv with the documented schema."""

import pytest

from experiments import bench
from jaxshape import results

METHODS = ("sgd", "dp_fast")  # a subset: each method is one more compile (dp_sgd: ~3 s)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  config = bench.BenchConfig(
    models=("mlp",),
    batch_sizes=(4, 8),
    repeats=2,
    warmup=1,
    methods=METHODS,
    out=str(out),
  )
  return out, bench.run(config)


def test_bench_writes_csv_with_schema(tiny):
  out, rows = tiny
  path = out / "bench.csv"
  assert results.read_header(path) == list(bench.COLUMNS)
  table = results.parse(results.read_csv(path))
  assert len(table) == len(rows) == 2 * len(METHODS)
  assert {r["model"] for r in table} == {"mlp"}
  assert {r["method"] for r in table} == set(METHODS)
  assert {r["batch"] for r in table} == {4, 8}
  for row in table:
    assert row["ms_per_step"] > 0
    assert row["peak_mem_mb"] > 0


def test_bench_summary_has_ratios(tiny):
  _, rows = tiny
  text = bench.summary(rows)
  assert "dp_fast" in text and "/sgd+noise" in text
  assert len(text.splitlines()) == len(rows) + 2


@pytest.mark.parametrize("name", bench.USER_MODELS)
def test_user_models_take_the_engine_without_fallback(name):
  """The bench's user models (and ResNet-18) are served by fast rules only, at the real shapes."""
  from jaxshape import models
  from jaxshape import per_example

  model, params = bench._init(name, 0)
  batch = bench._batch(name, 2, 0)
  assert per_example.fallback_layers(models.ClassifierLoss(model), params, batch) == ()


def test_bench_rejects_unknown_names():
  with pytest.raises(ValueError, match="models must be among"):
    bench.run(bench.BenchConfig(models=("resnet",)))
  with pytest.raises(ValueError, match="compare must be"):
    bench.run(bench.BenchConfig(models=("lr",), compare="tf"))


def test_bench_compare_opacus(tmp_path):
  pytest.importorskip("opacus")
  config = bench.BenchConfig(
    models=("lr",),
    batch_sizes=(4,),
    repeats=1,
    warmup=1,
    compare="opacus",
    methods=("clip_fast",),
    out=str(tmp_path),
  )
  rows = bench.run(config)
  methods = [r["method"] for r in rows]
  assert methods == ["clip_fast", *bench.TORCH_METHODS]
  assert all(r["ms_per_step"] > 0 for r in rows)
  assert all(r["peak_mem_mb"] is None for r in rows if r["method"].startswith("opacus"))


def test_noise_only_step_moves_params_by_the_dp_noise():
  """The noise_only step is one N(0, (sigma C)^2 / B^2) draw per parameter, times -lr."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  steps, inits, params = bench._jax_steps("mlp", 0)
  batch_size = 50
  batch = jax.tree.map(jnp.asarray, bench._batch("mlp", batch_size, 0))
  new_params, _ = jax.jit(steps["noise_only"])(params, inits["noise_only"](params), batch)
  delta = np.concatenate(
    [
      np.ravel(a - b)
      for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True)
    ]
  )
  expected = bench.LEARNING_RATE * bench.NOISE_MULTIPLIER * bench.L2_NORM_CLIP / batch_size
  assert delta.size > 200_000
  np.testing.assert_allclose(delta.mean(), 0.0, atol=5 * expected / np.sqrt(delta.size))
  np.testing.assert_allclose(delta.std(), expected, rtol=0.01)
