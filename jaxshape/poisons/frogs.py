"""Poison Frogs: clean-label feature-collision poisons (forward-backward splitting).

Shapes: N pool examples (candidate bases), K candidates, F penultimate
features, D input features (flattened size of one input), P poisons.

For a target t and a base b of another class, the poison x minimises
||f(x) - f(t)||^2 + beta ||x - b||^2 (f: the penultimate layer) by
forward-backward splitting:

  forward:   x <- x - lr * grad_x ||f(x) - f(t)||^2
  backward:  x <- (x + lr * beta * b) / (1 + lr * beta)     (proximal step)
  box:       x <- clip(x, 0, 1)

and keeps the base's (clean) label. Candidates are vmapped: each row of
`x_base_K` is an independent one-shot attempt; the loop (a `lax.while_loop`)
stops at `max_iters` or when every candidate's feature distance is below
`stop_distance` (a finished candidate is frozen). Only poisons within
`max_feature_distance` (3.5 in the paper) of the target in feature space are
kept, sorted by that distance, so poisons 1..k of the result are what the
multi-poison experiment adds in order.

References:
  Shafahi et al. 2018, "Poison Frogs! Targeted Clean-Label Poisoning Attacks on
  Neural Networks", §2 and Algorithm 1 (feature collision, forward-backward
  splitting, beta = beta0 (2048 / dim_b)^2 rescaled to our feature and input
  sizes), §4.2 (watermarking for multi-poison attacks). Hong et al. 2020, §6.3
  (100 targets, 100 candidate bases nearest the target in penultimate space,
  <= 10k iterations, feature distance bound 3.5) and §6.4 (multi-poison).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape import models as models_lib
from jaxshape._typing import ArrayLike
from jaxshape._typing import Params
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import take_rows


@functools.partial(jax.jit, static_argnames=("model", "num_candidates"))
def _nearest(model, params, x_target, x_pool_N, y_pool_N, base_class, *, num_candidates):
  f_target_F = models_lib.features(model, params, x_target[None])[0]
  f_pool_NF = models_lib.features(model, params, x_pool_N)
  dist_N = jnp.linalg.norm(f_pool_NF - f_target_F[None], axis=-1)
  dist_N = jnp.where(y_pool_N == base_class, dist_N, jnp.inf)
  neg_dist_K, idx_K = jax.lax.top_k(-dist_N, num_candidates)
  return idx_K.astype(jnp.int32), -neg_dist_K


def nearest_candidates(
  model: Any,
  params: Params,
  x_target: ArrayLike,
  x_pool: ArrayLike,
  y_pool: ArrayLike,
  base_class: int,
  num_candidates: int = 100,
  *,
  num_classes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The `num_candidates` points of `base_class` nearest the target in feature space.

  Args:
    model, params: the (pre-trained) victim model and its parameters.
    x_target: the target input `[...]` (no batch axis).
    x_pool: where bases come from `[N, ...]` (the paper: the test set).
    y_pool: their labels `[N]`.
    base_class: the class of the bases (the class the target should become).
    num_candidates: K (the paper: 100).
    num_classes: C; inferred from `y_pool` when None.

  Returns:
    `(idx_K, distance_K)`: indices into the pool, nearest first, and their
    feature distances to the target.

  References:
    Hong et al. 2020, §6.3 (100 candidate bases nearest in penultimate space).
  """
  x_N = _validate.check_inputs("x_pool", x_pool, min_rank=2)
  y_N, num_classes = _validate.check_labels("y_pool", y_pool, x_N.shape[0], num_classes)
  x_t = _validate.check_inputs("x_target", x_target)
  if x_t.shape != x_N.shape[1:]:
    raise ValueError(f"x_target must have the input shape {x_N.shape[1:]}, got {x_t.shape}")
  base_class = _validate.check_class("base_class", base_class, num_classes)
  available = int(np.sum(np.asarray(y_N) == base_class))
  num_candidates = _validate.check_int("num_candidates", num_candidates, 1, available)
  return _nearest(model, params, x_t, x_N, y_N, base_class, num_candidates=num_candidates)


class Collision(NamedTuple):
  """The state and result of feature-collision crafting for K candidates."""

  x_K: jax.Array  # [K, ...] float32: the poisons
  distance_K: jax.Array  # [K] float32: ||f(x) - f(t)|| at the end
  initial_distance_K: jax.Array  # [K] float32: ||f(base) - f(t)||
  iterations_K: jax.Array  # [K] int32: iterations each candidate ran


def _feature_distance(model, params, x_K, f_target_F):
  f_KF = models_lib.features(model, params, x_K)
  return jnp.linalg.norm(f_KF - f_target_F[None], axis=-1)


def _iterate(model, params, f_target_F, x_base_K, x_K, done_K, iters_K, learning_rate, beta, stop):
  """One forward-backward step for every candidate not yet done (done ones stay frozen)."""

  def objective(x_K):
    f_KF = models_lib.features(model, params, x_K)
    sq_K = jnp.sum((f_KF - f_target_F[None]) ** 2, axis=-1)
    return jnp.sum(sq_K), jnp.sqrt(sq_K)

  (_, dist_K), grad_K = jax.value_and_grad(objective, has_aux=True)(x_K)
  done_K = done_K | (dist_K < stop)
  forward_K = x_K - learning_rate * grad_K
  backward_K = (forward_K + learning_rate * beta * x_base_K) / (1.0 + learning_rate * beta)
  new_K = jnp.clip(backward_K, 0.0, 1.0)
  keep = done_K.reshape((-1,) + (1,) * (x_K.ndim - 1))
  return jnp.where(keep, x_K, new_K), done_K, iters_K + (~done_K).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _collide(model, params, x_target, x_base_K, state, learning_rate, beta, stop_distance, steps):
  """Runs up to `steps` forward-backward iterations from `state` in a `lax.while_loop`."""
  f_target_F = models_lib.features(model, params, x_target[None])[0]

  def cond(carry):
    i, _, done_K, _ = carry
    return (i < steps) & ~jnp.all(done_K)

  def body(carry):
    i, x_K, done_K, iters_K = carry
    x_K, done_K, iters_K = _iterate(
      model,
      params,
      f_target_F,
      x_base_K,
      x_K,
      done_K,
      iters_K,
      learning_rate,
      beta,
      stop_distance,
    )
    return i + 1, x_K, done_K, iters_K

  done_K = state.distance_K < stop_distance
  init = (jnp.zeros([], jnp.int32), state.x_K, done_K, state.iterations_K)
  _, x_K, _, iters_K = jax.lax.while_loop(cond, body, init)
  distance_K = _feature_distance(model, params, x_K, f_target_F)
  return Collision(x_K, distance_K, state.initial_distance_K, iters_K)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("x_K", "iters_K"))
def _host_step(model, params, f_target_F, x_base_K, x_K, done_K, iters_K, lr, beta, stop):
  return _iterate(model, params, f_target_F, x_base_K, x_K, done_K, iters_K, lr, beta, stop)


@functools.partial(jax.jit, static_argnames=("model",))
def _target_features(model, params, x_target):
  return models_lib.features(model, params, x_target[None])[0]


@functools.partial(jax.jit, static_argnames=("model",))
def _distances(model, params, x_K, f_target_F):
  return _feature_distance(model, params, x_K, f_target_F)


def _collide_on_host(model, params, x_target, x_base_K, state, lr, beta, stop, steps, sync_every):
  """`_collide` with the loop in Python around one jitted step (CPU convolutions run
  several times faster outside XLA loop bodies: jax-ml/jax#12868)."""
  f_target_F = _target_features(model, params, x_target)
  x_K, iters_K = jnp.array(state.x_K), jnp.array(state.iterations_K)
  done_K = state.distance_K < stop
  for i in range(steps):
    x_K, done_K, iters_K = _host_step(
      model, params, f_target_F, x_base_K, x_K, done_K, iters_K, lr, beta, stop
    )
    if (i + 1) % sync_every == 0 and bool(jnp.all(done_K)):
      break
  distance_K = _distances(model, params, x_K, f_target_F)
  return Collision(x_K, distance_K, state.initial_distance_K, iters_K)


@functools.partial(jax.jit, static_argnames=("model",))
def _start(model, params, x_target, x_base_K):
  f_target_F = models_lib.features(model, params, x_target[None])[0]
  distance_K = _feature_distance(model, params, x_base_K, f_target_F)
  iters_K = jnp.zeros(x_base_K.shape[:1], jnp.int32)
  return Collision(x_base_K, distance_K, distance_K, iters_K)


def collide(
  model: Any,
  params: Params,
  x_target: jax.Array,
  x_base_K: jax.Array,
  learning_rate: ArrayLike,
  beta: ArrayLike,
  max_iters: ArrayLike,
  stop_distance: ArrayLike = 0.0,
) -> Collision:
  """The pure crafting core: forward-backward splitting for K candidates at once.

  All numeric arguments may be traced, so this can be `vmap`-ed over targets
  (each with its own candidates). No validation: see `poison_frogs`.

  Returns:
    A `Collision` with the poisons and their feature distances.
  """
  start = _start(model, params, x_target, x_base_K)
  return _collide(
    model, params, x_target, x_base_K, start, learning_rate, beta, stop_distance, max_iters
  )


def default_beta(model: Any, params: Params, input_shape: tuple[int, ...], beta0: float = 0.25):
  """Shafahi et al.'s beta = beta0 (F / D)^2 for F features and D input features."""
  f = models_lib.features(model, params, jnp.zeros((1, *input_shape), jnp.float32)).shape[-1]
  return beta0 * (f / float(np.prod(input_shape))) ** 2


def poison_frogs(
  model: Any,
  params: Params,
  x_target: ArrayLike,
  x_pool: ArrayLike,
  y_pool: ArrayLike,
  base_idx: ArrayLike,
  *,
  target_idx: int = -1,
  learning_rate: float = 0.01,
  beta: float | None = None,
  max_iters: int = 10_000,
  stop_distance: float = 0.0,
  max_feature_distance: float = 3.5,
  watermark: float = 0.0,
  keep_rejected: bool = False,
  base_split: str = "test",
  loop: str = "while",
  progress: bool = False,
  progress_every: int = 500,
) -> PoisonSet:
  """Poison Frogs poisons for one target from candidate bases, sorted by feature distance.

  Each candidate is an independent one-shot attempt (§6.3: success if any one
  poison, added alone, flips the target); poisons 1..k of the result, in
  order, are the multi-poison attack (§6.4: add them until the target flips).

  Args:
    model, params: the victim model (pre-trained) whose `features` are
      collided, and its parameters.
    x_target: the target input `[...]` (no batch axis).
    x_pool: where the bases come from `[N, ...]` (the paper: the test set).
    y_pool: their labels `[N]` (each poison keeps its base's label).
    base_idx: `[K]` candidate indices into the pool, e.g. from
      `nearest_candidates`.
    target_idx: index of the target (in the test split) for the record.
    learning_rate: forward step size.
    beta: weight of the proximity to the base; default beta0 (F / D)^2 with
      beta0 = 0.25 (Shafahi et al.).
    max_iters: iteration cap (the paper: 10,000).
    stop_distance: a candidate stops once its feature distance is below this.
    max_feature_distance: keep only poisons this close to the target in
      feature space (the paper: 3.5); `inf` keeps all.
    watermark: opacity in [0, 1) of the target overlaid on each base before
      crafting (Shafahi et al. §4.2 use 0.3 for multi-poison); 0 for none.
    keep_rejected: also return poisons beyond `max_feature_distance` (after
      the accepted ones; `info["accepted_P"]` tells them apart).
    base_split: what `base_idx` indexes, for the record ("test").
    loop: "while" runs the iterations in a `lax.while_loop` (best for dense
      models); "host" drives one jitted step from Python, about 3x faster
      for CNNs on CPU, where XLA runs convolutions inside loop bodies slowly
      (jax-ml/jax#12868). Both give the same poisons.
    progress: show a tqdm bar (crafting runs in jitted chunks of
      `progress_every` iterations).
    progress_every: iterations per chunk when `progress` is set.

  Returns:
    A `PoisonSet` (attack "poison_frogs"), labels = the bases' labels,
    `target_class` = the bases' class when they share one, sorted by final
    feature distance; `info` has `feature_distance_P`,
    `initial_feature_distance_P`, `input_distance_P` (l2 to the base),
    `iterations_P` and `accepted_P`.

  Example:
    >>> idx_K, _ = nearest_candidates(model, params, x_test[t], x_test, y_test, 3)
    >>> poisons = poison_frogs(model, params, x_test[t], x_test, y_test, idx_K,
    ...                        target_idx=t)
    >>> one_shot = [poisons.take([i]) for i in range(len(poisons))]

  References:
    Shafahi et al. 2018, Algorithm 1; Hong et al. 2020, §6.3, §6.4.
  """
  x_N = _validate.check_inputs("x_pool", x_pool, min_rank=2)
  y_N, _ = _validate.check_labels("y_pool", y_pool, x_N.shape[0], None)
  x_t = _validate.check_inputs("x_target", x_target)
  if x_t.shape != x_N.shape[1:]:
    raise ValueError(f"x_target must have the input shape {x_N.shape[1:]}, got {x_t.shape}")
  base_K = _validate.check_indices("base_idx", base_idx, x_N.shape[0])
  if base_K.shape[0] < 1:
    raise ValueError("base_idx must name at least one candidate base")
  _validate.check_positive("learning_rate", learning_rate)
  if beta is None:
    beta = default_beta(model, params, x_t.shape)
  _validate.check_nonnegative("beta", beta)
  max_iters = _validate.check_int("max_iters", max_iters, 0)
  _validate.check_nonnegative("stop_distance", stop_distance)
  _validate.check_range("max_feature_distance", max_feature_distance, 0.0, np.inf, lo_open=True)
  _validate.check_range("watermark", watermark, 0.0, 1.0, hi_open=True)
  progress_every = _validate.check_int("progress_every", progress_every, 1)
  if loop not in ("while", "host"):
    raise ValueError(f"loop must be 'while' or 'host', got {loop!r}")

  x_clean_K, y_K = take_rows((x_N, y_N), base_K)
  x_base_K = _overlay(x_clean_K, x_t, jnp.float32(watermark)) if watermark > 0.0 else x_clean_K
  lr, b = jnp.float32(learning_rate), jnp.float32(beta)
  stop = jnp.float32(stop_distance)
  state = _start(model, params, x_t, x_base_K)
  chunk = progress_every if progress else max(max_iters, 1)
  bar = _progress_bar(max_iters, progress)
  done = 0
  while done < max_iters:
    steps = min(chunk, max_iters - done)
    if loop == "while":
      state = _collide(model, params, x_t, x_base_K, state, lr, b, stop, jnp.int32(steps))
    else:
      state = _collide_on_host(
        model, params, x_t, x_base_K, state, lr, b, stop, steps, progress_every
      )
    done += steps
    if bar is not None:
      bar.update(steps)
      bar.set_postfix(min_distance=float(jnp.min(state.distance_K)))
    if bool(np.all(np.asarray(state.distance_K) < stop_distance)):
      break
  if bar is not None:
    bar.close()

  distance_K = np.asarray(state.distance_K)
  accepted_K = distance_K <= max_feature_distance
  order = np.argsort(distance_K, kind="stable")
  if not keep_rejected:
    order = order[accepted_K[order]]
  rows = take_rows(
    {
      "x": state.x_K,
      "y": y_K,
      "base": base_K,
      "distance": state.distance_K,
      "initial": state.initial_distance_K,
      "input": _input_distance(state.x_K, x_clean_K),
      "iterations": state.iterations_K,
    },
    jnp.asarray(order, jnp.int32),
  )
  classes = np.unique(np.asarray(y_K))
  p = int(order.shape[0])
  return PoisonSet(
    x=rows["x"],
    y=rows["y"],
    attack="poison_frogs",
    base_idx=rows["base"],
    target_idx=jnp.asarray(np.full([p], target_idx, np.int32)),
    target_class=int(classes[0]) if classes.size == 1 else -1,
    base_split=base_split,
    target_split="test",
    config={
      "learning_rate": float(learning_rate),
      "beta": float(beta),
      "max_iters": max_iters,
      "stop_distance": float(stop_distance),
      "max_feature_distance": float(max_feature_distance),
      "watermark": float(watermark),
      "num_candidates": int(base_K.shape[0]),
      "loop": loop,
    },
    info={
      "feature_distance_P": rows["distance"],
      "initial_feature_distance_P": rows["initial"],
      "input_distance_P": rows["input"],
      "iterations_P": rows["iterations"],
      "accepted_P": jnp.asarray(accepted_K[order]),
    },
  )


@jax.jit
def _overlay(x_base_K, x_target, alpha):
  return jnp.clip((1.0 - alpha) * x_base_K + alpha * x_target[None], 0.0, 1.0)


@jax.jit
def _input_distance(x_K, x_base_K):
  return jnp.linalg.norm((x_K - x_base_K).reshape(x_K.shape[0], -1), axis=-1)


def _progress_bar(total: int, show: bool):
  if not show:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc="poison frogs", unit="it")
