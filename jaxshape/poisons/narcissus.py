"""Narcissus: a clean-label backdoor from a trigger that pulls the target class to itself.

Shapes: N clean training examples, P poisons, T attacker's target-class
examples, S optimisation steps, B batch.

The attacker knows only some examples of the target class and has public
out-of-distribution (POOD) data. Three steps (Zeng et al. 2022, §3):

1. `surrogate_set`: a surrogate is trained on the POOD data plus the
   target-class examples (the caller trains it, e.g. with `train.fit`).
2. `optimise_trigger`: an additive trigger `delta` with `|delta|_inf <= eps`
   (16/255) minimises the surrogate's cross-entropy toward the target class
   on triggered target-class examples -- it makes the target class's own
   features stronger, hence "Narcissus". A host loop of jitted
   RAdam (or signed-gradient) steps, each projected onto the l-inf ball.
3. `narcissus`: the poisons are target-class *training* examples plus the
   trigger, their labels unchanged (clean label); they replace the points they
   were made from (`merge(..., replace=True)`). At test time the trigger is
   magnified (`apply_narcissus(x, delta, magnification=3)`, §4.1).

Stand-in for the POOD data on FashionMNIST: this machine has no second
grey-scale 28x28 data set (no MNIST/KMNIST, no internet), so the
experiments give the attacker a disjoint pool of FashionMNIST training
points of the *other* classes (never in the victim's training subset) with
their own labels. That is a stronger attacker than the paper's (its POOD
data, Tiny-ImageNet for CIFAR-10, shares no classes or images with the
victim's), so ASRs here are an upper reference for that threat model.
`surrogate_set` refuses POOD data that contains the target class.

As in the authors' code: `warm_up_surrogate` (the "poi-warm-up": the POOD
surrogate fine-tuned on the target class alone, RAdam) and a RAdam trigger
optimiser (`optimizer="radam"`; signed-gradient PGD as `"sign"`). Not
reproduced: their surrogate's augmentation and 200 epochs.

References:
  Zeng, Pan, Just, Lyu, Qiu, Jia 2022, "Narcissus: A Practical Clean-Label
  Backdoor Attack with Limited Information", §3 (Eq. 2, Algorithm 1), §4.1
  (l-inf 16/255, test-time magnification x3). Used in "Limitations of
  gradient shaping" (papers/limitations-of-gradient-shaping.md, Table 2).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape.poisons import _backdoor
from jaxshape.poisons.poison_set import PoisonSet


class TriggerFit(NamedTuple):
  """The optimised trigger `delta` `[...]` and the batch objective at each step `loss_S`."""

  delta: jax.Array
  loss_S: jax.Array


def surrogate_set(
  x_public: ArrayLike, y_public: ArrayLike, x_target: ArrayLike, target_class: int
) -> dict[str, jax.Array]:
  """The surrogate's training set: POOD points (their labels) + target-class points.

  Args:
    x_public: public out-of-distribution inputs `[M, ...]` in [0, 1].
    y_public: their labels `[M]`; must not contain `target_class`.
    x_target: the attacker's target-class examples `[T, ...]`.
    target_class: the label the target-class examples get.

  Returns:
    `{"x": [M+T, ...], "y": [M+T]}` for `train.fit`.
  """
  x_M = _validate.check_inputs("x_public", x_public, min_rank=2)
  x_T = _validate.check_inputs("x_target", x_target, min_rank=2)
  if x_M.shape[1:] != x_T.shape[1:]:
    raise ValueError(f"x_public has inputs {x_M.shape[1:]}, x_target {x_T.shape[1:]}")
  y_M = np.asarray(y_public)
  if y_M.shape != (x_M.shape[0],) or y_M.dtype.kind not in "iu":
    raise ValueError(f"y_public must be [{x_M.shape[0]}] integer labels, got {y_M.shape}")
  target_class = _validate.check_int("target_class", target_class, 0)
  if np.any(y_M == target_class):
    raise ValueError(f"x_public must not contain the target class {target_class}")
  y = np.concatenate([y_M.astype(np.int32), np.full([x_T.shape[0]], target_class, np.int32)])
  return {"x": jnp.concatenate([x_M, x_T]), "y": jnp.asarray(y)}


def trigger_loss(model, params, x_T: ArrayLike, delta: ArrayLike, target_class: int) -> jax.Array:
  """Eq. 2's objective: mean cross-entropy toward `target_class` of clip(x + delta)."""
  x_T = jnp.clip(jnp.asarray(x_T) + jnp.asarray(delta)[None], 0.0, 1.0)
  return _target_ce(model, params, x_T, target_class)


OPTIMIZERS = ("radam", "sign")


def _target_ce(model, params, x_B, target_class):
  logits_BC = model.apply({"params": params}, x_B)
  y_B = jnp.full([x_B.shape[0]], target_class, jnp.int32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BC, y_B))


def _minibatch(key, x_T, batch_size):
  return x_T[jax.random.choice(key, x_T.shape[0], (batch_size,), replace=False)]


@functools.partial(jax.jit, static_argnames=("model", "batch_size"), donate_argnums=(1, 2))
def _warm_up_step(model, params, opt_state, key, x_T, target_class, learning_rate, *, batch_size):
  loss, g = jax.value_and_grad(_target_ce, argnums=1)(
    model, params, _minibatch(key, x_T, batch_size), target_class
  )
  updates, opt_state = optax.radam(learning_rate).update(g, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def warm_up_surrogate(
  key: jax.Array,
  model,
  params,
  x_target: ArrayLike,
  target_class: int,
  *,
  steps: int = 20,
  learning_rate: float = 0.01,
  batch_size: int | None = None,
):
  """Poi-warm-up: the POOD surrogate fine-tuned on the target-class examples alone (RAdam).

  Zeng et al. 2022 §3 ("poi-warm-up"; their code: 5 epochs of RAdam on the
  target class only) turn the POOD-trained model into a feature extractor
  for the target class before the trigger is optimised against it. Training
  on one class pushes every input toward it, so keep it short (the steps
  and rate are the knobs; `experiments/backdoor` measures them).

  Args:
    key: PRNG key (minibatches).
    model, params: the surrogate (e.g. trained on `surrogate_set`).
    x_target: the attacker's target-class examples `[T, ...]` in [0, 1].
    target_class: their label.
    steps: RAdam steps; learning_rate: its rate; batch_size: min(64, T) when None.

  Returns:
    `(params, loss_S)`: the fine-tuned parameters and the loss at each step.
  """
  _validate.check_key(key)
  x_T = _validate.check_inputs("x_target", x_target, min_rank=2)
  target_class = _validate.check_int("target_class", target_class, 0)
  steps = _validate.check_int("steps", steps, 1)
  _validate.check_positive("learning_rate", learning_rate)
  batch_size = min(64, x_T.shape[0]) if batch_size is None else batch_size
  batch_size = _validate.check_int("batch_size", batch_size, 1, x_T.shape[0])
  learning_rate = jnp.float32(learning_rate)
  params = jax.tree.map(jnp.array, params)  # a copy: the step donates its buffers
  opt_state = optax.radam(learning_rate).init(params)
  loss_S = []
  for key_s in jax.random.split(key, steps):  # host loop: see `optimise_trigger`
    params, opt_state, loss = _warm_up_step(
      model, params, opt_state, key_s, x_T, target_class, learning_rate, batch_size=batch_size
    )
    loss_S.append(loss)
  return params, jnp.stack(loss_S)


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "optimizer"))
def _trigger_step(model, params, delta, opt_state, key, x_T, target_class, epsilon, step_size, *,
                  batch_size, optimizer):  # fmt: skip
  loss, g = jax.value_and_grad(trigger_loss, argnums=3)(
    model, params, _minibatch(key, x_T, batch_size), delta, target_class
  )
  if optimizer == "sign":
    update = -step_size * jnp.sign(g)
  else:
    update, opt_state = optax.radam(step_size).update(g, opt_state, delta)
  return jnp.clip(delta + update, -epsilon, epsilon), opt_state, loss


def optimise_trigger(
  key: jax.Array,
  model,
  params,
  x_target: ArrayLike,
  target_class: int,
  *,
  epsilon: float = 16 / 255,
  steps: int = 500,
  batch_size: int | None = None,
  step_size: float | None = None,
  optimizer: str = "radam",
) -> TriggerFit:
  """The Narcissus trigger against a surrogate (Eq. 2), within an l-inf ball of `epsilon`.

  Args:
    key: PRNG key (the minibatch of target-class examples at each step).
    model: the surrogate's Flax module; `params` its parameters.
    x_target: the attacker's target-class examples `[T, ...]` in [0, 1].
    target_class: the class the triggered examples should get.
    epsilon: l-inf budget (Zeng et al. §4.1: 16/255).
    steps: optimiser steps (each projected onto the l-inf ball).
    batch_size: examples per step (at most T; min(64, T) when None).
    step_size: the rate; when None `epsilon / 12` for "radam" (their code:
      0.01 on [-1, 1] inputs, i.e. 0.005 on [0, 1]), `epsilon / 20` for "sign".
    optimizer: "radam" (Zeng et al.'s code) or "sign" (signed-gradient PGD).

  Returns:
    A `TriggerFit`; `max |delta| <= epsilon` exactly.

  Example:
    >>> fit = optimise_trigger(key, model, params, x_T, target_class=2)
    >>> poisons = narcissus(key, ds.x_train, ds.y_train, 0.01, 2, fit.delta)
  """
  _validate.check_key(key)
  x_T = _validate.check_inputs("x_target", x_target, min_rank=2)
  target_class = _validate.check_int("target_class", target_class, 0)
  _validate.check_range("epsilon", epsilon, 0.0, 1.0, lo_open=True)
  steps = _validate.check_int("steps", steps, 1)
  batch_size = min(64, x_T.shape[0]) if batch_size is None else batch_size
  batch_size = _validate.check_int("batch_size", batch_size, 1, x_T.shape[0])
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  if step_size is None:
    step_size = epsilon / (12 if optimizer == "radam" else 20)
  _validate.check_positive("step_size", step_size)
  epsilon, step_size = jnp.float32(epsilon), jnp.float32(step_size)
  delta = jnp.zeros(x_T.shape[1:], jnp.float32)
  opt_state = optax.radam(step_size).init(delta)
  loss_S = []
  # A host loop around one jitted step: XLA:CPU runs convolutions inside a `lax.scan`
  # body several times slower (here 0.20 against 0.03 CPU-s per step on the paper's CNN,
  # batch 64; `experiments/witches_brew/victims.py`).
  for key_s in jax.random.split(key, steps):
    delta, opt_state, loss = _trigger_step(
      model, params, delta, opt_state, key_s, x_T, target_class, epsilon, step_size,
      batch_size=batch_size, optimizer=optimizer)  # fmt: skip
    loss_S.append(loss)
  loss_S = jnp.stack(loss_S)
  return TriggerFit(delta, loss_S)


def apply_narcissus(x: ArrayLike, delta: ArrayLike, magnification: float = 1.0) -> jax.Array:
  """clip(x + magnification * delta, 0, 1) on inputs `x_N...` (test time: magnification 3)."""
  x = _validate.check_inputs("x", x)
  delta = jnp.asarray(delta, jnp.float32)
  if x.shape[-delta.ndim :] != delta.shape:
    raise ValueError(f"x has inputs of shape {x.shape}, the trigger is {delta.shape}")
  _validate.check_nonnegative("magnification", magnification)
  return jnp.clip(
    x + magnification * delta.reshape((1,) * (x.ndim - delta.ndim) + delta.shape), 0.0, 1.0
  )


def narcissus(
  key: jax.Array,
  x: ArrayLike,
  y: ArrayLike,
  ratio: float,
  target_class: int,
  delta: ArrayLike,
  *,
  epsilon: float = 16 / 255,
  magnification: float = 3.0,
  num_classes: int | None = None,
) -> PoisonSet:
  """Clean-label Narcissus poisons: round(ratio x N) target-class training points + `delta`.

  Args:
    key: PRNG key (which target-class points are poisoned).
    x: clean training inputs `[N, ...]` in [0, 1]; `y` their labels `[N]`.
    ratio: poisons per training example (limitations paper: 0.05%, 1%, 2%);
      at most the target class's share of the training set.
    target_class: the attacker's class; the poisons keep this, their label.
    delta: the trigger from `optimise_trigger`, `[...]`, `|delta|_inf <= epsilon`.
    epsilon: the budget `delta` must respect.
    magnification: test-time factor, recorded in `config` (Zeng et al.: 3).
    num_classes: C; inferred from `y` when None.

  Returns:
    A `PoisonSet` with `base_split="train"` (use `merge(..., replace=True)`),
    no mask/pattern `Trigger` (the trigger is additive): `info["delta"]`
    holds it, `config["magnification"]` the test-time factor.

  References:
    Zeng et al. 2022, §3 (Algorithm 1, poison step), §4.1.
  """
  _validate.check_key(key)
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, num_classes = _validate.check_labels("y", y, x_N.shape[0], num_classes)
  _validate.check_range("ratio", ratio, 0.0, 1.0)
  target_class = _validate.check_class("target_class", target_class, num_classes)
  _validate.check_range("epsilon", epsilon, 0.0, 1.0, lo_open=True)
  _validate.check_nonnegative("magnification", magnification)
  delta = _validate.check_inputs("delta", delta, unit_interval=False)
  if tuple(delta.shape) != tuple(x_N.shape[1:]):
    raise ValueError(f"delta must have the input shape {x_N.shape[1:]}, got {delta.shape}")
  if float(jnp.max(jnp.abs(delta))) > epsilon + 1e-6:
    raise ValueError(f"delta exceeds the l-inf budget epsilon={epsilon}")
  eligible_N = np.asarray(y_N) == target_class
  num_poisons = _validate.num_from_ratio(ratio, x_N.shape[0])
  if num_poisons > int(eligible_N.sum()):
    raise ValueError(
      f"ratio {ratio} asks for {num_poisons} poisons but class {target_class} has only "
      f"{int(eligible_N.sum())} training points (clean label: poisons are of that class)"
    )
  idx_P = _backdoor.pick_points(key, jnp.asarray(eligible_N), num_poisons=num_poisons)
  x_P = jnp.clip(jnp.take(x_N, idx_P, axis=0) + delta[None], 0.0, 1.0)
  return PoisonSet(
    x=x_P,
    y=jnp.full([num_poisons], target_class, jnp.int32),
    attack="narcissus",
    base_idx=idx_P,
    target_idx=jnp.full([num_poisons], -1, jnp.int32),
    target_class=target_class,
    base_split="train",
    config=_config(ratio, epsilon, magnification),
    info={"delta": delta},
  )


def _config(ratio: float, epsilon: float, magnification: float) -> dict[str, Any]:
  return {"ratio": float(ratio), "epsilon": float(epsilon), "magnification": float(magnification)}
