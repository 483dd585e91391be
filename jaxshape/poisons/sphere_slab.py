"""Steinhardt, Koh & Liang's min-max attack on sphere and slab outlier defenses.

Shapes: N clean training examples, D input features (flattened), P poisons,
A angles and R radii of the search grid, K checkpoints, S attack iterations.

A binary linear learner (hinge loss, with bias) and an attacker play a game:
at each iteration the attacker places all of its poison mass (P = round(ratio
x N) copies) on the feasible point of maximal loss under the current model,
and the learner takes a gradient step on the clean loss plus the weighted
poison loss. The outlier defense is *data-dependent*: the sphere and the slab
of each class are centred on the centroids of the poisoned training set
(clean + poisons) with radii fitted on the clean data (quantile 0.65). With
c = n_y / (n_y + P), a poison x of class y then satisfies

  sphere: c ||x - mu_y|| <= r_y
  slab:   c |<x - mu_y, (mu_y - mu_-y) + (1 - c)(x - mu_y)>| <= s_y

(mu: clean centroids): the poison drags its class centroid toward itself, so
it may sit about 1/c times the clean radius away and the slab direction turns
with it. The maximiser of the linear loss lies (nearly) in the plane spanned by
mu_y - mu_-y and the model's weights, so the search is a grid over that plane;
each grid point is clipped to the box [0, 1] and shrunk toward mu_y (which
keeps it in the box) by the largest factor, in closed form, for which both
constraints hold, so every poison returned is feasible (with a relative margin
of 1e-3 against float32 rounding). The learner is plain gradient descent on
the hinge loss with bias, without the published code's norm constraint.

At checkpoints the iterate's poison is scored by retraining the hinge model
from scratch on clean + poisons and measuring its clean training loss; the
highest-scoring checkpoint is the output (the last iterate is much weaker:
PROTOCOL.md, "Attacks").

References:
  Steinhardt, Koh, Liang 2017, "Certified Defenses for Data Poisoning
  Attacks", §3-§4 (sphere and slab defenses, the min-max attack, data-dependent
  defenses). Hong et al. 2020, §6.2 (the "SOTA" attack at 0-40%) and §7.1
  (its poisons concentrate on very few distinct points).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape._typing import ArrayLike
from jaxshape.poisons.poison_set import PoisonSet

# Checkpoints of the published code: iterations 3, 6, ..., 48, then every 10 to 200.
DEFAULT_CHECKPOINTS = tuple(range(3, 49, 3)) + tuple(range(50, 201, 10))


class SphereSlabDefense(NamedTuple):
  """Clean class statistics of the sphere and slab defenses (label 0, label 1)."""

  centroid_2D: jax.Array  # [2, D] float32: clean centroid of each class
  sphere_radius_2: jax.Array  # [2] float32: quantile of ||x - mu_y|| over clean class y
  slab_radius_2: jax.Array  # [2] float32: quantile of |<x - mu_y, mu_1 - mu_0>|
  count_2: jax.Array  # [2] float32: clean examples per class


@functools.partial(jax.jit, static_argnames=())
def fit_defense(x_ND: jax.Array, y_N: jax.Array, quantile: ArrayLike) -> SphereSlabDefense:
  """Centroids and radii of the sphere and slab defenses on clean data `x_ND`, `y_N` in {0, 1}.

  References:
    Steinhardt et al. 2017, §4 (sphere and slab defenses, radii at a
    percentile of the clean distances).
  """
  onehot_N2 = jax.nn.one_hot(y_N, 2, dtype=jnp.float32)
  count_2 = jnp.sum(onehot_N2, axis=0)
  centroid_2D = jnp.einsum("nk,nd->kd", onehot_N2, x_ND) / count_2[:, None]
  mu_ND = centroid_2D[y_N]
  sphere_N = jnp.linalg.norm(x_ND - mu_ND, axis=-1)
  slab_N = jnp.abs(jnp.einsum("nd,d->n", x_ND - mu_ND, centroid_2D[1] - centroid_2D[0]))
  in_class_2N = onehot_N2.T > 0
  per_class = lambda v_N: jax.vmap(
    lambda m_N: jnp.nanquantile(jnp.where(m_N, v_N, jnp.nan), quantile)
  )(in_class_2N)
  return SphereSlabDefense(centroid_2D, per_class(sphere_N), per_class(slab_N), count_2)


class Feasibility(NamedTuple):
  """Where each poison sits relative to its class's defenses (ratios <= 1: inside)."""

  sphere_P: jax.Array  # [P] float32: ||x - mu'_y|| / r_y
  slab_P: jax.Array  # [P] float32: |<x - mu'_y, mu'_1 - mu'_0>| / s_y
  in_box_P: jax.Array  # [P] bool: every feature in [0, 1]
  feasible_P: jax.Array  # [P] bool: inside box, sphere and slab


@functools.partial(jax.jit, static_argnames=("poisoned_centroids",))
def _feasibility(x_ND, y_N, x_PD, y_P, quantile, *, poisoned_centroids):
  defense = fit_defense(x_ND, y_N, quantile)
  if poisoned_centroids:
    onehot_P2 = jax.nn.one_hot(y_P, 2, dtype=jnp.float32)
    total_2D = defense.centroid_2D * defense.count_2[:, None]
    total_2D = total_2D + jnp.einsum("pk,pd->kd", onehot_P2, x_PD)
    mu_2D = total_2D / (defense.count_2 + jnp.sum(onehot_P2, axis=0))[:, None]
  else:
    mu_2D = defense.centroid_2D
  delta_PD = x_PD - mu_2D[y_P]
  sphere_P = jnp.linalg.norm(delta_PD, axis=-1) / defense.sphere_radius_2[y_P]
  slab_P = jnp.abs(jnp.einsum("pd,d->p", delta_PD, mu_2D[1] - mu_2D[0]))
  slab_P = slab_P / defense.slab_radius_2[y_P]
  in_box_P = jnp.all((x_PD >= 0.0) & (x_PD <= 1.0), axis=-1)
  return Feasibility(sphere_P, slab_P, in_box_P, in_box_P & (sphere_P <= 1.0) & (slab_P <= 1.0))


def feasibility(
  x_clean: ArrayLike,
  y_clean: ArrayLike,
  x_poison: ArrayLike,
  y_poison: ArrayLike,
  *,
  quantile: float = 0.65,
  poisoned_centroids: bool = True,
) -> Feasibility:
  """Checks poisons against the sphere and slab defenses of their claimed class.

  The defenses are fitted as the attack assumes: radii at `quantile` of the
  clean class distances, centred (by default) on the centroids of the
  *poisoned* training set (clean + all poisons). With
  `poisoned_centroids=False` they are centred on the clean centroids, where
  the attack's poisons look infeasible (PROTOCOL.md, "Attacks").

  Args:
    x_clean: clean training inputs `[N, ...]`.
    y_clean: their labels `[N]` in {0, 1}.
    x_poison: poison inputs `[P, ...]`.
    y_poison: their labels `[P]` in {0, 1}.
    quantile: the radius quantile, in (0, 1].
    poisoned_centroids: centre the defenses on clean + poisons (True) or
      on the clean data alone.

  Returns:
    A `Feasibility` of per-poison ratios and flags.

  Example:
    >>> f = feasibility(ds.x_train, ds.y_train, poisons.x, poisons.y)
    >>> assert bool(jnp.all(f.feasible_P))
  """
  x_ND, y_N = _flat_binary("x_clean", "y_clean", x_clean, y_clean)
  # The box [0, 1] is one of the constraints checked: poisons outside it are reported, not refused.
  x_PD, y_P = _flat_binary("x_poison", "y_poison", x_poison, y_poison, unit_interval=False)
  if x_PD.shape[1] != x_ND.shape[1]:
    raise ValueError(f"x_poison has {x_PD.shape[1]} features, x_clean {x_ND.shape[1]}")
  _validate.check_range("quantile", quantile, 0.0, 1.0, lo_open=True)
  return _feasibility(x_ND, y_N, x_PD, y_P, quantile, poisoned_centroids=poisoned_centroids)


def _flat_binary(x_name, y_name, x, y, *, unit_interval=True):
  x_N = _validate.check_inputs(x_name, x, min_rank=2, unit_interval=unit_interval)
  y_N, num_classes = _validate.check_labels(y_name, y, x_N.shape[0], 2)
  del num_classes
  return x_N.reshape(x_N.shape[0], -1), y_N


# ------------------------------------------------------------------ the attack


class _Grid(NamedTuple):
  angles: int
  radii: int


def _hinge_grads(w_D, b, x_ND, s_N, weight_N):
  """Gradient of sum_i weight_i max(0, 1 - s_i (w.x_i + b)) w.r.t. (w, b)."""
  margin_N = s_N * (x_ND @ w_D + b)
  coef_N = -jnp.where(margin_N < 1.0, weight_N * s_N, 0.0)
  return coef_N @ x_ND, jnp.sum(coef_N)


def _clean_loss(w_D, b, x_ND, s_N):
  return jnp.mean(jnp.maximum(0.0, 1.0 - s_N * (x_ND @ w_D + b)))


def _largest_feasible_shrink(vv, vd, c, r, sl):
  """The largest t in [0, 1] with mu + t v inside the poisoned-centroid sphere and slab.

  With a = (1 - c) ||v||^2, the slab is |q(t)| <= S for q(t) = a t^2 + <v, d> t
  and S = sl / c; the sphere is t <= r / (c ||v||). q is convex with q(0) = 0,
  so q <= S holds up to its positive root t_up, and q >= -S fails only
  between the roots t1 < t2 of q(t) + S when <v, d> < 0: the answer is
  min(1, sphere, t_up), or t1 if that falls inside (t1, t2).
  """
  big = jnp.float32(1e30)
  a = (1.0 - c) * vv
  S = sl / c
  t_sphere = r / jnp.maximum(c * jnp.sqrt(vv), 1e-30)
  up_den = vd + jnp.sqrt(vd**2 + 4.0 * a * S)
  t_up = jnp.where(up_den > 0.0, 2.0 * S / jnp.maximum(up_den, 1e-30), big)
  t_max = jnp.minimum(jnp.minimum(1.0, t_sphere), t_up)
  disc = vd**2 - 4.0 * a * S
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  dips = (vd < 0.0) & (disc > 0.0)
  t1 = 2.0 * S / jnp.maximum(-vd + root, 1e-30)
  t2 = jnp.where(a > 0.0, (-vd + root) / jnp.maximum(2.0 * a, 1e-30), big)
  return jnp.where(dips & (t_max > t1) & (t_max < t2), t1, t_max)


def _best_point(w_D, b, defense, k, num_poisons, margin, grid: _Grid):
  """The feasible point of class k (0 or 1) of largest hinge loss, and that loss.

  A grid of points mu_y + rho (cos phi e1 + sin phi e2) over the plane of
  e1 ~ mu_y - mu_-y and e2 ~ the weights' part orthogonal to e1, radii up to
  the dragged sphere radius r_y / c; each is clipped to [0, 1] and shrunk
  toward mu_y by the largest feasible factor; the loss is linear along each
  shrink, so the best point is the best of these.
  """
  s = 2.0 * k - 1.0
  mu_D = defense.centroid_2D[k]
  d_D = mu_D - defense.centroid_2D[1 - k]
  c = defense.count_2[k] / (defense.count_2[k] + num_poisons)
  r = defense.sphere_radius_2[k] * (1.0 - margin)
  sl = defense.slab_radius_2[k] * (1.0 - margin)
  e1_D = d_D / jnp.maximum(jnp.linalg.norm(d_D), 1e-12)
  w_perp_D = w_D - jnp.dot(w_D, e1_D) * e1_D
  w_perp_norm = jnp.linalg.norm(w_perp_D)
  e2_D = jnp.where(w_perp_norm > 1e-9, w_perp_D / jnp.maximum(w_perp_norm, 1e-12), 0.0)
  phi_A = jnp.linspace(0.0, 2.0 * jnp.pi, grid.angles, endpoint=False)
  rho_R = jnp.linspace(0.0, 1.0, grid.radii + 1)[1:] * r / c
  dir_AD = jnp.cos(phi_A)[:, None] * e1_D[None] + jnp.sin(phi_A)[:, None] * e2_D[None]
  x_ARD = jnp.clip(mu_D[None, None] + jnp.einsum("r,ad->ard", rho_R, dir_AD), 0.0, 1.0)
  v_ARD = x_ARD - mu_D[None, None]
  vd_AR = jnp.einsum("ard,d->ar", v_ARD, d_D)
  vv_AR = jnp.einsum("ard,ard->ar", v_ARD, v_ARD)
  vw_AR = jnp.einsum("ard,d->ar", v_ARD, w_D)
  t_AR = _largest_feasible_shrink(vv_AR, vd_AR, c, r, sl)
  # The loss is linear in t: shrink fully (t = 0, the centroid) when it falls.
  t_AR = jnp.where(-s * vw_AR > 0.0, t_AR, 0.0)
  loss_AR = 1.0 - s * (jnp.dot(w_D, mu_D) + b) - s * t_AR * vw_AR
  best = jnp.argmax(loss_AR.reshape(-1))
  a, ri = jnp.divmod(best, grid.radii)
  x_D = mu_D + t_AR[a, ri] * v_ARD[a, ri]
  return x_D, loss_AR[a, ri]


def _train_hinge(x_ND, s_N, x_poison_D, s_poison, poison_weight, learning_rate, steps):
  """Full-batch gradient descent from zero on clean mean hinge + weighted poison hinge."""
  n = x_ND.shape[0]
  weight_N = jnp.full([n], 1.0 / n, jnp.float32)

  def step(carry, _):
    w_D, b = carry
    gw_D, gb = _hinge_grads(w_D, b, x_ND, s_N, weight_N)
    pw_D, pb = _hinge_grads(w_D, b, x_poison_D[None], s_poison[None], poison_weight[None])
    return (w_D - learning_rate * (gw_D + pw_D), b - learning_rate * (gb + pb)), None

  init = (jnp.zeros(x_ND.shape[1], jnp.float32), jnp.zeros([], jnp.float32))
  (w_D, b), _ = jax.lax.scan(step, init, None, length=steps)
  return w_D, b


@functools.partial(
  jax.jit,
  static_argnames=(
    "num_poisons",
    "iterations",
    "init_steps",
    "retrain_steps",
    "checkpoints",
    "grid",
  ),
)
def _attack(
  x_ND,
  y_N,
  quantile,
  learning_rate,
  margin,
  *,
  num_poisons,
  iterations,
  init_steps,
  retrain_steps,
  checkpoints,
  grid,
):
  defense = fit_defense(x_ND, y_N, quantile)
  n = x_ND.shape[0]
  s_N = 2.0 * y_N.astype(jnp.float32) - 1.0
  poison_weight = jnp.asarray(num_poisons / n, jnp.float32)
  weight_N = jnp.full([n], 1.0 / n, jnp.float32)

  def clean_step(carry, _):
    w_D, b = carry
    gw_D, gb = _hinge_grads(w_D, b, x_ND, s_N, weight_N)
    return (w_D - learning_rate * gw_D, b - learning_rate * gb), None

  init = (jnp.zeros(x_ND.shape[1], jnp.float32), jnp.zeros([], jnp.float32))
  init, _ = jax.lax.scan(clean_step, init, None, length=init_steps)

  def attack_step(carry, _):
    w_D, b = carry
    x_2D, loss_2 = jax.vmap(lambda k: _best_point(w_D, b, defense, k, num_poisons, margin, grid))(
      jnp.arange(2)
    )
    k = jnp.argmax(loss_2)
    x_D, s = x_2D[k], 2.0 * k - 1.0
    gw_D, gb = _hinge_grads(w_D, b, x_ND, s_N, weight_N)
    pw_D, pb = _hinge_grads(w_D, b, x_D[None], s[None], poison_weight[None])
    new = (w_D - learning_rate * (gw_D + pw_D), b - learning_rate * (gb + pb))
    return new, (x_D, k.astype(jnp.int32), loss_2[k], _clean_loss(w_D, b, x_ND, s_N))

  _, (x_SD, label_S, loss_S, clean_loss_S) = jax.lax.scan(
    attack_step, init, None, length=iterations
  )
  ck_K = jnp.asarray(checkpoints, jnp.int32) - 1
  x_KD, label_K = x_SD[ck_K], label_S[ck_K]

  def score(x_D, label):
    w_D, b = _train_hinge(
      x_ND, s_N, x_D, 2.0 * label - 1.0, poison_weight, learning_rate, retrain_steps
    )
    return _clean_loss(w_D, b, x_ND, s_N)

  score_K = jax.vmap(score)(x_KD, label_K)
  return defense, x_KD, label_K, score_K, loss_S, clean_loss_S


def steinhardt(
  x: ArrayLike,
  y: ArrayLike,
  ratio: float,
  *,
  quantile: float = 0.65,
  iterations: int = 200,
  learning_rate: float = 0.005,
  init_steps: int = 0,
  retrain_steps: int = 200,
  checkpoints: Sequence[int] | None = None,
  select: str = "retrain",
  num_angles: int = 256,
  num_radii: int = 32,
  margin: float = 1e-3,
) -> PoisonSet:
  """Steinhardt et al.'s min-max poisons against data-dependent sphere and slab defenses.

  Args:
    x: clean training inputs `[N, ...]` in [0, 1] of a binary task.
    y: their labels `[N]` in {0, 1}.
    ratio: poisons per clean example, in [0, 1] (§6.2: up to 0.4, i.e. 4,320
      poisons added to 10,800).
    quantile: quantile of the clean class distances giving the sphere and
      slab radii, in (0, 1] (default 0.65, the published setting).
    iterations: attack iterations (learner steps) S.
    learning_rate: gradient step of the attack's hinge learner (PROTOCOL.md:
      about 0.005).
    init_steps: clean-only learner steps before the game (0: start at zero).
    retrain_steps: steps of the from-scratch retraining that scores a
      checkpoint.
    checkpoints: 1-based iterations whose poison is scored; default 3, 6, ...,
      48, then every 10 to 200 (those beyond `iterations` are dropped).
    select: "retrain" (the best checkpoint by retrained clean loss) or "last"
      (the last iterate's poison; weaker).
    num_angles, num_radii: the search grid over the plane of the centroid
      difference and the weights; each grid point is clipped to [0, 1] and
      shrunk toward the centroid (in closed form) until feasible.
    margin: the poisons aim at (1 - margin) x the radii, so they pass
      `feasibility` despite float32 rounding.

  Returns:
    A `PoisonSet` of P = round(ratio x N) copies of one point with one label
    (the game puts all poison mass on one point, as the published poisons
    nearly did: §7.1). `info` holds the checkpoints' points `x_KD`, labels
    `label_K`, scores `score_K` (retrained clean hinge loss, higher is a
    stronger attack), iterations `checkpoint_K`, the attack loss `loss_S` and
    learner clean loss `clean_loss_S` per iteration, and the defense radii.

  Example:
    >>> poisons = steinhardt(ds.x_train, ds.y_train, 0.4)
    >>> f = feasibility(ds.x_train, ds.y_train, poisons.x, poisons.y)

  References:
    Steinhardt, Koh, Liang 2017, §3-§4; Hong et al. 2020, §6.2, §7.1.
  """
  x_N = _validate.check_inputs("x", x, min_rank=2)
  y_N, num_classes = _validate.check_labels("y", y, x_N.shape[0], None)
  if num_classes != 2:
    raise ValueError(f"y: the Steinhardt attack is for binary tasks, got {num_classes} classes")
  counts = np.bincount(np.asarray(y_N), minlength=2)
  if counts.min() < 1:
    raise ValueError("y must contain both classes 0 and 1")
  _validate.check_range("ratio", ratio, 0.0, 1.0)
  _validate.check_range("quantile", quantile, 0.0, 1.0, lo_open=True)
  _validate.check_positive("learning_rate", learning_rate)
  _validate.check_range("margin", margin, 0.0, 1.0, hi_open=True)
  iterations = _validate.check_int("iterations", iterations, 1)
  init_steps = _validate.check_int("init_steps", init_steps, 0)
  retrain_steps = _validate.check_int("retrain_steps", retrain_steps, 1)
  grid = _Grid(
    _validate.check_int("num_angles", num_angles, 4),
    _validate.check_int("num_radii", num_radii, 1),
  )
  if select not in ("retrain", "last"):
    raise ValueError(f"select must be 'retrain' or 'last', got {select!r}")
  if checkpoints is None:
    checkpoints = tuple(t for t in DEFAULT_CHECKPOINTS if t <= iterations) or (iterations,)
  checkpoints = tuple(
    _validate.check_int("checkpoints", int(t), 1, iterations) for t in checkpoints
  )
  if select == "last":
    checkpoints = (iterations,)
  if not checkpoints:
    raise ValueError("checkpoints must name at least one iteration")
  num_poisons = _validate.num_from_ratio(ratio, x_N.shape[0])
  x_ND = x_N.reshape(x_N.shape[0], -1)
  defense, x_KD, label_K, score_K, loss_S, clean_loss_S = _attack(
    x_ND,
    y_N,
    jnp.asarray(quantile, jnp.float32),
    jnp.asarray(learning_rate, jnp.float32),
    jnp.asarray(margin, jnp.float32),
    num_poisons=num_poisons,
    iterations=iterations,
    init_steps=init_steps,
    retrain_steps=retrain_steps,
    checkpoints=checkpoints,
    grid=grid,
  )
  best = int(np.argmax(np.asarray(score_K)))
  x_D = np.asarray(x_KD)[best].reshape(x_N.shape[1:])
  none_P = jnp.asarray(np.full([num_poisons], -1, np.int32))
  return PoisonSet(
    x=jnp.asarray(np.broadcast_to(x_D, (num_poisons, *x_D.shape))),
    y=jnp.asarray(np.full([num_poisons], int(label_K[best]), np.int32)),
    attack="steinhardt",
    base_idx=none_P,
    target_idx=none_P,
    config={
      "ratio": float(ratio),
      "quantile": float(quantile),
      "iterations": iterations,
      "learning_rate": float(learning_rate),
      "init_steps": init_steps,
      "retrain_steps": retrain_steps,
      "select": select,
      "selected_checkpoint": int(checkpoints[best]),
      "margin": float(margin),
    },
    info={
      "x_KD": x_KD,
      "label_K": label_K,
      "score_K": score_K,
      "checkpoint_K": jnp.asarray(checkpoints, jnp.int32),
      "loss_S": loss_S,
      "clean_loss_S": clean_loss_S,
      "sphere_radius_2": defense.sphere_radius_2,
      "slab_radius_2": defense.slab_radius_2,
    },
  )
