"""Poisons for each target: the ceiling, Poison Frogs (plain and watermarked), Witches' Brew.

Shapes: T targets, K candidate bases, Q poisons kept per target (one-shot
attempts or the multi-poison cap), F penultimate features, D input features.

  ceiling       the target image itself labelled as the attacker's class (a Poison
                Frogs base at watermark opacity 1.0): what no single clean-label poison
                can beat, the attack's upper bound.
  poison_frogs  Shafahi et al. 2018's feature collision from the K test points of the
                base class nearest the target in penultimate space; only poisons within
                `max_feature_distance` (§6.3: 3.5) are used, nearest first.
  watermark     the same with the target blended into each base at opacity
                `config.watermark` (Shafahi et al.'s recipe for end-to-end training: 0.3).
  witches_brew  Geiping et al. 2021's gradient matching on clean training points of the
                base class (they replace their clean copies).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.targeted import setups
from jaxshape import models
from jaxshape import poisons

CRAFT_FIELDS = (
  "candidates",
  "craft_iters",
  "craft_lr",
  "beta0",
  "max_feature_distance",
  "watermark",
  "wb_epsilon",
  "wb_steps",
  "wb_restarts",
  "wb_augment",
  "base_class",
  "target_class",
)


class Crafted(NamedTuple):
  """Poisons of one attack against one pre-trained model for its T targets (best first)."""

  target_idx_T: np.ndarray  # [T] int32 test indices of the targets
  x_TQ: np.ndarray  # [T, Q, ...] float32 poisons (zeros where missing)
  base_TQ: np.ndarray  # [T, Q] int32 clean-training index each poison replaces, -1: none
  score_TQ: np.ndarray  # [T, Q] float32 feature distance (frogs) or alignment loss (brew)
  count_T: np.ndarray  # [T] int32 usable poisons per target (<= Q)


def craft(
  ctx: setups.Context,
  config,
  attack: str,
  params,
  target_idx_T: np.ndarray,
  q: int,
  seed: int,
  cache: common.ParamsCache,
  name: str,
) -> Crafted:
  """Up to `q` poisons per target for `attack` (cached in `cache` under `name`)."""
  if attack == "ceiling":
    return ceiling(ctx, target_idx_T, q, config.mode)
  key = {
    "attack": attack,
    **{f: getattr(config, f) for f in CRAFT_FIELDS},
    **{f: getattr(config, f) for f in setups.PRETRAIN_FIELDS},
    "setup": ctx.setup.name,
    "q": q,
    "seed": seed,
    "targets": target_idx_T.tolist(),
  }
  if attack == "witches_brew":  # one-shot brews each poison alone, multi-poison all together
    key["mode"] = config.mode

  def make():
    if attack in ("poison_frogs", "watermark"):
      opacity = config.watermark if attack == "watermark" else 0.0
      return frogs(ctx, config, params, target_idx_T, q, opacity)
    if attack == "witches_brew":
      return brew(ctx, config, params, target_idx_T, q, seed)
    raise ValueError(
      f"attack must be one of ceiling, poison_frogs, watermark, witches_brew: {attack!r}"
    )

  template = Crafted(*range(len(Crafted._fields)))
  return Crafted(*cache.get(name, key, template, make))


def ceiling(ctx: setups.Context, target_idx_T: np.ndarray, q: int, mode: str) -> Crafted:
  """The target image itself as the poison (q copies for multi-poison; one-shot: one)."""
  t = target_idx_T.size
  x_TQ = np.repeat(ctx.x_test[target_idx_T][:, None], q, axis=1).astype(np.float32)
  count = 1 if mode == "oneshot" else q
  return Crafted(
    target_idx_T,
    x_TQ,
    np.full((t, q), -1, np.int32),
    np.zeros((t, q), np.float32),
    np.full(t, count, np.int32),
  )


def frogs(
  ctx: setups.Context, config, params, target_idx_T: np.ndarray, q: int, opacity: float
) -> Crafted:
  """Feature collision from the K base-class test points nearest each target (penultimate
  space), all targets' candidates in one vmapped loop; keeps the q accepted poisons
  (feature distance <= bound) nearest the target. `opacity` > 0 blends the target into
  each base before crafting (the watermark)."""
  pool_N = np.flatnonzero(ctx.y_test == config.base_class)
  k = min(config.candidates, pool_N.size)
  f_pool_NF = features(ctx, params, ctx.x_test[pool_N])
  x_target_T = ctx.x_test[target_idx_T]
  f_target_TF = features(ctx, params, x_target_T)
  dist_TN = np.linalg.norm(f_pool_NF[None] - f_target_TF[:, None], axis=-1)
  near_TK = np.argsort(dist_TN, axis=1, kind="stable")[:, :k]
  x_base_TK = ctx.x_test[pool_N[near_TK]]
  if opacity > 0:
    x_base_TK = np.clip((1 - opacity) * x_base_TK + opacity * x_target_T[:, None], 0.0, 1.0)
  beta = config.beta0 * (f_pool_NF.shape[-1] / float(np.prod(ctx.x.shape[1:]))) ** 2

  t = target_idx_T.size
  x_TK, dist_TK = np.zeros_like(x_base_TK), np.zeros((t, k), np.float32)
  chunk = max(1, 2000 // k)  # bound the memory of one vmapped loop
  for i in range(0, t, chunk):
    col = _collide_T(
      ctx.model,
      params,
      jnp.asarray(x_target_T[i : i + chunk]),
      jnp.asarray(x_base_TK[i : i + chunk]),
      config.craft_lr,
      beta,
      config.craft_iters,
    )
    x_TK[i : i + chunk] = np.asarray(col.x_K)
    dist_TK[i : i + chunk] = np.asarray(col.distance_K)
  x_TQ = np.zeros((t, q, *ctx.x.shape[1:]), np.float32)
  score_TQ = np.full((t, q), np.nan, np.float32)
  count_T = np.zeros(t, np.int32)
  for i in range(t):
    order = np.argsort(dist_TK[i], kind="stable")
    order = order[dist_TK[i][order] <= config.max_feature_distance][:q]
    count_T[i] = order.size
    x_TQ[i, : order.size] = x_TK[i, order]
    score_TQ[i, : order.size] = dist_TK[i, order]
  return Crafted(target_idx_T, x_TQ, np.full((t, q), -1, np.int32), score_TQ, count_T)


# Module-level jitted functions (the model static, parameters and numbers traced): one
# compilation serves every pre-trained model, attack and target chunk of a shape.
@functools.partial(jax.jit, static_argnames=("model",))
def _collide_T(model, params, x_target_T, x_base_TK, learning_rate, beta, max_iters):
  run = lambda xt, xb: poisons.collide(model, params, xt, xb, learning_rate, beta, max_iters)
  return jax.vmap(run)(x_target_T, x_base_TK)


@functools.partial(jax.jit, static_argnames=("model",))
def _features(model, params, x_ND):
  return models.features(model, params, x_ND)


def features(ctx: setups.Context, params, x_N: np.ndarray, chunk: int = 2000) -> np.ndarray:
  return np.concatenate(
    [
      np.asarray(_features(ctx.model, params, jnp.asarray(x_N[i : i + chunk])))
      for i in range(0, len(x_N), chunk)
    ]
  )


def brew(ctx: setups.Context, config, params, target_idx_T: np.ndarray, q: int, seed: int):
  """Gradient matching with bases from the clean training subset (they *replace* their clean
  copies when active). One-shot: q independent single-poison brews per target (attempts);
  multi-poison: one brew of budget q, of which the first k are used."""
  t = target_idx_T.size
  x_TQ = np.zeros((t, q, *ctx.x.shape[1:]), np.float32)
  base_TQ = np.full((t, q), -1, np.int32)
  score_TQ = np.full((t, q), np.nan, np.float32)
  augment = bool(config.wb_augment) and ctx.x.ndim == 4
  key = jax.random.fold_in(jax.random.key(seed), 7)
  for i, target in enumerate(target_idx_T):
    runs = [(a, 1) for a in range(q)] if config.mode == "oneshot" else [(0, q)]
    for a, budget in runs:
      ps = poisons.witches_brew(
        jax.random.fold_in(jax.random.fold_in(key, int(target)), a),
        ctx.model,
        params,
        ctx.x_test[target],
        config.base_class,
        ctx.x,
        ctx.y,
        budget=budget,
        epsilon=config.wb_epsilon,
        steps=config.wb_steps,
        restarts=config.wb_restarts,
        augment=augment,
        target_idx=int(target),
        num_classes=ctx.num_classes,
      )
      x_TQ[i, a : a + budget] = np.asarray(ps.x)
      base_TQ[i, a : a + budget] = np.asarray(ps.base_idx)
      score_TQ[i, a : a + budget] = float(np.min(np.asarray(ps.info["loss_R"])))
  return Crafted(target_idx_T, x_TQ, base_TQ, score_TQ, np.full(t, q, np.int32))
