"""Tests jaxshape/poisons flipping.py, collision.py, patch.py, blending.py.

Constraints hold exactly (labels, pixel box, patch place and size, the blend
formula), and the backdoors work: a small linear model trained on clean data
plus 10% patched (or blended) copies labels triggered test points with the
attacker's class, while the same model trained without them does not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import poisons
from jaxshape import train


@functools.partial(jax.jit, static_argnums=(1, 2))
def _images(key, n, num_classes=3, noise=0.2):
  """Class templates (fixed) plus Gaussian pixel noise, clipped to [0, 1]: [n, 8, 8, 1]."""
  y = (jnp.arange(n) % num_classes).astype(jnp.int32)
  templates = jax.random.uniform(jax.random.key(7), (num_classes, 8, 8, 1), maxval=0.7)
  x = jnp.clip(templates[y] + noise * jax.random.normal(key, (n, 8, 8, 1)), 0.0, 1.0)
  return x, y


@pytest.fixture(scope="module")
def data():
  x, y = _images(jax.random.key(0), 300)
  x_test, y_test = _images(jax.random.key(1), 300)
  return x, y, x_test, y_test


# ------------------------------------------------------------------ label flip


@pytest.mark.parametrize("num_classes", [2, 3])
def test_label_flip_copies_points_with_another_label(data, num_classes):
  x, y, _, _ = data
  y = y % num_classes
  ps = poisons.label_flip(jax.random.key(4), x, y, 0.3, num_classes=num_classes)
  assert len(ps) == 90 and ps.attack == "label_flip"
  idx = np.asarray(ps.base_idx)
  assert len(np.unique(idx)) == 90  # distinct training points
  np.testing.assert_array_equal(ps.x, np.asarray(x)[idx])
  assert np.all(np.asarray(ps.y) != np.asarray(y)[idx])
  assert np.all((np.asarray(ps.y) >= 0) & (np.asarray(ps.y) < num_classes))
  if num_classes == 2:
    np.testing.assert_array_equal(ps.y, 1 - np.asarray(y)[idx])


def test_label_flip_multiclass_labels_are_uniform_over_the_others():
  y = np.zeros([3000], np.int32)
  ps = poisons.label_flip(jax.random.key(5), np.zeros((3000, 2), np.float32), y, 1.0, num_classes=4)
  counts = np.bincount(np.asarray(ps.y), minlength=4)
  assert counts[0] == 0
  # 3000 draws over 3 labels: std of a count is about 26; allow 5 std.
  np.testing.assert_allclose(counts[1:], 1000, atol=130)


def test_label_flip_same_key_same_poisons(data):
  x, y, _, _ = data
  a = poisons.label_flip(jax.random.key(9), x, y, 0.3)
  b = poisons.label_flip(jax.random.key(9), x, y, 0.3)
  c = poisons.label_flip(jax.random.key(10), x, y, 0.3)
  np.testing.assert_array_equal(a.base_idx, b.base_idx)
  np.testing.assert_array_equal(a.y, b.y)
  assert not np.array_equal(a.base_idx, c.base_idx)


# ------------------------------------------------------------------ watermark


def test_watermark_is_the_clipped_overlay_with_the_base_label(data):
  x, y, _, _ = data
  base_P, target_P = poisons.collision_pairs(jax.random.key(2), y, 20, 0, 1)
  assert np.all(np.asarray(y)[np.asarray(base_P)] == 0)
  assert np.all(np.asarray(y)[np.asarray(target_P)] == 1)
  assert len(np.unique(np.asarray(base_P))) == 20
  for alpha in (0.0, 0.4, 1.0):
    ps = poisons.watermark(x, y, base_P, target_P, alpha)
    want = np.clip(
      (1 - alpha) * np.asarray(x)[np.asarray(base_P)] + alpha * np.asarray(x)[np.asarray(target_P)],
      0,
      1,
    )
    np.testing.assert_allclose(ps.x, want, atol=1e-6)
    np.testing.assert_array_equal(ps.y, 0)  # clean label: the base's
    assert float(ps.x.min()) >= 0.0 and float(ps.x.max()) <= 1.0


def test_watermark_overlay_takes_a_traced_alpha():
  xb, xt = jnp.zeros((2, 3)), jnp.ones((2, 3))
  got = jax.jit(jax.vmap(poisons.collision.overlay, in_axes=(None, None, 0)))(
    xb, xt, jnp.array([0.25, 0.5])
  )
  np.testing.assert_allclose(got[:, 0, 0], [0.25, 0.5])


# ------------------------------------------------------------------ patch


@pytest.mark.parametrize(
  "corner, rows, cols",
  [
    ("top_left", slice(0, 3), slice(0, 3)),
    ("top_right", slice(0, 3), slice(5, 8)),
    ("bottom_left", slice(5, 8), slice(0, 3)),
    ("bottom_right", slice(5, 8), slice(5, 8)),
  ],
)
def test_patch_has_its_size_and_place_and_nothing_else_changes(data, corner, rows, cols):
  x, y, _, _ = data
  ps = poisons.patch_backdoor(jax.random.key(2), x, y, 0.1, 2, size=3, corner=corner)
  assert len(ps) == 30
  np.testing.assert_array_equal(ps.y, 2)
  assert ps.target_class == 2
  got, base = np.asarray(ps.x), np.asarray(x)[np.asarray(ps.base_idx)]
  np.testing.assert_array_equal(got[:, rows, cols], 1.0)
  outside = np.ones((8, 8), bool)
  outside[rows, cols] = False
  np.testing.assert_array_equal(got[:, outside], base[:, outside])
  mask = np.asarray(ps.trigger.mask)
  assert mask.sum() == 9 and np.all(mask[rows, cols] == 1)


def test_patch_full_image_and_exclusion(data):
  x, y, _, _ = data
  ps = poisons.patch_backdoor(
    jax.random.key(2), x, y, 0.2, 1, size=8, value=0.5, exclude_target_class=True
  )
  np.testing.assert_array_equal(ps.x, 0.5)
  assert np.all(np.asarray(y)[np.asarray(ps.base_idx)] != 1)


# ------------------------------------------------------------------ blend


def test_blend_is_the_convex_combination_with_the_pattern(data):
  x, y, _, _ = data
  ps = poisons.blend(jax.random.key(3), x, y, 0.1, 1, lam=0.3)
  pattern = np.asarray(ps.trigger.pattern)
  assert pattern.shape == (8, 8, 1) and pattern.min() >= 0 and pattern.max() <= 1
  base = np.asarray(x)[np.asarray(ps.base_idx)]
  np.testing.assert_allclose(ps.x, 0.7 * base + 0.3 * pattern[None], atol=1e-6)
  np.testing.assert_array_equal(ps.y, 1)
  np.testing.assert_allclose(poisons.apply_blend(base, pattern, 0.3), ps.x, atol=1e-6)
  given = poisons.blend(jax.random.key(3), x, y, 0.1, 1, lam=0.5, pattern=jnp.ones((8, 8, 1)))
  np.testing.assert_allclose(given.x, 0.5 * base + 0.5, atol=1e-6)
  other = poisons.blend(jax.random.key(4), x, y, 0.1, 1, lam=0.3)
  assert not np.allclose(other.trigger.pattern, pattern)  # the key draws the pattern


# ------------------------------------------------------------------ backdoors work


@functools.partial(jax.jit, static_argnums=0)
def _fit_variants(spec, data_V, key):
  """One LR per data variant (same shapes), vmapped: compiled once."""
  hparams = train.HParams.create(0.05)
  return jax.vmap(lambda d: train.fit(spec, hparams, key, d).params)(data_V)


def test_patch_and_blend_backdoors_reach_high_success(data):
  x, y, x_test, y_test = data
  patch = poisons.patch_backdoor(jax.random.key(2), x, y, 0.1, 2, size=3)
  blended = poisons.blend(jax.random.key(3), x, y, 0.1, 2, lam=0.3)
  variants = [
    poisons.merge((x, y), patch, num_active=0),  # clean: the poison rows are masked out
    poisons.merge((x, y), patch, num_active=len(patch)),
    poisons.merge((x, y), blended, num_active=len(blended)),
  ]
  data_V = jax.tree.map(lambda *a: jnp.stack(a), *variants)
  model = models.LR(3)
  spec = train.TrainSpec(models.ClassifierLoss(model), "adam", batch_size=50, epochs=20)
  params_V = _fit_variants(spec, data_V, jax.random.key(4))
  params = [jax.tree.map(lambda a, i=i: a[i], params_V) for i in range(3)]

  def success(p, ps):
    return float(train.accuracy(model, p, *poisons.backdoor_test_set(x_test, y_test, ps)))

  for p in params:  # the backdoors cost no clean accuracy here
    assert float(train.accuracy(model, p, x_test, y_test)) >= 0.9
  assert success(params[0], patch) <= 0.1 and success(params[0], blended) <= 0.1
  assert success(params[1], patch) >= 0.75
  assert success(params[2], blended) >= 0.75
