"""Witches' Brew: clean-label poisons by gradient matching.

Shapes: N training examples, P poisons (the budget), S crafting steps,
R restarts, H/W image height/width, C channels.

The attacker wants a target t classified as its class a. It perturbs a budget
of training points of class a (which keep their clean label a) within an
l-infinity ball of radius epsilon so that their summed training gradient
points the same way as the gradient of the target's adversarial loss:

  minimise 1 - cos( grad_theta L(t, a),  grad_theta sum_i L(x_i + delta_i, a) )

at the victim's (pre-trained) parameters theta. A model trained on the poisons
then descends the adversarial loss as it descends the poisons' loss. The
perturbation takes signed Adam steps (the sign of the gradient fed to Adam)
with step size decayed by 10x at 3/8, 5/8 and 7/8 of the steps, is projected
back to the epsilon ball and the [0, 1] box after each step, optionally sees
differentiable augmentation (random flips and shifts) so it survives the
victim's, and is restarted R times from random starts keeping the restart of
lowest alignment loss (measured without augmentation). Against an ensemble
of surrogates (several seeds, or checkpoints of one training run, so the
poisons stay aligned along the victim's whole training from scratch) the
objective is the mean alignment loss over the members.

References:
  Geiping et al. 2021, "Witches' Brew: Industrial Scale Data Poisoning via
  Gradient Matching", §3 (gradient alignment objective, Eq. 3), §4
  (signed Adam, restarts, differentiable augmentation, ensembles,
  epsilon = 8/255 or 16/255). papers/witches-brew-review.md.
"""

from __future__ import annotations

import functools
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape._typing import Params
from jaxshape.poisons.poison_set import PoisonSet
from jaxshape.poisons.poison_set import take_rows


def _ce_sum(model, params, x_B, y_B):
  logits_BC = model.apply({"params": params}, x_B)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BC, y_B))


def members(params) -> tuple:
  """An ensemble (a list or tuple of parameter trees) as a tuple; one tree as a 1-tuple."""
  return tuple(params) if isinstance(params, list | tuple) else (params,)


def _tree_dot(a, b):
  return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def augment_images(key: jax.Array, x_PHWC: jax.Array, max_shift: int, flip: bool) -> jax.Array:
  """Random horizontal flips and integer shifts (zero fill) per image; differentiable in x.

  Args:
    key: PRNG key.
    x_PHWC: images `[P, H, W, C]`.
    max_shift: shifts are uniform in [-max_shift, max_shift] along H and W.
    flip: flip each image left-right with probability 1/2.
  """
  p, h, w, c = x_PHWC.shape
  key_flip, key_shift = jax.random.split(key)
  if flip:
    flip_P = jax.random.bernoulli(key_flip, 0.5, (p,))
    x_PHWC = jnp.where(flip_P[:, None, None, None], x_PHWC[:, :, ::-1, :], x_PHWC)
  if max_shift > 0:
    m = max_shift
    padded = jnp.pad(x_PHWC, ((0, 0), (m, m), (m, m), (0, 0)))
    offset_P2 = jax.random.randint(key_shift, (p, 2), 0, 2 * m + 1)
    x_PHWC = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
      padded, offset_P2
    )
  return x_PHWC


class Brew(NamedTuple):
  """One restart of gradient matching."""

  delta_P: jax.Array  # [P, ...] float32: the perturbation, |delta| <= epsilon
  loss: jax.Array  # [] float32: final alignment loss 1 - cos (no augmentation)
  alignment_S: jax.Array  # [S] float32: cosine alignment at each step (before its update)


class BrewState(NamedTuple):
  """The perturbation being optimised and its Adam state."""

  delta_P: jax.Array  # [P, ...] float32
  opt_state: optax.OptState


class Recipe(NamedTuple):
  """The static part of a restart (hashable: a `jit` static argument)."""

  steps: int
  augment: bool = True
  max_shift: int = 2
  flip: bool = True


@functools.partial(jax.jit, static_argnums=0)
def target_gradient(model, params: Params, x_target: jax.Array, adversarial_class: ArrayLike):
  """grad_theta of the target's cross-entropy towards the attacker's class.

  For an ensemble (a list or tuple of parameter trees), a tuple of one gradient per member.
  """
  y_1 = jnp.reshape(adversarial_class, [1]).astype(jnp.int32)
  grads = tuple(
    jax.grad(_ce_sum, argnums=1)(model, p, x_target[None], y_1) for p in members(params)
  )
  return grads if isinstance(params, list | tuple) else grads[0]


def _mean_over_members(fn, params, grad_target):
  """The mean of `fn(params_k, grad_target_k)` (a pytree) over the ensemble's members."""
  outs = [fn(p, g) for p, g in zip(members(params), members(grad_target), strict=True)]
  return jax.tree.map(lambda *v: sum(v) / len(v), *outs)


def alignment_loss(model, params, grad_target, x_P, y_P):
  """1 - cos(grad_target, grad_theta sum_i L(x_i, y_i)): the objective, plainly.

  Differentiating this in `x_P` takes a double backward pass through the
  weight gradients (slow for convolutions on CPU); `alignment_value_and_grad`
  gives the same gradient by reverse-over-forward differentiation.
  """
  grad_poison = jax.grad(_ce_sum, argnums=1)(model, params, x_P, y_P)
  dot = _tree_dot(grad_poison, grad_target)
  norms = jnp.sqrt(_tree_dot(grad_poison, grad_poison) * _tree_dot(grad_target, grad_target))
  return 1.0 - dot / jnp.maximum(norms, 1e-30)


def alignment_value_and_grad(model, params, grad_target, inputs_fn, delta, y_P):
  """The alignment loss at `inputs_fn(delta)` and its gradient with respect to `delta`.

  With g(x) = grad_theta L(x) and t the target gradient, the derivative of
  cos(g, t) is <dg, v> with v = t / (|g||t|) - cos g / |g|^2 held fixed, and
  <dg, v> is the differential of the directional derivative <grad_theta L, v>
  (a forward-mode `jvp` in parameter space). So one backward pass gives g and
  v, and the gradient in `delta` is a reverse pass over that `jvp`: no
  backward pass through the weight gradients is needed.

  Args:
    model, params: the model and its parameters theta.
    grad_target: t, a pytree like `params`.
    inputs_fn: maps `delta` to the model inputs (e.g. base + delta, augmented).
    delta: the perturbation.
    y_P: the poisons' labels.

  Returns:
    `(1 - cos, d(1 - cos)/d delta)`.
  """
  x_in = inputs_fn(delta)
  grad_poison = jax.grad(_ce_sum, argnums=1)(model, params, x_in, y_P)
  pp = jnp.maximum(_tree_dot(grad_poison, grad_poison), 1e-30)
  tt = _tree_dot(grad_target, grad_target)
  norm = jnp.maximum(jnp.sqrt(pp * tt), 1e-30)
  cos = _tree_dot(grad_poison, grad_target) / norm
  v = jax.tree.map(lambda t, g: t / norm - (cos / pp) * g, grad_target, grad_poison)

  def directional(d):
    loss = lambda theta: _ce_sum(model, theta, inputs_fn(d), y_P)
    return jax.jvp(loss, (params,), (v,))[1]

  return 1.0 - cos, -jax.grad(directional)(delta)


def _optimizer(learning_rate, steps):
  """Adam with the step size cut 10x at 3/8, 5/8 and 7/8 of the steps (Geiping et al.)."""
  bounds = {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8) if int(steps * f) > 0}
  return optax.adam(optax.piecewise_constant_schedule(learning_rate, bounds))


def _project(x_P, delta_P, epsilon):
  delta_P = jnp.clip(delta_P, -epsilon, epsilon)
  return jnp.clip(x_P + delta_P, 0.0, 1.0) - x_P


def _init(key, x_P, epsilon, learning_rate, recipe: Recipe) -> BrewState:
  delta_P = jax.random.uniform(key, x_P.shape, jnp.float32, -epsilon, epsilon)
  delta_P = _project(x_P, delta_P, epsilon)
  return BrewState(delta_P, _optimizer(learning_rate, recipe.steps).init(delta_P))


def _step(state, key, model, params, grad_target, x_P, y_P, epsilon, learning_rate, recipe):
  """One signed-Adam step; returns the new state and the alignment before it."""

  def inputs_fn(d_P):
    x_in = x_P + d_P
    if recipe.augment:
      x_in = augment_images(key, x_in, recipe.max_shift, recipe.flip)
    return x_in

  loss, g_P = _mean_over_members(
    lambda p, g: alignment_value_and_grad(model, p, g, inputs_fn, state.delta_P, y_P),
    params,
    grad_target,
  )
  # Signed Adam: Adam on the sign of the gradient, descending the loss.
  opt = _optimizer(learning_rate, recipe.steps)
  updates, opt_state = opt.update(jnp.sign(g_P), state.opt_state, state.delta_P)
  delta_P = _project(x_P, optax.apply_updates(state.delta_P, updates), epsilon)
  return BrewState(delta_P, opt_state), 1.0 - loss


_init_jit = jax.jit(_init, static_argnames=("recipe",))
_step_jit = jax.jit(_step, static_argnames=("model", "recipe"), donate_argnames=("state",))


def _final_loss(model, params, grad_target, x_P, y_P, delta_P):
  """The alignment loss at x + delta, without augmentation (the ensemble's mean)."""
  return _mean_over_members(
    lambda p, g: alignment_loss(model, p, g, x_P + delta_P, y_P), params, grad_target
  )


_final_loss_jit = jax.jit(_final_loss, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "recipe"))
def brew(
  key: jax.Array,
  model: Any,
  params: Params,
  grad_target: Params,
  x_P: jax.Array,
  y_P: jax.Array,
  epsilon: ArrayLike,
  learning_rate: ArrayLike,
  recipe: Recipe,
) -> Brew:
  """One restart as a single `lax.scan`: signed-Adam steps, projected to the ball and the box.

  The pure crafting core (numeric arguments may be traced; `vmap` it over
  keys for parallel restarts, or over targets). See `witches_brew`, which by
  default drives the same step from the host instead: XLA:CPU runs
  convolutions inside loop bodies several times slower (jax-ml/jax#12868).

  Example:
    >>> run = brew(key, cnn, params, target_gradient(cnn, params, x_t, 3),
    ...            x_P, y_P, 8 / 255, 0.8 / 255, Recipe(steps=240))
  """
  key_init, key_steps = jax.random.split(key)
  state = _init(key_init, x_P, epsilon, learning_rate, recipe)

  def body(state, k):
    return _step(state, k, model, params, grad_target, x_P, y_P, epsilon, learning_rate, recipe)

  state, alignment_S = jax.lax.scan(body, state, jax.random.split(key_steps, recipe.steps))
  final = _final_loss(model, params, grad_target, x_P, y_P, state.delta_P)
  return Brew(state.delta_P, final, alignment_S)


def _brew_on_host(key, model, params, grad_target, x_P, y_P, epsilon, learning_rate, recipe):
  """`brew` with the loop in Python around one jitted step (same keys, same result)."""
  key_init, key_steps = jax.random.split(key)
  state = _init_jit(key_init, x_P, epsilon, learning_rate, recipe)
  alignment = []
  for k in jax.random.split(key_steps, recipe.steps):
    state, a = _step_jit(
      state, k, model, params, grad_target, x_P, y_P, epsilon, learning_rate, recipe
    )
    alignment.append(a)
  final = _final_loss_jit(model, params, grad_target, x_P, y_P, state.delta_P)
  return Brew(state.delta_P, final, jnp.stack(alignment))


def _float32_at_most(value: float) -> jax.Array:
  """The largest float32 <= value, so a float32 bound never exceeds the requested one."""
  v = np.float32(value)
  if float(v) > float(value):
    v = np.nextafter(v, np.float32(0.0))
  return jnp.asarray(v)


@jax.jit
def _exact_projection(x_P, delta_P, epsilon):
  """x + delta in the box and the epsilon ball, exactly as float32 computes |x' - x|.

  x + delta can round one ulp past the ball; such entries step toward x (which
  is in the box) by one ulp until the float32 check holds.

  Returns:
    The poisons `x'` and their l-infinity distances to `x`, `[P]`.
  """
  x_new_P = jnp.clip(
    x_P + delta_P, jnp.maximum(x_P - epsilon, 0.0), jnp.minimum(x_P + epsilon, 1.0)
  )
  for _ in range(4):
    over = jnp.abs(x_new_P - x_P) > epsilon
    x_new_P = jnp.where(over, jnp.nextafter(x_new_P, x_P), x_new_P)
  linf_P = jnp.max(jnp.abs(x_new_P - x_P).reshape(x_P.shape[0], -1), axis=-1)
  return x_new_P, linf_P


def witches_brew(
  key: jax.Array,
  model: Any,
  params: Params,
  x_target: ArrayLike,
  adversarial_class: int,
  x: ArrayLike,
  y: ArrayLike,
  *,
  budget: int | None = None,
  base_idx: ArrayLike | None = None,
  epsilon: float = 8 / 255,
  steps: int = 240,
  restarts: int = 8,
  learning_rate: float | None = None,
  augment: bool = True,
  max_shift: int = 2,
  flip: bool = True,
  target_idx: int = -1,
  num_classes: int | None = None,
  loop: str = "host",
  progress: bool = False,
) -> PoisonSet:
  """Witches' Brew poisons: a budget of class-`adversarial_class` points, gradient-matched.

  Args:
    key: PRNG key (budget choice, random starts, augmentation).
    model, params: the model the attacker crafts against (pre-trained), or
      a list of parameter trees: an ensemble whose mean alignment loss is
      minimised (e.g. checkpoints of one training run, or several seeds).
    x_target: the target input `[...]` (no batch axis); it is not modified.
    adversarial_class: the class the target should get; the poisons are
      training points of this class and keep this (clean) label.
    x: clean training inputs `[N, ...]` in [0, 1].
    y: their labels `[N]`.
    budget: number of poisons P, drawn at random from class
      `adversarial_class` (Geiping et al.: 1% of the training set or less).
    base_idx: alternatively, the exact training indices to perturb (all must
      be of `adversarial_class`).
    epsilon: l-infinity bound, > 0 (default 8/255).
    steps: signed-Adam steps per restart (Geiping et al.: 240).
    restarts: random restarts R >= 1; the lowest final alignment loss wins.
    learning_rate: Adam step size; default epsilon / 10 (Geiping et al.'s
      tau = 0.1 in units of epsilon).
    augment: differentiable random flips and shifts of the poisons at each
      step (images only).
    max_shift, flip: the augmentation (shifts up to `max_shift` pixels).
    target_idx: index of the target in the test split, for the record.
    num_classes: C; inferred from `y` when None.
    loop: "host" runs each jitted step from Python (fast on CPU, where
      XLA runs convolutions inside loop bodies several times slower:
      jax-ml/jax#12868); "scan" runs each restart as one `lax.scan` (`brew`).
      Both give the same poisons.
    progress: show a tqdm bar over restarts.

  Returns:
    A `PoisonSet` (attack "witches_brew") of P perturbed points with their
    clean labels, `target_class = adversarial_class`; `info` holds the
    `alignment_RS` curve (cosine per step of every restart), the final
    `loss_R` of each restart, `best_restart`, `seconds_R` (wall time of each
    restart, including compilation for the first) and `linf_P`.

  Example:
    >>> poisons = witches_brew(key, cnn, params, x_test[t], 3, ds.x_train,
    ...                        ds.y_train, budget=100, target_idx=t)
    >>> data = merge(ds, poisons, replace=True)   # poisons take their bases' place

  References:
    Geiping et al. 2021, §3-§4.
  """
  _validate.check_key(key)
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, num_classes = _validate.check_labels("y", y, x_N.shape[0], num_classes)
  x_t = _validate.check_inputs("x_target", x_target)
  if x_t.shape != x_N.shape[1:]:
    raise ValueError(f"x_target must have the input shape {x_N.shape[1:]}, got {x_t.shape}")
  adversarial_class = _validate.check_class("adversarial_class", adversarial_class, num_classes)
  _validate.check_positive("epsilon", epsilon)
  _validate.check_range("epsilon", epsilon, 0.0, 1.0, lo_open=True)
  steps = _validate.check_int("steps", steps, 1)
  restarts = _validate.check_int("restarts", restarts, 1)
  max_shift = _validate.check_int("max_shift", max_shift, 0)
  if learning_rate is None:
    learning_rate = epsilon / 10.0
  _validate.check_positive("learning_rate", learning_rate)
  if augment and x_N.ndim != 4:
    raise ValueError("augment=True needs image inputs [N, H, W, C]; pass augment=False")
  if loop not in ("host", "scan"):
    raise ValueError(f"loop must be 'host' or 'scan', got {loop!r}")
  if augment and max_shift >= min(x_N.shape[1:3]):
    raise ValueError(f"max_shift must be smaller than the image, got {max_shift}")

  eligible = np.flatnonzero(np.asarray(y_N) == adversarial_class)
  key_pick, key_brew = jax.random.split(key)
  if base_idx is None:
    if budget is None:
      raise ValueError("budget (or base_idx) is required")
    budget = _validate.check_int("budget", budget, 1, eligible.size)
    pick = np.asarray(jax.random.permutation(key_pick, eligible.size))[:budget]
    base_P = jnp.asarray(eligible[pick], jnp.int32)
  else:
    base_P = _validate.check_indices("base_idx", base_idx, x_N.shape[0])
    if base_P.shape[0] < 1 or np.any(np.asarray(y_N)[np.asarray(base_P)] != adversarial_class):
      raise ValueError(f"base_idx must name training points of class {adversarial_class}")
  x_P, y_P = take_rows((x_N, y_N), base_P)
  grad_target = target_gradient(model, params, x_t, adversarial_class)
  eps, lr = _float32_at_most(epsilon), jnp.float32(learning_rate)
  recipe = Recipe(steps, augment, max_shift, flip)

  runs, seconds = [], []
  keys = jax.random.split(key_brew, restarts)
  iterator = range(restarts)
  if progress:
    from tqdm.auto import tqdm

    iterator = tqdm(iterator, desc="witches' brew", unit="restart")
  for r in iterator:
    start = time.perf_counter()
    craft = brew if loop == "scan" else _brew_on_host
    run = craft(keys[r], model, params, grad_target, x_P, y_P, eps, lr, recipe)
    jax.block_until_ready(run.delta_P)
    seconds.append(time.perf_counter() - start)
    runs.append(run)
  loss_R = np.asarray([float(r.loss) for r in runs], np.float32)
  best = int(np.argmin(loss_R))
  p = int(base_P.shape[0])
  x_poison_P, linf_P = _exact_projection(x_P, runs[best].delta_P, eps)
  return PoisonSet(
    x=x_poison_P,
    y=y_P,
    attack="witches_brew",
    base_idx=base_P,
    target_idx=jnp.asarray(np.full([p], target_idx, np.int32)),
    target_class=adversarial_class,
    base_split="train",
    target_split="test",
    config={
      "epsilon": float(epsilon),
      "steps": steps,
      "restarts": restarts,
      "learning_rate": float(learning_rate),
      "augment": augment,
      "max_shift": max_shift,
      "flip": flip,
      "loop": loop,
    },
    info={
      "alignment_RS": jnp.asarray(np.stack([np.asarray(r.alignment_S) for r in runs])),
      "loss_R": jnp.asarray(loss_R),
      "best_restart": jnp.asarray(best, jnp.int32),
      "seconds_R": jnp.asarray(seconds, jnp.float32),
      "linf_P": linf_P,
    },
  )
