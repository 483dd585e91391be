"""The bench's models, batches and timing loop (shared by the JAX and the PyTorch side).

Models (10 classes except LR; float32):
  lr            LR 784->2 on 28x28x1 (the paper's)
  mlp           MLP 784-256-10 (the paper's)
  cnn_28x28x1   the paper's CNN (Table 4) on FashionMNIST-sized inputs
  cnn_32x32x3   the same on CIFAR-sized inputs
  deep_mlp      a user's MLP 784-512-128-64-10 with tanh
  strided_cnn   a user's CNN on 28x28x1: 5x5 stride-2 conv(32) + 3x3 conv(64) +
                2x2 avg-pool + dense(128) + dense(10)
  resnet18      `jaxshape.models.ResNet18` (GroupNorm) on 32x32x3
  transformer   a user's token classifier: Embed(1000, 64) on 32 tokens + one
                pre-LayerNorm block (4-head self-attention, MLP 256) + head
The user models are plain Flax modules written here, as a new user would;
none of them is special-cased by the engine.

References:
  Hong et al. 2020, Appendix C, Table 4 (the paper's models).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxshape import models

PAPER_MODELS = ("lr", "mlp", "cnn_28x28x1", "cnn_32x32x3")
USER_MODELS = ("deep_mlp", "strided_cnn", "resnet18", "transformer")
MODELS = PAPER_MODELS + USER_MODELS
VOCAB, TOKENS = 1000, 32
LEARNING_RATE = 0.1
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.0


class DeepMLP(nn.Module):
  """784-512-128-64-10 with tanh."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for width in (512, 128, 64):
      h = nn.tanh(nn.Dense(width)(h))
    return nn.Dense(10)(h)


class StridedCNN(nn.Module):
  """5x5 stride-2 conv(32) + 3x3 conv(64) + 2x2 avg-pool + dense(128) + dense(10)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(32, (5, 5), strides=2)(x))
    h = nn.relu(nn.Conv(64, (3, 3))(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = nn.relu(nn.Dense(128)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(h)


class TokenTransformer(nn.Module):
  """Embed + one pre-LayerNorm block (self-attention, MLP) + mean-pool + head."""

  width: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, self.width)(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(h))
    h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
    return nn.Dense(10)(nn.LayerNorm()(h).mean(axis=1))


def spec(name: str) -> tuple[Any, tuple[int, ...]]:
  """(Flax model, input shape of one example) for a bench model name."""
  if name == "lr":
    return models.LR(num_classes=2), (28, 28, 1)
  if name == "mlp":
    return models.MLP(num_classes=10, hidden=(256,)), (784,)
  if name in ("cnn_28x28x1", "cnn_32x32x3"):
    side, channels = (28, 1) if name == "cnn_28x28x1" else (32, 3)
    return models.CNN(num_classes=10), (side, side, channels)
  if name == "deep_mlp":
    return DeepMLP(), (784,)
  if name == "strided_cnn":
    return StridedCNN(), (28, 28, 1)
  if name == "resnet18":
    return models.ResNet18(num_classes=10), (32, 32, 3)
  if name == "transformer":
    return TokenTransformer(), (TOKENS,)
  raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def num_classes(name: str) -> int:
  return 2 if name == "lr" else 10


def make_batch(name: str, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """A random batch (`x` images or token ids, `y` labels) shaped for model `name`."""
  _, shape = spec(name)
  rng = np.random.default_rng(seed)
  if name == "transformer":
    x = rng.integers(0, VOCAB, size=(batch_size, *shape)).astype(np.int32)
  else:
    x = rng.normal(size=(batch_size, *shape)).astype(np.float32)
  y = rng.integers(0, num_classes(name), size=batch_size).astype(np.int32)
  return {"x": x, "y": y}


def init(name: str, seed: int):
  """(Flax model, its parameters) for model `name`."""
  model, _ = spec(name)
  dummy = make_batch(name, 1, seed)["x"]
  return model, model.init(jax.random.key(seed), dummy)["params"]


def time_interleaved(
  runners: dict[str, Callable[[], None]],
  repeats: int,
  warmup: int,
  budget_s: float = float("inf"),
) -> dict[str, float]:
  """{name: median ms} of `runners` taken round-robin after `warmup` calls each.

  In each round every runner is called once untimed and then once timed, so
  a step never pays for the buffers another method just freed (after the
  vmap path's hundreds of MB, the next step otherwise faults in fresh pages).
  Rounds: `repeats`, or fewer (at least 2) when they would take more than
  `budget_s` seconds at the speed of the last warm-up calls (a step slower
  than `budget_s / 8` is warmed up once). Steps slower
  than `budget_s / 4` for all runners together (ResNet-18: seconds per step
  on 2 cores, where page faults are noise) skip the untimed call.
  """
  last = {}
  for name, run_once in runners.items():
    for _ in range(max(warmup, 1)):
      start = time.perf_counter()
      run_once()
      last[name] = time.perf_counter() - start
      if last[name] > budget_s / 8:  # one warm-up call is enough for a slow step
        break
  one_each = sum(last.values())
  untimed = one_each <= budget_s / 4
  affordable = budget_s / max((2 if untimed else 1) * one_each, 1e-9)
  rounds = repeats if affordable >= repeats else max(min(repeats, 2), int(affordable))
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run_once in runners.items():
      if untimed:
        run_once()
      start = time.perf_counter()
      run_once()
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}
