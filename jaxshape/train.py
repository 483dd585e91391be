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

Each epoch visits every example once (`jaxshape.batching`: shuffled, cut
into ceil(N / B) batches, the last one padded with masked examples, never
dropped).

One path from hyperparameters to an update: `fit` builds the optimizer once
(`make_optimizer`); `train_step` clips once (`clipped_sum_and_norms`),
computes the norm statistics once (`transforms.clip_statistics`, which reach
the per-epoch records) and hands the `ClippedSum` to the optimizer, which
adds noise (`add_gaussian_noise` / `add_adaptive_noise`) and steps. "vanilla"
with `track_norms` is "dp" with C = inf and sigma = 0 (`defense_hparams`).

References:
  Hong et al. 2020, §6.1 (training setup), Appendix B (DP-SGD / DP-Adam),
  §7.2 (adaptive noise).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape import models as models_lib
from jaxshape import per_example
from jaxshape import shaping
from jaxshape import transforms
from jaxshape._typing import ArrayLike
from jaxshape._typing import Batch
from jaxshape._typing import Data
from jaxshape._typing import Params
from jaxshape.batching import epoch_batches
from jaxshape.batching import num_examples
from jaxshape.batching import poisson_batches
from jaxshape.batching import steps_per_epoch

DEFENSES = ("vanilla", "dp", "adaptive", *shaping.DEFENSES)
OPTIMIZERS = ("sgd", "adam")
SAMPLINGS = ("shuffle", "poisson")


def _check_hparams(learning_rate, l2_norm_clip, noise_multiplier, shaping_param=0.0) -> None:
  """ValueError for concrete out-of-range hyperparameters (traced ones pass unchecked)."""
  _validate.check_range("shaping_param", shaping_param, -1.0, 1.0)
  _validate.check_range("learning_rate", learning_rate, 0.0, math.inf, hi_open=True)
  _validate.check_range("l2_norm_clip", l2_norm_clip, 0.0, math.inf, lo_open=True)
  _validate.check_range("noise_multiplier", noise_multiplier, 0.0, math.inf, hi_open=True)


class HParams(NamedTuple):
  """Numeric hyperparameters: scalars, or vectors with a leading grid axis under vmap."""

  learning_rate: jax.Array  # [] float32, in [0, inf)
  l2_norm_clip: jax.Array  # [] float32, in (0, inf]; inf means no clipping
  noise_multiplier: jax.Array  # [] float32, in [0, inf); 0 means no noise
  # [] float32 in [-1, 1]: the shaping defense's own parameter (`shaping.DEFENSES`)
  shaping_param: jax.Array = np.float32(0.0)

  @classmethod
  def create(
    cls, learning_rate, l2_norm_clip=math.inf, noise_multiplier=0.0, shaping_param=0.0
  ) -> HParams:
    """Float32 hyperparameters; concrete values out of range raise ValueError naming them."""
    _check_hparams(learning_rate, l2_norm_clip, noise_multiplier, shaping_param)
    f = lambda v: jnp.asarray(v, jnp.float32)
    lr, clip, noise, param = map(f, (learning_rate, l2_norm_clip, noise_multiplier, shaping_param))
    if param.ndim == 0:  # the default 0 follows a grid of the others (a vmap maps every field)
      param = jnp.broadcast_to(param, jnp.broadcast_shapes(lr.shape, clip.shape, noise.shape))
    return cls(lr, clip, noise, param)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The static part of a training run (hashable: a `jit` static argument).

  Attributes:
    loss_fn: a `ClassifierLoss` (or any hashable mean loss with a `.model`).
    optimizer: "sgd" or "adam" (the paper: Adam for LR, SGD for MLP/CNN).
    defense: "vanilla" (plain gradients), "dp" (clip to C, Gaussian noise
      sigma*C on the sum; sigma = 0 is clipping only) or "adaptive" (clip to C,
      then noise sigma x previous epoch's mean norm, §7.2), or a shaping
      mechanism beyond DP-SGD (`shaping.DEFENSES`: "centered", "cosine",
      "trimmed", "median", "quantile"; its parameter is `shaping_param`, and
      noise sigma x C is added after it).
    batch_size: examples per step, an int >= 1.
    epochs: passes over the data, an int >= 0.
    momentum: SGD momentum in [0, 1) (None: plain SGD).
    track_norms: with "vanilla", also record per-example norm statistics: the
      step is then "dp" with C = inf and sigma = 0 (same code, same result).
    sampling: "shuffle" (each epoch visits every example once in fixed
      batches; `batching.epoch_batches`) or "poisson" (every step takes each
      example with probability B/N, padded to a fixed shape;
      `batching.poisson_batches`): the sampling `accounting.epsilon(...,
      sampling=...)` must be told. With "poisson" the noisy sum is still
      divided by the step's real example count, not the expected B (Opacus
      divides by B); the experiments train with "shuffle".
  """

  loss_fn: Any
  optimizer: str = "sgd"
  defense: str = "vanilla"
  batch_size: int = 100
  epochs: int = 1
  momentum: float | None = None
  track_norms: bool = False
  sampling: str = "shuffle"

  def __post_init__(self):
    if not callable(self.loss_fn):
      raise ValueError(f"loss_fn must be callable as loss_fn(params, batch), got {self.loss_fn!r}")
    try:
      hash(self.loss_fn)
    except TypeError as e:
      raise ValueError(
        "loss_fn must be hashable (a function or a frozen dataclass such as ClassifierLoss)"
      ) from e
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.defense not in DEFENSES:
      raise ValueError(f"defense must be one of {DEFENSES}, got {self.defense!r}")
    _validate.check_int("batch_size", self.batch_size, 1)
    _validate.check_int("epochs", self.epochs, 0)
    if self.momentum is not None:
      _validate.check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    if self.sampling not in SAMPLINGS:
      raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
    if not isinstance(self.track_norms, bool):
      raise ValueError(f"track_norms must be a bool, got {self.track_norms!r}")

  @property
  def model(self):
    return self.loss_fn.model

  @property
  def computes_norms(self) -> bool:
    """Whether a step computes per-example norms (every defense, and vanilla with track_norms)."""
    return self.defense != "vanilla" or self.track_norms


class TrainState(NamedTuple):
  params: Params
  opt_state: optax.OptState
  step: jax.Array  # [] int32: updates so far


class StepMetrics(NamedTuple):
  loss: jax.Array  # [] mean loss of the real examples of the batch (before the update)
  norm_mean: jax.Array  # [] mean per-example gradient norm (NaN when not tracked)
  norm_max: jax.Array  # [] max per-example gradient norm (NaN when not tracked)
  frac_clipped: jax.Array  # [] fraction of examples with norm > C (NaN when not tracked)
  num_nonfinite: jax.Array  # [] int32 examples dropped for a non-finite gradient


def defense_hparams(spec: TrainSpec, hparams: HParams) -> HParams:
  """The hyperparameters the defense applies: "vanilla" is "dp" with C = inf and sigma = 0."""
  if spec.defense != "vanilla":
    return hparams
  inf, zero = jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0.0, jnp.float32)
  return hparams._replace(l2_norm_clip=inf, noise_multiplier=zero)


def make_optimizer(
  spec: TrainSpec, hparams: HParams, key: jax.Array, steps_per_epoch: ArrayLike
) -> optax.GradientTransformation:
  """The update rule of a run, built once per `fit` (`hparams` may be traced).

  Without per-example norms (plain "vanilla") it is the base optimizer on the
  mean gradient. Otherwise it takes the step's `ClippedSum` (clipping happens
  in `train_step`, once) and adds noise before the base optimizer:
  `add_gaussian_noise` for "dp" (and for "vanilla" with `track_norms`, as "dp"
  with C = inf, sigma = 0: no noise is drawn), `add_adaptive_noise` for
  "adaptive" (`steps_per_epoch` marks its epochs). A `shaping.DEFENSES`
  defense chains its shaping transform before `add_gaussian_noise`.
  """
  hp = defense_hparams(spec, hparams)
  if spec.optimizer == "sgd":
    base = optax.sgd(hp.learning_rate, momentum=spec.momentum)
  else:
    base = optax.adam(hp.learning_rate)
  if not spec.computes_norms:
    return base
  if spec.defense == "adaptive":
    noise = transforms.add_adaptive_noise(hp.noise_multiplier, steps_per_epoch, key)
  else:
    noise = transforms.add_gaussian_noise(hp.noise_multiplier, hp.l2_norm_clip, key)
  if spec.defense in shaping.DEFENSES:
    return optax.chain(
      shaping.for_defense(spec.defense, hp.l2_norm_clip, hp.shaping_param), noise, base
    )
  return optax.chain(noise, base)


def init_state(optimizer: optax.GradientTransformation, params: Params) -> TrainState:
  return TrainState(params, optimizer.init(params), jnp.zeros([], jnp.int32))


def train_step(
  spec: TrainSpec,
  hparams: HParams,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  batch: Batch,
) -> tuple[TrainState, StepMetrics]:
  """One update on `batch` (a dict with x, y and a float `mask`). Pure; jit it.

  With per-example norms (`spec.computes_norms`) this is where clipping happens
  (`clipped_sum_and_norms` at the defense's C) and where the norm statistics
  are computed; `optimizer` (from `make_optimizer`) adds noise and steps.
  """
  if spec.computes_norms:
    loss = spec.loss_fn(state.params, batch)
    clip = defense_hparams(spec, hparams).l2_norm_clip
    if spec.defense in shaping.DEFENSES:  # its transform (opt_state[0]) aggregates
      grads, clipped = shaping.step_input(
        spec.defense,
        spec.loss_fn,
        state.params,
        batch,
        state.opt_state[0],
        clip,
        hparams.shaping_param,
      )
    else:
      clipped = per_example.clipped_sum_and_norms(spec.loss_fn, state.params, batch, clip)
      grads = clipped
    if "mask" in batch:  # padding rows are not examples (a NaN row they copy is not dropped)
      clipped = clipped._replace(norms_B=jnp.where(batch["mask"] > 0, clipped.norms_B, 0.0))
    metrics = StepMetrics(loss, *transforms.clip_statistics(clipped))
  else:
    loss, grads = jax.value_and_grad(spec.loss_fn)(state.params, batch)
    nan = jnp.full([], jnp.nan, jnp.float32)
    metrics = StepMetrics(loss, nan, nan, nan, jnp.zeros([], jnp.int32))
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, opt_state, state.step + 1), metrics


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
  optimizer: optax.GradientTransformation,
  state: TrainState,
  data: Data,
  key: jax.Array,
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
  batches = poisson_batches if spec.sampling == "poisson" else epoch_batches
  idx_SB, mask_SB = batches(key, valid, spec.batch_size)

  def gather(idx_B, mask_B):
    rows_B = data["index"][idx_B] if "index" in data else idx_B
    batch = {k: v[rows_B] for k, v in data.items() if k not in ("mask", "index")}
    batch["mask"] = mask_B
    return batch

  def step_outputs(state, batch):
    extra = batch_metrics_fn(state.params, batch) if batch_metrics_fn else None
    new_state, metrics = train_step(spec, hparams, optimizer, state, batch)
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


def _check_fit_inputs(spec: TrainSpec, hparams: HParams, data: Data) -> None:
  """ValueError for data without examples and concrete hyperparameters the defense cannot use."""
  if not isinstance(hparams, HParams):
    raise ValueError(f"hparams must be a train.HParams, got {type(hparams).__name__}")
  _check_hparams(*hparams)
  if spec.defense == "dp" and not any(map(_validate.is_traced, hparams)):
    infinite_noise = np.isinf(np.asarray(hparams.l2_norm_clip)) & (
      np.asarray(hparams.noise_multiplier) > 0
    )
    if np.any(infinite_noise):
      raise ValueError(
        'defense "dp" with l2_norm_clip = inf and noise_multiplier > 0 adds infinite noise '
        "(std sigma x C): give a finite l2_norm_clip, or noise_multiplier = 0"
      )
  if not isinstance(data, Mapping) or "x" not in data or "y" not in data:
    raise ValueError("data must be a dict with x [N, ...] and y [N] (see train.fit)")
  if num_examples(data) == 0:
    raise ValueError("data holds no examples (N = 0): training needs N >= 1")
  mask = data.get("mask")
  if mask is not None and not _validate.is_traced(mask) and not np.any(np.asarray(mask) > 0):
    raise ValueError("data['mask'] marks no example as real: training needs at least one")


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
  _check_fit_inputs(spec, hparams, data)
  key_init, key_shuffle, key_noise = jax.random.split(key, 3)
  if init_params is None:
    init_params = models_lib.init_params(spec.model, key_init, data["x"].shape[1:])
  optimizer = make_optimizer(spec, hparams, key_noise, steps_per_epoch(data, spec.batch_size))
  state = init_state(optimizer, init_params)

  def epoch(state, epoch_key):
    state, metrics, extra = train_epoch(
      spec, hparams, optimizer, state, data, epoch_key, batch_metrics_fn
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
