"""Small Flax models for the engine's tests: one per supported layer type, and mixtures.

Each entry of `ZOO` is (model, input of one example as a shape or an id range).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxshape import models


class DeepTanhMLP(nn.Module):
  """784-32-16-8-10 with tanh (the bench's deeper MLP, narrowed)."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for width in (32, 16, 8):
      h = nn.tanh(nn.Dense(width)(h))
    return nn.Dense(10)(h)


class StridedCNN(nn.Module):
  """5x5 stride-2 conv, dilated 3x3 VALID conv without bias, avg-pool, two dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (5, 5), strides=2)(x))
    h = nn.relu(nn.Conv(8, (3, 3), padding="VALID", kernel_dilation=2, use_bias=False)(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = h.reshape(h.shape[0], -1)
    return nn.Dense(10)(nn.relu(nn.Dense(16)(h)))


class Conv1D(nn.Module):
  """1-d convolutions with explicit and asymmetric padding, stride 3."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (4,), strides=3, padding=((2, 1),))(x))
    h = nn.relu(nn.Conv(8, (3,), padding=1)(h))
    return nn.Dense(10)(h.reshape(h.shape[0], -1))


class TinyTransformer(nn.Module):
  """Embed + self-attention (DenseGeneral q/k/v/out) + LayerNorm + RMSNorm + head."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(40, 16)(ids)
    h = nn.LayerNorm()(h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16)(h))
    h = nn.RMSNorm()(h + nn.Dense(16)(nn.gelu(nn.Dense(32)(h))))
    return nn.Dense(10)(h.mean(axis=1))


class WideDenseGeneral(nn.Module):
  """DenseGeneral over two trailing axes with two output axes (Gram form vs materialised)."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], 4, 7, -1)  # [B, T=4, 7, 28]
    h = nn.tanh(nn.DenseGeneral((3, 5), axis=(-2, -1))(h))  # [B, 4, 3, 5]
    h = nn.DenseGeneral(64, axis=(-2, -1), use_bias=False)(h)  # [B, 4, 64]: materialised
    return nn.Dense(10)(h.reshape(h.shape[0], -1))


class Mixed(nn.Module):
  """Fast layers mixed with fallback ones: a bare parameter and a Dense called twice."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(x.reshape(x.shape[0], -1))
    alpha = self.param("alpha", nn.initializers.ones, (16,))
    h = nn.GroupNorm(num_groups=4)(h * alpha[None, :])
    shared = nn.Dense(16, name="shared")
    h = shared(nn.tanh(shared(h)))
    return nn.Dense(10)(h)


class WithBatchNorm(nn.Module):
  use_running_average: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x.reshape(x.shape[0], -1))
    h = nn.BatchNorm(use_running_average=self.use_running_average, name="bn")(h)
    return nn.Dense(10)(h)


IMAGE = (12, 12, 1)
ZOO = {
  "lr": (models.LR(num_classes=3), IMAGE),
  "mlp": (models.MLP(num_classes=10, hidden=(16, 8)), IMAGE),
  "deep_tanh_mlp": (DeepTanhMLP(), IMAGE),
  "cnn_valid": (models.CNN(num_classes=10, hidden=8), (10, 10, 3)),
  "cnn_same": (models.CNN(num_classes=10, hidden=8, padding="SAME"), IMAGE),
  "strided_cnn": (StridedCNN(), (17, 17, 3)),
  "conv1d": (Conv1D(), (20, 5)),
  "resnet": (models.ResNet18(10, width=8, stage_sizes=(1, 1), num_groups=4), (8, 8, 3)),
  "transformer": (TinyTransformer(), ("ids", 40, 6)),
  "dense_general": (WideDenseGeneral(), (28, 28)),
  "mixed": (Mixed(), IMAGE),
}


def zeros_input(spec):
  if spec[0] == "ids":
    return jnp.zeros((1, spec[2]), jnp.int32)
  return jnp.zeros((1, *spec), jnp.float32)


def init_key(seed: int) -> jax.Array:
  """A key for initialising test models: "rbg" compiles in a fraction of threefry's time.

  (XLA on the CPU compiles each threefry draw of an initializer in about
  0.5 s; a ResNet's init took 22 s of CPU with threefry, 6 s with rbg,
  measured.) The tests compare the engine with a reference on the same
  parameters, whatever their values.
  """
  return jax.random.key(seed, impl="rbg")
