"""Tests experiments/bench.py: a tiny run writes bench.csv; markdown summary and targets."""

import pytest

from experiments import bench
from experiments import bench_models
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


def test_bench_summary_is_a_markdown_table_with_ratios(tiny):
  _, rows = tiny
  lines = bench.summary(rows).splitlines()
  assert len(lines) == len(rows) + 2
  assert all(line.startswith("|") and line.endswith("|") for line in lines)
  sgd_row = next(line for line in lines if "| sgd |" in line)
  assert sgd_row.split("|")[6].strip() == "1.00"  # /sgd of the sgd row


def test_bench_targets_one_row_per_model_and_batch():
  rows = [
    dict(model="m", batch=8, method="sgd", ms_per_step=2.0, peak_mem_mb=10.0),
    dict(model="m", batch=8, method="dp_fast", ms_per_step=3.0, peak_mem_mb=15.0),
    dict(model="m", batch=8, method="clip_fast", ms_per_step=2.5, peak_mem_mb=15.0),
    dict(model="m", batch=8, method="noise_only", ms_per_step=1.0, peak_mem_mb=1.0),
    dict(model="m", batch=8, method="opacus_ghost", ms_per_step=6.0, peak_mem_mb=None),
  ]
  lines = bench.targets(rows).splitlines()
  assert len(lines) == 3
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  # clip/sgd 1.25, dp/(sgd+noise) 1.00, peak 1.5, ghost/dp 2.00
  assert cells == ["m", "8", "2.00", "3.00", "1.25", "1.00", "1.50", "6.00", "2.00"]


def test_bench_rejects_unknown_names():
  with pytest.raises(ValueError, match="models must be among"):
    bench.run(bench.BenchConfig(models=("resnet",)))
  with pytest.raises(ValueError, match="compare must be"):
    bench.run(bench.BenchConfig(models=("lr",), compare="tf"))
  with pytest.raises(ValueError, match="budget_s > 0"):
    bench.run(bench.BenchConfig(models=("lr",), budget_s=0.0))


def test_noise_only_step_moves_params_by_the_dp_noise():
  """The noise_only step is one N(0, (sigma C)^2 / B^2) draw per parameter, times -lr."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  steps, inits, params = bench._jax_steps("mlp", 0)
  batch_size = 50
  batch = jax.tree.map(jnp.asarray, bench_models.make_batch("mlp", batch_size, 0))
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
