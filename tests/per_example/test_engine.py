"""Tests jaxshape/per_example (the engine) against a Python loop of jax.grad over single examples.

For every supported layer type and each bench model's kind (tests/per_example/zoo.py),
the clipped sum and norms must equal the reference within 1e-5 relative on a
batch with a zero-gradient example (weight 0), a padding example (mask 0), one
far above and one far below the clip norm, and a NaN example (dropped and
reported non-finite); jitted and eager; vmap over clip norms equals separate
runs; the ordinary gradient, the per-example cosines and the reweighted sum
match too.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxshape
from jaxshape import models
from jaxshape import per_example
from tests.per_example import zoo

BATCH = 6


def _batch(spec, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  if spec[0] == "ids":
    x = rng.integers(0, spec[1], size=(BATCH, spec[2])).astype(np.int32)
    x[2, :3] = x[2, 3:]  # repeated ids inside one example
  else:
    x = rng.normal(size=(BATCH, *spec)).astype(np.float32)
  weight = np.array([1.0, 0.0, 1.0, 50.0, 1e-3, np.nan], np.float32)  # zero, far above/below, NaN
  mask = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], np.float32)  # example 2 is padding
  y = rng.integers(0, num_classes, size=BATCH).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y), "weight": jnp.asarray(weight), "mask": mask}


def _reference(loss_fn, params, batch):
  """Per-example gradients from a Python loop of jax.grad, as float64 numpy leaves `[B, ...]`."""
  grad = jax.jit(jax.grad(loss_fn))
  per = [grad(params, jax.tree.map(lambda v, i=i: v[i : i + 1], batch)) for i in range(BATCH)]
  return jax.tree.map(lambda *g: np.stack([np.asarray(x, np.float64) for x in g]), *per)


def _reference_clipped(grads_B, mask_B, clip):
  leaves = jax.tree.leaves(grads_B)
  norms_B = np.sqrt(sum(np.sum(g.reshape(BATCH, -1) ** 2, axis=1) for g in leaves))
  keep_B = np.where(np.isfinite(norms_B), mask_B, 0.0)
  factor_B = np.where(
    keep_B > 0, keep_B * np.minimum(1.0, clip / np.where(norms_B > 0, norms_B, 1)), 0
  )
  total = jax.tree.map(
    lambda g: np.einsum(
      "b,b...->...", factor_B, np.where(keep_B.reshape((-1,) + (1,) * (g.ndim - 1)) > 0, g, 0)
    ),
    grads_B,
  )
  return total, norms_B, keep_B


def assert_tree_close(got, want, rtol=1e-5):
  """Each leaf within rtol of its largest magnitude (plus float32 rounding of the whole tree)."""
  scale = max(np.max(np.abs(w)) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=rtol * np.max(np.abs(w)) + 1e-6 * scale, rtol=0)


@pytest.fixture(scope="module", params=sorted(zoo.ZOO))
def case(request):
  model, spec = zoo.ZOO[request.param]
  num_classes = getattr(model, "num_classes", 10)
  params = jax.jit(model.init)(zoo.init_key(1), zoo.zeros_input(spec))["params"]
  params = jax.tree.map(lambda p: p + 0.05 if p.ndim == 1 else p, params)  # non-zero biases
  loss_fn = models.ClassifierLoss(model)
  batch = _batch(spec, num_classes)
  grads_B = _reference(loss_fn, params, batch)
  norms = np.sqrt(sum(np.sum(g.reshape(BATCH, -1) ** 2, axis=1) for g in jax.tree.leaves(grads_B)))
  clip = float(np.median(norms[[0, 3, 4]]))  # example 3 far above, 4 far below
  return request.param, loss_fn, params, batch, grads_B, clip


def test_clipped_sum_and_norms_equal_single_example_loop(case):
  name, loss_fn, params, batch, grads_B, clip = case
  want_sum, want_norms, want_keep = _reference_clipped(grads_B, batch["mask"], clip)
  got = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, clip, method="fast")
  assert want_norms[3] > 10 * clip > 100 * want_norms[4]
  np.testing.assert_array_equal(got.mask_B, want_keep)
  assert not np.isfinite(got.norms_B[5])
  np.testing.assert_allclose(got.norms_B[:5], want_norms[:5], rtol=1e-5, atol=1e-30)
  assert_tree_close(got.sum, want_sum)
  fallback = per_example.fallback_layers(loss_fn, params, batch)
  if name == "mixed":
    assert set(fallback) == {"alpha", "shared/kernel", "shared/bias"}
  else:
    assert fallback == (), name


def test_vmap_over_clip_norms_equals_separate_runs(case):
  name, loss_fn, params, batch, _, clip = case
  if name not in ("mlp", "cnn_same", "mixed"):
    pytest.skip("one dense, one conv and one fallback model suffice")
  clips = jnp.array([clip / 10, clip, clip * 10])
  run = lambda c: jaxshape.clipped_sum_and_norms(loss_fn, params, batch, c)  # noqa: E731
  together = jax.vmap(run)(clips)
  for i, c in enumerate(clips):
    alone = run(c)
    one = jax.tree.map(lambda v, i=i: v[i], together.sum)
    chex.assert_trees_all_close(one, alone.sum, rtol=1e-5, atol=1e-7)


def test_vmap_over_params_and_clip_norms_as_a_sweep_does(case):
  name, loss_fn, params, batch, _, clip = case
  if name != "cnn_valid":
    pytest.skip("one model suffices")
  stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
  clips = jnp.asarray([clip, clip / 100])
  run = lambda p, c: jaxshape.clipped_sum_and_norms(loss_fn, p, batch, c)  # noqa: E731
  grid = jax.jit(jax.vmap(run))(stacked, clips)
  for i in range(2):
    one = run(jax.tree.map(lambda p, i=i: p[i], stacked), clips[i])
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], grid.sum), one.sum, rtol=1e-5)


def test_eager_equals_jitted(case):
  name, loss_fn, params, batch, _, clip = case
  if name not in ("mlp", "strided_cnn"):
    pytest.skip("eager runs are slow; two models suffice")
  jitted = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, clip)
  with jax.disable_jit():
    eager = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, clip)
  chex.assert_trees_all_close(eager.sum, jitted.sum, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(eager.norms_B[:5], jitted.norms_B[:5], rtol=1e-5)


def test_fast_grad_equals_jax_grad(case):
  _, loss_fn, params, batch, _, _ = case
  finite = {**batch, "weight": jnp.where(jnp.isnan(batch["weight"]), 1.0, batch["weight"])}
  want = jax.jit(jax.grad(loss_fn))(params, finite)
  assert_tree_close(jaxshape.fast_grad(loss_fn, params, finite), jax.tree.map(np.asarray, want))


def _selected(tree, select):
  """Leaves of `tree` under the parameter path `select` (all for None), in flatten order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(k.key for k in path) for path, _ in flat]
  return [v for n, (_, v) in zip(names, flat, strict=True) if select in (None, n, n.split("/")[0])]


def test_norms_and_cosines_equal_reference(case):
  """Norms and cosines (whole gradient and one layer) against the single-example loop's."""
  _, loss_fn, params, batch, grads_B, _ = case
  reference = jax.tree.map(lambda g: np.nansum(g[:5], axis=0).astype(np.float32), grads_B)
  layer = jax.tree_util.tree_flatten_with_path(params)[0][0][0][0].key
  for select in (None, layer):
    g_leaves = [g.reshape(BATCH, -1) for g in _selected(grads_B, select)]
    r = np.concatenate([v.reshape(-1) for v in _selected(reference, select)]).astype(np.float64)
    g = np.concatenate(g_leaves, axis=1)
    want_norms = np.linalg.norm(g, axis=1)
    with np.errstate(invalid="ignore"):  # the NaN example
      want_cos = g @ r / (want_norms * np.linalg.norm(r))
    got = jaxshape.per_example_norms_and_cosines(loss_fn, params, batch, reference, layer=select)
    np.testing.assert_allclose(got.norms_B[:5], want_norms[:5], rtol=1e-5, atol=1e-30)
    ok = np.isfinite(want_cos[:5])
    assert not np.isfinite(got.cosines_B[5])  # the NaN example
    np.testing.assert_array_equal(np.isfinite(got.cosines_B[:5]), ok)
    np.testing.assert_allclose(got.cosines_B[:5][ok], want_cos[:5][ok], atol=1e-5)


# One model per rule's dot product: dense, conv (patches, slices, Gram), dense with extra
# axes, embed and norm layers, the vmap fallback.
REWEIGHTED_CASES = (
  "mlp",
  "cnn_valid",
  "strided_cnn",
  "resnet",
  "transformer",
  "dense_general",
  "mixed",
)


def test_reweighted_sum_equals_reference(case):
  """sum_i w_i g_i with w_i from (norm, dot with a reference), against the single-example loop's."""
  name, loss_fn, params, batch, grads_B, clip = case
  if name not in REWEIGHTED_CASES:
    pytest.skip("its layers' dot products are covered by REWEIGHTED_CASES")
  reference = jax.tree.map(lambda g: np.nansum(g[:5], axis=0).astype(np.float32) / 5, grads_B)
  ref_sq = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in jax.tree.leaves(reference))

  def weights_fn(norms_B, dots_B):  # centered clipping's min(1, C / ||g_i - r||)
    dev_B = jnp.sqrt(jnp.maximum(jnp.square(norms_B) - 2.0 * dots_B + ref_sq, 0.0))
    return jnp.minimum(1.0, clip / jnp.where(dev_B > 0, dev_B, 1.0))

  g = np.concatenate([x.reshape(BATCH, -1) for x in jax.tree.leaves(grads_B)], axis=1)
  r = np.concatenate([x.reshape(-1) for x in jax.tree.leaves(reference)]).astype(np.float64)
  norms_B = np.linalg.norm(g, axis=1)
  with np.errstate(invalid="ignore"):
    dots_B = g @ r
  keep_B = np.where(np.isfinite(norms_B), batch["mask"], 0.0)
  dev_B = np.sqrt(np.maximum(norms_B**2 - 2 * dots_B + ref_sq, 0.0))
  w_B = np.where(keep_B > 0, np.minimum(1.0, clip / np.where(dev_B > 0, dev_B, 1.0)), 0.0)
  want = jax.tree.map(
    lambda x: np.einsum(
      "b,b...->...", w_B, np.nan_to_num(x * (keep_B > 0).reshape((-1,) + (1,) * (x.ndim - 1)))
    ),
    grads_B,
  )
  got = jax.jit(
    lambda p, b, r: per_example.reweighted_sum(loss_fn, p, b, r, weights_fn, method="fast")
  )(params, batch, reference)
  assert_tree_close(got.sum, want)
  np.testing.assert_array_equal(got.mask_B, keep_B)
  np.testing.assert_allclose(got.norms_B[:5], norms_B[:5], rtol=1e-5, atol=1e-30)
  scale = np.max(np.abs(dots_B[:5]))
  np.testing.assert_allclose(got.dots_B[:5], dots_B[:5], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(got.weights_B, w_B, rtol=1e-4, atol=1e-6)
