"""Training: a pure jitted step (vanilla or gradient-shaped), epochs as `lax.scan`, fit.

Shapes: N training examples, B batch, S steps per epoch, E epochs.

Structure (model, optimizer, defense, batch size, epochs) lives in a static
`TrainSpec`; the numeric hyperparameters (learning rate, clip norm, noise
multiplier) are a `HParams` of arrays, so `fit` can be `vmap`-ed over a grid
of hyperparameters and seeds and compiled once:

  >>> spec = TrainSpec(ClassifierLoss(LR(2)), optimizer="adam", defense="dp",
  ...                  batch_size=300, epochs=40)
  >>> fit_grid = jax.jit(jax.vmap(functools.partial(fit, spec), in_axes=(0, 0, None)))
  >>> result = fit_grid(hparams_G, keys_G, train_data)

Each epoch visits every example once: the data are shuffled, cut into
ceil(N / B) batches, and the last partial batch is padded with masked
examples (mask 0: no gradient, not counted), never dropped.

References:
  Hong et al. 2020, §6.1 (training setup), Appendix B (DP-SGD / DP-Adam),
  §7.2 (adaptive noise).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxshape import grads as grads_lib
from jaxshape import models as models_lib
from jaxshape import per_example
from jaxshape import transforms
from jaxshape._typing import Data
from jaxshape._typing import Params

DEFENSES = ("vanilla", "dp", "adaptive")
OPTIMIZERS = ("sgd", "adam")


class HParams(NamedTuple):
  """Numeric hyperparameters: scalars, or vectors with a leading grid axis under vmap."""

  learning_rate: jax.Array  # [] float32
  l2_norm_clip: jax.Array  # [] float32; inf means no clipping
  noise_multiplier: jax.Array  # [] float32; 0 means no noise

  @classmethod
  def create(cls, learning_rate, l2_norm_clip=math.inf, noise_multiplier=0.0) -> HParams:
    f = lambda v: jnp.asarray(v, jnp.float32)
    return cls(f(learning_rate), f(l2_norm_clip), f(noise_multiplier))


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The static part of a training run (hashable: a `jit` static argument).

  Attributes:
    loss_fn: a `ClassifierLoss` (or any hashable mean loss with a `.model`).
    optimizer: "sgd" or "adam" (the paper: Adam for LR, SGD for MLP/CNN).
    defense: "vanilla" (plain gradients), "dp" (clip to C, Gaussian noise
      sigma*C on the sum; sigma = 0 is clipping only) or "adaptive" (clip to C,
      then noise sigma x previous epoch's mean norm, §7.2).
    batch_size: examples per step.
    epochs: passes over the data.
    momentum: SGD momentum (None: plain SGD).
    track_norms: with "vanilla", also compute per-example norm statistics.
  """

  loss_fn: Any
  optimizer: str = "sgd"
  defense: str = "vanilla"
  batch_size: int = 100
  epochs: int = 1
  momentum: float | None = None
  track_norms: bool = False

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.defense not in DEFENSES:
      raise ValueError(f"defense must be one of {DEFENSES}, got {self.defense!r}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.epochs < 0:
      raise ValueError(f"epochs must be >= 0, got {self.epochs}")

  @property
  def model(self):
    return self.loss_fn.model

  def steps_per_epoch(self, num_examples: int) -> int:
    return -(-num_examples // self.batch_size)


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState
  step: jax.Array  # [] int32


class StepMetrics(NamedTuple):
  loss: jax.Array  # [] mean loss of the real examples of the batch (before the update)
  norm_mean: jax.Array  # [] mean per-example gradient norm (NaN when not tracked)
  norm_max: jax.Array  # [] max per-example gradient norm (NaN when not tracked)
  frac_clipped: jax.Array  # [] fraction of examples with norm > C (NaN when not tracked)
  num_nonfinite: jax.Array  # [] int32 examples dropped for a non-finite gradient


def make_optimizer(
  spec: TrainSpec, hparams: HParams, key: jax.Array, steps_per_epoch: int
) -> optax.GradientTransformation:
  """The optax chain for `spec.defense` with traced `hparams` (see `TrainSpec`)."""
  if spec.optimizer == "sgd":
    base = optax.sgd(hparams.learning_rate, momentum=spec.momentum)
  else:
    base = optax.adam(hparams.learning_rate)
  if spec.defense == "vanilla":
    return base
  clip = transforms.clip_per_example(hparams.l2_norm_clip)
  if spec.defense == "dp":
    noise = transforms.add_gaussian_noise(hparams.noise_multiplier, hparams.l2_norm_clip, key)
  else:
    noise = transforms.add_adaptive_noise(hparams.noise_multiplier, steps_per_epoch, key)
  return optax.chain(clip, noise, base)


def init_state(spec, hparams, params, key, steps_per_epoch) -> TrainState:
  opt = make_optimizer(spec, hparams, key, steps_per_epoch)
  return TrainState(params, opt.init(params), jnp.zeros([], jnp.int32))


def train_step(
  spec: TrainSpec,
  hparams: HParams,
  state: TrainState,
  batch: Data,
  key: jax.Array,
  steps_per_epoch: int,
) -> tuple[TrainState, StepMetrics]:
  """One update on `batch` (a dict with x, y and a float `mask`). Pure; jit it.

  `key` must be the same noise key on every step of a run (the transforms
  fold in the step count); `steps_per_epoch` matters only to "adaptive".
  """
  opt = make_optimizer(spec, hparams, key, steps_per_epoch)
  nan = jnp.full([], jnp.nan, jnp.float32)
  if spec.defense == "vanilla" and not spec.track_norms:
    loss, grad = jax.value_and_grad(spec.loss_fn)(state.params, batch)
    updates, opt_state = opt.update(grad, state.opt_state, state.params)
    metrics = StepMetrics(loss, nan, nan, nan, jnp.zeros([], jnp.int32))
  else:
    loss = spec.loss_fn(state.params, batch)
    clipped = per_example.clipped_sum_and_norms(
      spec.loss_fn, state.params, batch, hparams.l2_norm_clip
    )
    if spec.defense == "vanilla":
      real = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
      grad = jax.tree.map(lambda g: g / real, clipped.sum)
      updates, opt_state = opt.update(grad, state.opt_state, state.params)
    else:
      updates, opt_state = opt.update(clipped, state.opt_state, state.params)
    stats = grads_lib.norm_statistics(clipped.norms_B, clipped.mask_B, hparams.l2_norm_clip)
    nonfinite = jnp.sum(~jnp.isfinite(clipped.norms_B) & (batch["mask"] > 0)).astype(jnp.int32)
    metrics = StepMetrics(loss, *stats, nonfinite)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, opt_state, state.step + 1), metrics


def num_examples(data: Data) -> int:
  """N, the number of training examples in `data` (padding included).

  Without `data["index"]` every array holds one row per example. With it,
  `index` `[N]` int32 names the row of each example in the other arrays (a
  pool that may be longer than N), and `mask`, if given, is `[N]`. A grid of
  poisoned training sets (clean points plus each job's own poisons) then
  shares one copy of the pool: under `vmap` only the index and mask are per
  job, not a copy of the whole training set per job.
  """
  if "index" in data:
    return data["index"].shape[0]
  return jax.tree.leaves(data)[0].shape[0]


def shuffled_order(key: jax.Array, valid_N: jax.Array) -> jax.Array:
  """A uniformly random order of the N examples, those with `valid_N > 0` first, `[N]` int32.

  Sorting random keys that carry the example index in their low bits: one
  sort of a single uint32 array, which XLA runs ~9x faster on CPU than
  `argsort` (a two-array sort with a comparator; 425 vs 48 ms for 32 x 15,120
  keys, measured). Each round sorts by fresh random high bits and breaks ties
  by the order of the previous round; with R rounds of b random bits, two
  examples tie in every round with probability 2^(-bR), and R is chosen so
  that some pair of the N does with probability at most about 1 / N (JAX's
  own criterion for `jax.random.permutation`). Invalid examples get the
  largest high bits every round, so they come last.
  """
  n = valid_N.shape[0]
  index_bits = max(1, (n - 1).bit_length())
  random_bits = 31 - index_bits  # one more bit marks invalid examples
  if random_bits < 8:  # a huge N: fall back to a comparator sort of uniforms
    u_N = jnp.where(valid_N > 0, jax.random.uniform(key, (n,)), 2.0)
    return jnp.argsort(u_N).astype(jnp.int32)
  rounds = max(1, math.ceil(3 * math.log2(max(n, 2)) / random_bits))
  position_N = jnp.arange(n, dtype=jnp.uint32)
  order_N = jnp.arange(n, dtype=jnp.int32)
  valid_N = valid_N > 0
  for round_key in jax.random.split(key, rounds):
    high_N = jax.random.bits(round_key, (n,), jnp.uint32) >> (32 - random_bits)
    high_N = jnp.where(valid_N, high_N, jnp.uint32(1 << random_bits))
    pos_N = (jnp.sort((high_N << index_bits) | position_N) & ((1 << index_bits) - 1)).astype(
      jnp.int32
    )
    order_N, valid_N = order_N[pos_N], valid_N[pos_N]
  return order_N


def epoch_batches(key: jax.Array, valid_N: jax.Array | int, batch_size: int):
  """Shuffled example indices `[S, B]` and their mask `[S, B]` (0 marks padding).

  `valid_N` is the number of examples N, or a `[N]` mask of the examples that
  exist (a padded poisoned set: masked examples are never drawn). Real
  examples come first in random order (`shuffled_order`), so batches are full
  except the last real one; steps after it are all padding (and no-ops in
  `train_epoch`).
  """
  if isinstance(valid_N, int):
    valid_N = jnp.ones([valid_N], jnp.float32)
  n = valid_N.shape[0]
  perm_N = shuffled_order(key, valid_N)
  valid_sorted_N = (valid_N[perm_N] > 0).astype(jnp.float32)
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  idx = jnp.concatenate([perm_N, jnp.zeros([pad], perm_N.dtype)])
  mask = jnp.concatenate([valid_sorted_N, jnp.zeros([pad], jnp.float32)])
  return idx.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def _weighted_mean(total_tree, total_weight):
  """`total_tree` (a weighted sum from `_accumulate`) divided by the total weight (at least 1)."""
  total = jnp.maximum(total_weight, 1.0)
  return jax.tree.map(lambda t: t / total.astype(t.dtype), total_tree)


def _accumulate(total_tree, tree, weight):
  """`total_tree + weight * tree`; entries of `tree` are ignored (even NaN) where weight is 0."""
  return jax.tree.map(
    lambda t, m: t + jnp.where(weight > 0, m, 0) * weight.astype(m.dtype), total_tree, tree
  )


def _zeros_of(fn, *args):
  """Zeros shaped and typed like `fn(*args)`, without running it."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


def train_epoch(
  spec: TrainSpec,
  hparams: HParams,
  state: TrainState,
  data: Data,
  key: jax.Array,
  noise_key: jax.Array,
  batch_metrics_fn: Callable[[Params, Data], Any] | None = None,
):
  """One shuffled pass over `data` as a `lax.scan`.

  With `data["mask"]` (1 for examples that exist, 0 for padding, e.g. a
  poisoned set padded to the size of the largest poison ratio in a grid),
  only real examples are drawn and steps with no real example leave the state
  unchanged, so padding changes nothing but the compiled shape.

  Returns the new state, the epoch's mean `StepMetrics` over steps with real
  examples (non-finite counts summed) and, with `batch_metrics_fn(params,
  batch)`, its output averaged over the same steps (evaluated before each
  update). The averages are accumulated as sums in the scan carry, so memory
  does not grow with the number of steps (per-step outputs are never stacked:
  two parameter-sized trees per step would be gigabytes for an MLP epoch).
  """
  n = num_examples(data)
  valid = data["mask"] if "mask" in data else n
  idx_SB, mask_SB = epoch_batches(key, valid, spec.batch_size)
  if "mask" in data:
    real_steps = jnp.ceil(jnp.sum(data["mask"] > 0) / spec.batch_size).astype(jnp.int32)
  else:
    real_steps = idx_SB.shape[0]

  def gather(idx_B, mask_B):
    rows_B = data["index"][idx_B] if "index" in data else idx_B
    batch = {k: v[rows_B] for k, v in data.items() if k not in ("mask", "index")}
    batch["mask"] = mask_B
    return batch

  def step_outputs(state, batch):
    extra = batch_metrics_fn(state.params, batch) if batch_metrics_fn else None
    new_state, metrics = train_step(spec, hparams, state, batch, noise_key, real_steps)
    return new_state, metrics, extra

  # Zero accumulators shaped like one step's (metrics, extra).
  _, metrics0, extra0 = _zeros_of(step_outputs, state, gather(idx_SB[0], mask_SB[0]))

  def body(carry, xs):
    state, metrics_sum, extra_sum, weight_sum = carry
    batch = gather(*xs)
    new_state, metrics, extra = step_outputs(state, batch)
    has_real = jnp.any(batch["mask"] > 0)
    if "mask" in data:
      new_state = jax.tree.map(lambda a, b: jnp.where(has_real, a, b), new_state, state)
    weight = has_real.astype(jnp.float32)
    nonfinite = metrics_sum.num_nonfinite + metrics.num_nonfinite
    metrics_sum = _accumulate(metrics_sum, metrics, weight)._replace(num_nonfinite=nonfinite)
    extra_sum = _accumulate(extra_sum, extra, weight)
    return (new_state, metrics_sum, extra_sum, weight_sum + weight), None

  init = (state, metrics0, extra0, jnp.zeros([], jnp.float32))
  (state, metrics_sum, extra_sum, weight_sum), _ = jax.lax.scan(body, init, (idx_SB, mask_SB))
  means = _weighted_mean(metrics_sum, weight_sum)
  means = means._replace(num_nonfinite=metrics_sum.num_nonfinite)
  extra = _weighted_mean(extra_sum, weight_sum)
  return state, means, extra


class FitResult(NamedTuple):
  params: Params
  records: dict[str, jax.Array]  # each [E, ...]: per-epoch records


def fit(
  spec: TrainSpec,
  hparams: HParams,
  key: jax.Array,
  data: Data,
  *,
  init_params: Params | None = None,
  eval_fn: Callable[[Params], dict[str, jax.Array]] | None = None,
  batch_metrics_fn: Callable[[Params, Data], Any] | None = None,
) -> FitResult:
  """Trains from scratch (or fine-tunes `init_params`) for `spec.epochs` epochs.

  Pure in (hparams, key, data, init_params): `jax.jit(fit, static_argnums=0)`
  and `jax.vmap` over hparams and keys give a whole grid in one program.

  Args:
    spec: the static `TrainSpec`.
    hparams: `HParams` of scalars.
    key: PRNG key; split into initialisation, shuffling and noise keys.
    data: dict with `x` `[N, ...]`, `y` `[N]` int32, optionally `weight`,
      `mask` (0: padding, never drawn), `index` (see `num_examples`: the
      examples as rows of a shared pool) and any other per-example arrays (e.g.
      `is_poison`) that `batch_metrics_fn` may use.
    init_params: parameters to fine-tune from; None initialises the model.
    eval_fn: `eval_fn(params) -> dict of arrays`, recorded after every epoch
      (e.g. test accuracy, the target's prediction).
    batch_metrics_fn: `fn(params, batch) -> pytree`, averaged over each
      epoch's batches (e.g. mean clean and poison gradients, §3).

  Returns:
    `FitResult(params, records)`; `records` has `train_loss`, `norm_mean`,
    `norm_max`, `frac_clipped`, `num_nonfinite`, `step` (updates so far), the `eval_fn` outputs and
    `batch_metrics` (if given), each with a leading epoch axis.
  """
  key_init, key_shuffle, key_noise = jax.random.split(key, 3)
  if init_params is None:
    init_params = models_lib.init_params(spec.model, key_init, data["x"].shape[1:])
  steps_per_epoch = spec.steps_per_epoch(num_examples(data))
  state = init_state(spec, hparams, init_params, key_noise, steps_per_epoch)

  def epoch(state, epoch_key):
    state, metrics, extra = train_epoch(
      spec, hparams, state, data, epoch_key, key_noise, batch_metrics_fn
    )
    record = {
      "train_loss": metrics.loss,
      "norm_mean": metrics.norm_mean,
      "norm_max": metrics.norm_max,
      "frac_clipped": metrics.frac_clipped,
      "num_nonfinite": metrics.num_nonfinite,
      "step": state.step,
    }
    if eval_fn is not None:
      record.update(eval_fn(state.params))
    if batch_metrics_fn is not None:
      record["batch_metrics"] = extra
    return state, record

  state, records = jax.lax.scan(epoch, state, jax.random.split(key_shuffle, spec.epochs))
  return FitResult(state.params, records)


def accuracy(model, params: Params, x_N: jax.Array, y_N: jax.Array, chunk: int = 1000):
  """Fraction of `x_N` classified as `y_N`, evaluated in chunks of `chunk`."""
  correct_N = _map_chunks(
    lambda x_B, y_B: models_lib.predict(model, params, x_B) == y_B, (x_N, y_N), chunk
  )
  return jnp.mean(correct_N.astype(jnp.float32))


def predictions(model, params: Params, x_N: jax.Array, chunk: int = 1000) -> jax.Array:
  """Predicted class of each input, `[N]`, in chunks."""
  return _map_chunks(lambda x_B: models_lib.predict(model, params, x_B), (x_N,), chunk)


def _map_chunks(fn, arrays, chunk):
  n = arrays[0].shape[0]
  if n <= chunk:
    return fn(*arrays)
  steps = -(-n // chunk)
  pad = steps * chunk - n
  padded = [jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in arrays]
  chunks = [a.reshape(steps, chunk, *a.shape[1:]) for a in padded]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(chunks))
  return out.reshape(steps * chunk, *out.shape[2:])[:n]


def evaluator(model, x_test: jax.Array, y_test: jax.Array) -> Callable[[Params], dict]:
  """An `eval_fn` recording test accuracy (`test_acc`) after each epoch."""
  return lambda params: {"test_acc": accuracy(model, params, x_test, y_test)}
