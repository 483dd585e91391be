"""Tests jaxshape/fast_grads.py, fast_passes.py and fast_conv.py against the vmap(grad) path.

The fast exact path must equal `clipped_sum_and_norms(method="vmap")` within
1e-5 relative for LR, MLP and both CNNs (SAME and VALID padding), with
zero-gradient examples (weight 0, mask 0), examples far above the clip norm,
non-finite inputs and max-pooling ties; and the norms and cosines must equal
those of materialised per-example gradients.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import fast_conv
from jaxshape import fast_grads
from jaxshape import grads
from jaxshape import models
from tests.helpers import run

CASES = {
  "lr": (models.LR(num_classes=2), (28, 28, 1)),
  "mlp": (models.MLP(num_classes=10, hidden=(32, 16)), (28, 28, 1)),
  "cnn_28x28x1": (models.CNN(num_classes=10, hidden=16, padding="SAME"), (28, 28, 1)),
  "cnn_32x32x3": (models.CNN(num_classes=10, hidden=16), (32, 32, 3)),
}
BATCH = 8
CHUNK = 3  # CNN chunks of 3, 3, 2 (+1 padding row): exercises the padded scan


def _problem(name):
  """A batch with a weight-0 example, a padding example and one far above any clip norm."""
  model, shape = CASES[name]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, *shape)).astype(np.float32)
  x[1] = 0.0  # constant image: ties in every max-pool window
  x[2, : shape[0] // 2] = 0.0  # half constant
  x[3] *= 5.0  # gradient far above the clip norm
  weight = rng.uniform(0.5, 2.0, BATCH).astype(np.float32)
  weight[4] = 0.0  # zero gradient
  mask = np.ones(BATCH, np.float32)
  mask[5] = 0.0  # padding
  batch = {
    "x": jnp.asarray(x),
    "y": jnp.asarray(rng.integers(0, model.num_classes, BATCH), jnp.int32),
    "weight": jnp.asarray(weight),
    "mask": jnp.asarray(mask),
  }
  params = models.init_params(model, jax.random.key(1), shape)
  # Non-zero biases, so constant regions give positive, tied activations.
  params = jax.tree.map(lambda p: p + 0.05 if p.ndim == 1 else p, params)
  return models.ClassifierLoss(model), params, batch


def _assert_close(got, want, rtol=1e-5):
  """Each leaf within `rtol` of the leaf's largest magnitude."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape
    scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
    np.testing.assert_array_less(np.abs(g - w), rtol * scale + 1e-12)


@functools.cache
def _case(name):
  loss_fn, params, batch = _problem(name)
  chunk = CHUNK if name.startswith("cnn") else None
  fast = jax.jit(
    lambda p, b, c: fast_grads.fast_clipped_sum_and_norms(loss_fn, p, b, c, chunk_size=chunk)
  )
  ref = jax.jit(lambda p, b, c: grads.clipped_sum_and_norms(loss_fn, p, b, c, method="vmap"))
  return loss_fn, params, batch, fast, ref


@pytest.mark.parametrize("clip", [1e-3, 1.0, 1e4], ids=["all_clipped", "mixed", "none_clipped"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_clipped_sum_matches_vmap(name, clip):
  _, params, batch, fast, ref = _case(name)
  got, want = fast(params, batch, clip), ref(params, batch, clip)
  _assert_close(got.sum, want.sum)
  _assert_close(got.norms_B, want.norms_B)
  np.testing.assert_array_equal(got.mask_B, want.mask_B)
  np.testing.assert_array_equal(got.mask_B, [1, 1, 1, 1, 1, 0, 1, 1])
  assert float(got.norms_B[4]) == 0.0  # weight 0
  assert float(got.norms_B[5]) == 0.0  # padding
  assert float(np.max(got.norms_B)) > 1e3 * 1e-3  # far above the smallest C
  assert float(got.l2_norm_clip) == pytest.approx(clip)


@pytest.mark.parametrize("name", ["lr", "cnn_28x28x1"])
def test_auto_dispatches_to_fast_path(name):
  loss_fn, params, batch, fast, _ = _case(name)
  assert fast_grads.supports(loss_fn, params, batch)
  got = grads.clipped_sum_and_norms(loss_fn, params, batch, 0.5)
  want = fast_grads.fast_clipped_sum_and_norms(loss_fn, params, batch, 0.5)
  chex.assert_trees_all_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn_32x32x3"])
def test_non_finite_examples_are_dropped(name):
  loss_fn, params, batch, fast, ref = _case(name)
  x = np.array(batch["x"])
  x[0].flat[3] = np.nan
  x[6].flat[5] = np.inf
  x[5].flat[0] = np.nan  # padding with NaN: still out
  bad = dict(batch, x=jnp.asarray(x))
  got = fast(params, bad, 1.0)
  np.testing.assert_array_equal(got.mask_B, [0, 1, 1, 1, 1, 0, 0, 1])
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(got.sum))
  _assert_close(got.sum, ref(params, bad, 1.0).sum)
  # Same as leaving those examples out of the batch by mask.
  masked = dict(batch, mask=batch["mask"] * jnp.asarray([0, 1, 1, 1, 1, 0, 0, 1.0]))
  _assert_close(got.sum, fast(params, masked, 1.0).sum)


def test_mask_removes_examples_from_the_sum():
  loss_fn, params, batch, fast, _ = _case("mlp")
  got = fast(params, batch, 1.0)
  keep = np.flatnonzero(np.asarray(batch["mask"]))
  sub = jax.tree.map(lambda a: a[keep], {k: v for k, v in batch.items() if k != "mask"})
  _assert_close(got.sum, fast(params, sub, 1.0).sum)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_grad_matches_jax_grad(name):
  loss_fn, params, batch, _, _ = _case(name)
  chunk = CHUNK if name.startswith("cnn") else None
  got = jax.jit(lambda p, b: fast_grads.fast_grad(loss_fn, p, b, chunk_size=chunk))(params, batch)
  _assert_close(got, jax.jit(jax.grad(loss_fn))(params, batch))


COSINE_CASES = [
  ("lr", None),
  ("mlp", "hidden_0/bias"),
  ("cnn_28x28x1", None),
  ("cnn_32x32x3", "head/kernel"),
  ("cnn_32x32x3", "conv_0"),
]


@pytest.mark.parametrize("name,layer", COSINE_CASES)
def test_norms_and_cosines_match_vmap(name, layer):
  loss_fn, params, batch, _, _ = _case(name)
  rng = np.random.default_rng(2)
  reference = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  chunk = CHUNK if name.startswith("cnn") else None
  got = fast_grads.per_example_norms_and_cosines(
    loss_fn, params, batch, reference, layer=layer, method="fast", chunk_size=chunk
  )
  want = fast_grads.per_example_norms_and_cosines(
    loss_fn, params, batch, reference, layer=layer, method="vmap"
  )
  _assert_close(got.norms_B, want.norms_B)
  zero = np.asarray(want.norms_B) == 0  # weight 0 and padding: cosine undefined
  np.testing.assert_array_equal(np.isnan(got.cosines_B), zero)
  np.testing.assert_allclose(got.cosines_B[~zero], want.cosines_B[~zero], atol=2e-6)
  assert np.all(np.abs(got.cosines_B[~zero]) <= 1 + 1e-6)


def test_cosine_of_own_gradient_is_one():
  loss_fn, params, batch, _, _ = _case("lr")
  own = jax.tree.map(lambda g: g[0], grads.per_example_grads(loss_fn, params, batch))
  got = fast_grads.per_example_norms_and_cosines(loss_fn, params, batch, own)
  np.testing.assert_allclose(got.cosines_B[0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["lr"])
def test_eager_matches_jit(name):
  loss_fn, params, batch, fast, _ = _case(name)
  fn = fast_grads.fast_clipped_sum_and_norms
  eager = run(lambda p, b: fn(loss_fn, p, b, 0.1), params, batch, jit=False)
  _assert_close(eager.sum, fast(params, batch, 0.1).sum)


def test_grid_vmap_over_params_and_clip():
  loss_fn, params, batch, fast, _ = _case("cnn_32x32x3")
  stacked = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p]), params)
  clips = jnp.asarray([1.0, 0.01])
  grid = jax.jit(jax.vmap(lambda p, c: grads.clipped_sum_and_norms(loss_fn, p, batch, c)))
  got = grid(stacked, clips)
  for i in range(2):
    one = fast(jax.tree.map(lambda p, i=i: p[i], stacked), batch, clips[i])
    _assert_close(jax.tree.map(lambda a, i=i: a[i], got.sum), one.sum)


def test_other_losses_fall_back_to_vmap():
  def loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["t"]) ** 2)

  w = jnp.ones((3,))
  batch = {"x": jnp.arange(12.0).reshape(4, 3), "t": jnp.arange(4.0)}
  assert not fast_grads.supports(loss, w, batch)
  got = grads.clipped_sum_and_norms(loss, w, batch, 1.0)
  want = grads.clipped_sum_and_norms(loss, w, batch, 1.0, method="vmap")
  chex.assert_trees_all_close(got, want)
  with pytest.raises(ValueError, match="fast path does not support"):
    grads.clipped_sum_and_norms(loss, w, batch, 1.0, method="fast")
  with pytest.raises(ValueError, match="method must be"):
    grads.clipped_sum_and_norms(loss, w, batch, 1.0, method="ghost")


def test_unsupported_models_fall_back():
  model = models.CNN(num_classes=3, hidden=4, dropout_rate=0.5)
  params = models.init_params(model, jax.random.key(0), (8, 8, 1))
  batch = {"x": jnp.ones((2, 8, 8, 1)), "y": jnp.zeros((2,), jnp.int32)}
  loss_fn = models.ClassifierLoss(model)
  assert not fast_grads.supports(loss_fn, params, batch)
  with pytest.raises(ValueError, match="fast path does not support"):
    fast_grads.fast_clipped_sum_and_norms(loss_fn, params, batch, 1.0)


def test_invalid_arguments():
  loss_fn, params, batch, _, _ = _case("lr")
  with pytest.raises(ValueError, match="layer must be"):
    fast_grads.per_example_norms_and_cosines(loss_fn, params, batch, params, layer="conv_9")
  with pytest.raises(ValueError, match="method must be"):
    fast_grads.per_example_norms_and_cosines(loss_fn, params, batch, params, method="x")
  with pytest.raises(ValueError, match="chunk_size"):
    fast_grads.fast_grad(loss_fn, params, batch, chunk_size=0)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 2)])
def test_max_pool_matches_flax_with_ties(shape):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32))  # many ties
  g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)
  want, pull_want = jax.vjp(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)), a)
  got, pull_got = jax.vjp(fast_conv.max_pool_2x2, a)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(pull_got(g)[0], pull_want(g)[0])


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("channels", [2, 16])
def test_conv_pieces_match_xla(channels, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 7, 6, channels)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, channels, 5)), jnp.float32)
  dims = ("NHWC", "HWIO", "NHWC")
  xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dims)
  z, pull = jax.vjp(xla, x, k)
  d = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  zero = jnp.zeros((5,))
  z_fast, pull_fast = jax.vjp(lambda x, k: fast_conv.conv3x3(x, k, zero, padding), x, k)
  _assert_close(z_fast, z)
  _assert_close(pull_fast(d), pull(d))
  xpad = fast_conv.pad_same(x, padding)
  per_B = fast_conv.per_example_kernel_grads(xpad, d)
  _assert_close(per_B.sum(0), pull(d)[1])
  _assert_close(fast_conv.kernel_grad(xpad, d), pull(d)[1])
  patches = fast_conv.patches_3x3(xpad)
  _assert_close(fast_conv.conv3x3_from_patches(patches, k, zero), z)
  _assert_close(fast_conv.per_example_kernel_grads_from_patches(patches, d, channels), per_B)
  _assert_close(fast_conv.kernel_grad_from_patches(patches, d, channels), pull(d)[1])
