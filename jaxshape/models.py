"""The paper's classifiers (Appendix C, Table 4) in Flax, and their loss.

Shapes: B batch, H/W image height/width, Ci channels, C classes, F features of
the penultimate layer.

Every model maps inputs `x_B...` to logits `logits_BC`; `features` gives the
penultimate representation used by feature-collision attacks (Poison Frogs,
§6.3). Kernels use Keras' default initialisation (Glorot-uniform, zero biases),
as the paper's TF code did.

References:
  Hong et al., "On the Effectiveness of Mitigating Data Poisoning Attacks with
  Gradient Shaping", 2020, Appendix C (architectures).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxshape._typing import Batch
from jaxshape._typing import Params
from jaxshape.per_example import PerExampleLoss

glorot_uniform = nn.initializers.glorot_uniform()


def _dense(features: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=glorot_uniform, bias_init=nn.initializers.zeros, name=name)


class LR(nn.Module):
  """Multinomial softmax regression: flatten -> dense(num_classes).

  The paper's "LR" (§3.2, §6.2; two logits on FashionMNIST-3/4). Its features
  are the flattened input.
  """

  num_classes: int

  def features(self, x_B: jax.Array) -> jax.Array:
    return x_B.reshape((x_B.shape[0], -1))

  @nn.compact
  def __call__(self, x_B: jax.Array) -> jax.Array:
    return _dense(self.num_classes, name="head")(self.features(x_B))


class MLP(nn.Module):
  """flatten -> [dense(h), ReLU] for h in hidden -> dense(num_classes).

  The paper's Table 4 has one hidden layer of 256 (the default); its code used
  two, which `hidden=(256, 256)` gives.
  """

  num_classes: int
  hidden: Sequence[int] = (256,)

  def setup(self):
    self.hidden_layers = [_dense(h, name=f"hidden_{i}") for i, h in enumerate(self.hidden)]
    self.head = _dense(self.num_classes)

  def features(self, x_B: jax.Array) -> jax.Array:
    h_BF = x_B.reshape((x_B.shape[0], -1))
    for layer in self.hidden_layers:
      h_BF = nn.relu(layer(h_BF))
    return h_BF

  def __call__(self, x_B: jax.Array) -> jax.Array:
    return self.head(self.features(x_B))


# ------------------------------------------------------------------ pooling


def _window_view(a_BHWC: jax.Array) -> jax.Array:
  """`[B, H/2, 2, W/2, 2, C]` view of the 2x2 windows (odd trailing rows/columns dropped)."""
  b, h, w, c = a_BHWC.shape
  a_BHWC = a_BHWC[:, : h // 2 * 2, : w // 2 * 2, :]
  return a_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)


def _first_max_selector(a_BHWC: jax.Array, out_BPQC: jax.Array) -> jax.Array:
  """1 at the first maximal element (row-major) of each 2x2 window, else 0; like `_window_view`."""
  eq = _window_view(a_BHWC) == out_BPQC[:, :, None, :, None, :]
  e00, e01 = eq[:, :, 0, :, 0, :], eq[:, :, 0, :, 1, :]
  e10, e11 = eq[:, :, 1, :, 0, :], eq[:, :, 1, :, 1, :]
  s01 = e01 & ~e00
  s10 = e10 & ~(e00 | e01)
  s11 = e11 & ~(e00 | e01 | e10)
  top = jnp.stack([e00, s01], axis=3)
  bottom = jnp.stack([s10, s11], axis=3)
  return jnp.stack([top, bottom], axis=2)


@jax.custom_jvp
def max_pool_2x2(a_BHWC: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 and VALID padding, `[B, H/2, W/2, C]`.

  The same values and gradients as `flax.linen.max_pool(a, (2, 2), (2, 2))`
  (the gradient of a window goes to its *first* maximal element in row-major
  order, as XLA's `select_and_scatter` with `>=` does, so ties after ReLU
  match exactly), with a backward pass that is one fused elementwise op:
  `select_and_scatter`, which `jax.grad` of `flax.linen.max_pool` uses, was
  the slowest op of the whole CNN step on the CPU (about 35 of 80 ms).

  The rule is a JVP (linear in the tangent: pick each window's selected
  element), so reverse mode is its transpose and higher-order derivatives
  (e.g. Witches' Brew's gradient of a Hessian-vector product) still work,
  which a custom VJP would forbid.
  """
  return _reduce_max_2x2(a_BHWC)


def _reduce_max_2x2(a_BHWC: jax.Array) -> jax.Array:
  # lax.reduce_window measured ~5x faster than a max over the 6-d window view.
  # A Python -inf init lets lax pick its differentiable reduce_window_max primitive.
  return jax.lax.reduce_window(a_BHWC, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@max_pool_2x2.defjvp
def _max_pool_jvp(primals, tangents):
  (a_BHWC,), (t_BHWC,) = primals, tangents
  out_BPQC = _reduce_max_2x2(a_BHWC)
  sel = _first_max_selector(a_BHWC, out_BPQC)
  picked = jnp.where(sel, _window_view(t_BHWC), jnp.zeros((), t_BHWC.dtype))
  return out_BPQC, jnp.sum(picked, axis=(2, 4))


# ------------------------------------------------------------------ models


class CNN(nn.Module):
  """conv3x3x16-ReLU -> conv3x3x32-ReLU -> maxpool 2x2 -> dense(hidden)-ReLU -> dense(C).

  The paper's Table 4 CNN. `padding="VALID"` and `hidden=64` are the table;
  the FashionMNIST "BadNet" of §3.3 used `padding="SAME"`, `hidden=256`. The
  table's dropout (0.5 after pooling) is `dropout_rate`; it defaults to 0
  because dropout needs a per-example key under per-example gradients and
  the published DP numbers do not depend on it.
  """

  num_classes: int
  hidden: int = 64
  padding: str = "VALID"
  dropout_rate: float = 0.0

  def setup(self):
    conv = lambda f, name: nn.Conv(
      f, (3, 3), padding=self.padding, kernel_init=glorot_uniform, name=name
    )
    self.conv_0 = conv(16, "conv_0")
    self.conv_1 = conv(32, "conv_1")
    self.dense_0 = _dense(self.hidden, name="dense_0")
    self.head = _dense(self.num_classes, name="head")
    self.dropout = nn.Dropout(self.dropout_rate)

  def features(self, x_BHWC: jax.Array, *, train: bool = False) -> jax.Array:
    h = nn.relu(self.conv_0(x_BHWC))
    h = nn.relu(self.conv_1(h))
    h = max_pool_2x2(h)
    h = self.dropout(h, deterministic=not train or self.dropout_rate == 0.0)
    h_BF = h.reshape((h.shape[0], -1))
    return nn.relu(self.dense_0(h_BF))

  def __call__(self, x_BHWC: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.features(x_BHWC, train=train))


class ResidualBlock(nn.Module):
  """ResNet basic block: two 3x3 convs with GroupNorm, identity or 1x1 projection shortcut."""

  features: int
  strides: int = 1
  num_groups: int = 32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    groups = min(self.num_groups, self.features)
    h = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False)(x_BHWC)
    h = nn.relu(nn.GroupNorm(num_groups=groups)(h))
    h = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(h)
    h = nn.GroupNorm(num_groups=groups)(h)
    if self.strides != 1 or x_BHWC.shape[-1] != self.features:
      x_BHWC = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x_BHWC)
      x_BHWC = nn.GroupNorm(num_groups=groups)(x_BHWC)
    return nn.relu(h + x_BHWC)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32x3 images with GroupNorm instead of BatchNorm.

  3x3 stem (no max-pool, as for CIFAR-10), four stages of two basic blocks
  with `width` x (1, 2, 4, 8) channels (stride 2 from the second stage),
  global average pooling, dense(num_classes). GroupNorm keeps every example's
  output independent of the rest of the batch, which per-example gradients
  (DP-SGD, gradient shaping) need; BatchNorm would mix them.

  References:
    He et al., "Deep Residual Learning for Image Recognition", 2016.
    Wu and He, "Group Normalization", 2018.
  """

  num_classes: int
  width: int = 64
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_groups: int = 32

  def features(self, x_BHWC: jax.Array) -> jax.Array:
    return self._trunk(x_BHWC)

  @nn.compact
  def _trunk(self, x_BHWC: jax.Array) -> jax.Array:
    h = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x_BHWC)
    h = nn.relu(nn.GroupNorm(num_groups=min(self.num_groups, self.width))(h))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        h = ResidualBlock(self.width * 2**stage, strides, self.num_groups)(h)
    return jnp.mean(h, axis=(1, 2))

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return nn.Dense(self.num_classes, name="head")(self.features(x_BHWC))


MODELS = {"lr": LR, "mlp": MLP, "cnn": CNN, "resnet18": ResNet18}


def make_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by name: the paper's "lr", "mlp", "cnn", or "resnet18" (GroupNorm)."""
  if name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> Params:
  """Initial parameters for inputs of shape `input_shape` (one example, no batch axis)."""
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]


def softmax_cross_entropy(logits_BC: jax.Array, batch: Batch) -> jax.Array:
  """Cross-entropy of each example's logits against its integer label `batch["y"]`, `[B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["y"])


@dataclasses.dataclass(frozen=True)
class ClassifierLoss(PerExampleLoss):
  """Mean softmax cross-entropy of `model` on a batch: `loss(params, batch)`.

  `batch` is a dict with `x` (inputs), `y` (int labels) and optionally `mask`
  (1.0 for real examples, 0.0 for padding; the mean is over real examples)
  and `weight` (per-example loss weights). It is a hashable, callable value,
  so it can be a static argument of `jit`; as a `PerExampleLoss` of any Flax
  linen model it takes the fast exact engine of `jaxshape.per_example`.

  Example:
    >>> loss_fn = ClassifierLoss(MLP(num_classes=10))
    >>> loss = loss_fn(params, {"x": x_B784, "y": y_B})
  """

  fn: Callable[[jax.Array, Batch], jax.Array] = softmax_cross_entropy


def predict(model: nn.Module, params: Params, x_B: jax.Array) -> jax.Array:
  """Predicted class of each input, `[B]` int32."""
  return jnp.argmax(model.apply({"params": params}, x_B), axis=-1).astype(jnp.int32)


def features(model: nn.Module, params: Params, x_B: jax.Array) -> jax.Array:
  """Penultimate-layer features `[B, F]` (the space of feature collision, §6.3)."""
  return model.apply({"params": params}, x_B, method=model.features)
