"""Tests experiments/bench_shaping.py: at the first step (reference 0, C at its initial value)
each fast-path mechanism's step equals the clip-only step; the markdown table's ratios."""

import chex
import jax
import jax.numpy as jnp
import optax

from experiments import bench
from experiments import bench_models
from experiments import bench_shaping


def test_first_shaping_steps_equal_the_clip_only_step():
  """Centered clipping and cosine gating with r = 0 and quantile clipping at its initial C clip."""
  steps, inits, params = bench._jax_steps("mlp", 0)
  batch = jax.tree.map(jnp.asarray, bench_models.make_batch("mlp", 8, 0))
  want, _ = jax.jit(steps["clip_fast"])(params, inits["clip_fast"](params), batch)
  for method in bench_shaping.FAST_MECHANISMS:
    got, state = jax.jit(steps[method])(params, inits[method](params), batch)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    if method != "quantile":  # the reference moved to (1 - beta) x the first mean update
      assert float(optax.tree.norm(state[0].reference)) > 0


def test_table_ratios_to_clip_fast():
  rows = [
    dict(model="m", batch=8, method="clip_fast", ms_per_step=2.0),
    dict(model="m", batch=8, method="centered", ms_per_step=2.5),
    dict(model="m", batch=8, method="median", ms_per_step=400.0),
  ]
  lines = bench_shaping.table(rows).splitlines()
  assert lines[0] == "| model | batch | clip_fast ms | centered | median |"
  assert lines[2] == "| m | 8 | 2.00 | 2.50 (x1.25) | 400.00 (x200.00) |"
