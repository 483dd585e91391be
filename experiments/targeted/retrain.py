"""The re-trainings of one setup as one vmapped sweep (`jaxshape.sweep`).

Every re-training of an (arm, seed) -- every target, attack, attempt and poison
count, and the no-poison control -- starts from the same pre-trained model
with the same PRNG key: one shuffling (and one DP noise stream) shared by all,
as the original code's fixed seed 215 did. Each poison takes the *slot* of one
fixed clean point (`displaced_points`; Witches' Brew: of its own base), so a
poisoned run sees exactly the control's batches except that one example: the
control is bitwise the poisoned run without the poison, and N attempts do not
multiply chance flips (a target the control flips is counted by the control).

All re-trainings of a setup -- every attempt (one-shot) or poison count
(multi-poison) of every (attack, arm, seed, target) and the controls -- run as
one sweep, vmapped in chunks of `max_batch` (one compilation per defense kind).
The original's sequential "stop at the first success" order is applied as a
mask (`outcome.aggregate`): since all runs of an (arm, seed) share the key, a
target's runs after its first success cannot change its outcome and are
ignored. The control is one re-training per (arm, seed), evaluated on all
targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.targeted import crafting
from experiments.targeted import outcome
from experiments.targeted import setups
from jaxshape import sweep
from jaxshape import train

CONTROL = "control"  # the `attack` of the no-poison control rows
RETRAIN_SEED = 10_000  # re-training key: RETRAIN_SEED + model seed (pre-training: the seed)

ATTEMPT_COLUMNS = (
  "target_index",
  "attack",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "attempt",
  "n_poisons",
  "success",
  "success_epoch",
  "flip_epoch",
  "clean_acc",
  "acc_final",
  "acc_min",
  "rad",
  "initial_margin",
  "margin_final",
  "margin_min",
)


class Arm(tuple):
  """A pre-training and a re-training defense (§6.5's scenarios pair them)."""

  def __new__(cls, pre: common.Defense, re: common.Defense):
    return super().__new__(cls, (pre, re))

  pre = property(lambda self: self[0])
  re = property(lambda self: self[1])

  @property
  def key(self) -> common.Defense:
    """The defense the CSV rows name: the re-training one, or the pre-training one when
    only pre-training is defended (dp_then_vanilla)."""
    return self.pre if self.re == common.VANILLA else self.re


def make_arms(scenario: str, grid: Sequence[common.Defense]) -> list[Arm]:
  """standard: pre-train and re-train with D (the paper's code: one DP pre-trained model per
  configuration); vanilla_then_dp: a vanilla model re-trained with D; dp_then_vanilla: a
  model pre-trained with D re-trained without defense."""
  if scenario == "standard":
    return [Arm(d, d) for d in grid]
  if scenario == "vanilla_then_dp":
    return [Arm(common.VANILLA, d) for d in grid]
  if scenario == "dp_then_vanilla":
    return [Arm(d, common.VANILLA) for d in grid]
  raise ValueError(f"scenario must be standard, vanilla_then_dp or dp_then_vanilla: {scenario!r}")


def displaced_points(y_N: np.ndarray, count: int, avoid: Sequence[int]) -> np.ndarray:
  """The clean training points whose slots poisons 1..count take (int32 `[count]`).

  An *added* poison would make the set N + k long, and with N a multiple of the batch size
  every epoch would end in a batch of the k poisons alone, averaged at full weight (100x an
  ordinary example at batch 100, and 100x the DP noise); that artifact, not the attack, once
  cost the LR a RAD of 0.2. So each poison takes the slot of one clean point, chosen in a
  fixed random order among classes other than `avoid` (base and target classes, whose
  removal could help the attack).
  """
  pool = np.flatnonzero(~np.isin(np.asarray(y_N), np.asarray(avoid)))
  if pool.size < count:
    raise ValueError(f"only {pool.size} clean points outside classes {avoid} to displace")
  return pool[np.random.default_rng(3).permutation(pool.size)[:count]].astype(np.int32)


@dataclasses.dataclass
class Plan:
  """What the re-training sweep of one setup needs, indexed by model m and variant v."""

  arms: list[Arm]
  seeds: list[int]
  models: list[tuple[common.Defense, int]]  # m -> (pre-training defense, seed)
  clean_acc_M: list[float]
  margin_MT: list[np.ndarray]  # the pre-trained model's margin on each of its targets
  crafted: dict[tuple[str, int], crafting.Crafted]  # (attack, m) -> poisons
  variants: list[tuple[str, int, int, int]]  # v -> (attack, m, target position, attempt)
  shared: dict

  def model_index(self, arm: Arm, seed: int) -> int:
    return self.models.index((arm.pre, seed))

  def targets(self, m: int) -> np.ndarray:
    return next(c.target_idx_T for (_, mm), c in self.crafted.items() if mm == m)


def make_plan(ctx, config, arms, seeds, params_by_model, crafted, margin_by_model) -> Plan:
  models_m = list(params_by_model)
  oneshot = config.mode == "oneshot"
  variants, px = [], []
  for (attack, m), c in crafted.items():
    for i in range(c.target_idx_T.size):
      for a in range(c.count_T[i] if oneshot else 1):
        variants.append((attack, m, i, a))
        px.append(c.x_TQ[i, a : a + 1] if oneshot else c.x_TQ[i])
  base = [
    crafted[att, m].base_TQ[i, a : a + 1] if oneshot else crafted[att, m].base_TQ[i]
    for att, m, i, a in variants
  ]
  p = max(len(a) for a in px) if px else 1
  t = max(c.target_idx_T.size for c in crafted.values())
  xt_MT = np.zeros((len(models_m), t, *ctx.x.shape[1:]), np.float32)
  for (_, m), c in crafted.items():
    xt_MT[m, : c.target_idx_T.size] = ctx.x_test[c.target_idx_T]
  px_VP = np.zeros((max(len(px), 1), p, *ctx.x.shape[1:]), np.float32)
  base_VP = np.full((max(len(px), 1), p), -1, np.int32)
  for v, (x, b) in enumerate(zip(px, base, strict=True)):
    px_VP[v, : len(x)], base_VP[v, : len(b)] = x, b
  n = ctx.x.shape[0]
  shared = {
    # The pool: the N clean points, then every variant's P poisons (rows N + v P + j).
    "pool_x": np.concatenate([ctx.x, px_VP.reshape(-1, *ctx.x.shape[1:])]),
    "pool_y": np.concatenate([ctx.y, np.full(px_VP.shape[0] * p, config.base_class, np.int32)]),
    "x_eval": ctx.x_eval,
    "y_eval": ctx.y_eval,
    "params_M": jax.tree.map(lambda *a: np.stack(a), *[params_by_model[k] for k in models_m]),
    "xt_MT": xt_MT,
    "base_VP": base_VP,
    "displace_P": displaced_points(ctx.y, p, (config.base_class, config.target_class)),
  }
  assert shared["pool_x"].shape[0] == n + px_VP.shape[0] * p
  clean_acc_M = [setups.accuracy(ctx, params_by_model[k]) for k in models_m]
  margins = [margin_by_model[k] for k in models_m]
  return Plan(list(arms), list(seeds), models_m, clean_acc_M, margins, crafted, variants, shared)


def training_set(shared: dict, n: int, variant, n_poisons) -> dict:
  """The re-training set of one job as rows of the shared pool (`train.num_examples`):
  slot j < `n_poisons` of the variant's poisons replaces its base point (Witches' Brew) or
  its displaced point; every other slot is the clean point, so the order of batches is
  the control's. Traceable in `variant` and `n_poisons` (a grid vmaps; the pool is not
  copied per job)."""
  base_P = shared["base_VP"][variant]
  p = base_P.shape[0]
  slot_P = jnp.where(base_P >= 0, base_P, shared["displace_P"])
  on_P = jnp.arange(p) < n_poisons
  index_N = jnp.arange(n, dtype=jnp.int32)
  index_N = index_N.at[slot_P].set(jnp.where(on_P, n + variant * p + jnp.arange(p), slot_P))
  return {"x": shared["pool_x"], "y": shared["pool_y"], "index": index_N}


def build_program(ctx, config):
  """`build(defense_kind)` for `sweep.run`: re-train pre-trained model `values["model"]` on
  the clean set with the first `n_poisons` poisons of variant `values["variant"]`, recording
  per epoch the test accuracy and every target's prediction and margin (logit of the target
  class minus the attacker's; below 0 the attacker's class wins)."""
  n = ctx.x.shape[0]

  def build(kind: str):
    spec = setups.make_spec(ctx, kind, config.retrain_epochs)

    def program(values, key, shared):
      m = values["model"].astype(jnp.int32)
      v = values["variant"].astype(jnp.int32)
      params = jax.tree.map(lambda a: a[m], shared["params_M"])
      fit_data = training_set(shared, n, v, values["n_poisons"])
      xt_T = shared["xt_MT"][m]

      def eval_fn(params):
        logits_TC = ctx.model.apply({"params": params}, xt_T)
        return {
          "test_acc": train.accuracy(ctx.model, params, shared["x_eval"], shared["y_eval"]),
          "pred_T": jnp.argmax(logits_TC, axis=-1).astype(jnp.int32),
          "margin_T": logits_TC[:, config.target_class] - logits_TC[:, config.base_class],
        }

      hp = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      records = train.fit(spec, hp, key, fit_data, init_params=params, eval_fn=eval_fn).records
      return {k: records[k] for k in ("test_acc", "pred_T", "margin_T")}

    return program

  return build


def job(plan: Plan, ctx, arm: Arm, seed: int, variant: int, n_poisons: int, key: dict):
  values = {
    "model": plan.model_index(arm, seed),
    "variant": variant,
    "n_poisons": n_poisons,
    "learning_rate": ctx.learning_rate,
    "l2_norm_clip": arm.re.clip_norm,
    "noise_multiplier": arm.re.noise_multiplier,
  }
  full_key = {**arm.key.fields(), "seed": seed, "n_poisons": n_poisons, **key}
  return sweep.Job(arm.re.kind, values, RETRAIN_SEED + seed, full_key)


def control_jobs(plan: Plan, ctx) -> list[sweep.Job]:
  """One clean re-training per (arm, seed), with the key every attempt of it shares."""
  return [
    job(plan, ctx, arm, seed, 0, 0, {"attack": CONTROL, "attempt": -1})
    for arm in plan.arms
    for seed in plan.seeds
  ]


def attack_jobs(plan: Plan, ctx, config) -> list[sweep.Job]:
  """Every re-training with poisons: one-shot attempt a of every (attack, arm, seed, target)
  with a usable a-th poison; multi-poison every count k of `poison_counts` it has poisons
  for. All run in one vmapped sweep; `outcome.aggregate` keeps each target's runs up to its
  first success in the original's order and masks the rest."""
  jobs = []
  for arm in plan.arms:
    for seed in plan.seeds:
      m = plan.model_index(arm, seed)
      for v, (attack, vm, i, a) in enumerate(plan.variants):
        c = plan.crafted[attack, vm]
        if vm != m:
          continue
        key = {"attack": attack, "target_index": int(c.target_idx_T[i]), "attempt": a}
        if config.mode == "oneshot":
          jobs.append(job(plan, ctx, arm, seed, v, 1, key))
        else:
          for k in sorted(set(config.poison_counts)):
            if k <= c.count_T[i]:
              jobs.append(job(plan, ctx, arm, seed, v, k, key))
  return jobs


def make_to_rows(plan: Plan, attacker_class: int):
  def to_rows(job: sweep.Job, outputs) -> list[dict]:
    m = int(job.values["model"])
    targets_T = plan.targets(m)
    if job.key["attack"] == CONTROL:
      positions = list(range(targets_T.size))
    else:
      positions = [plan.variants[int(job.values["variant"])][2]]
    acc_E = np.asarray(outputs["test_acc"], np.float64)
    clean_acc = plan.clean_acc_M[m]
    rows = []
    for i in positions:
      pred_E = np.asarray(outputs["pred_T"])[:, i]
      margin_E = np.asarray(outputs["margin_T"], np.float64)[:, i]
      success, epoch = outcome.decide_success(pred_E, acc_E, attacker_class, clean_acc)
      rows.append(
        {
          "target_index": int(targets_T[i]),
          "success": success,
          "success_epoch": epoch,
          "flip_epoch": outcome.first_flip(pred_E, attacker_class),
          "clean_acc": clean_acc,
          "acc_final": float(acc_E[-1]),
          "acc_min": float(acc_E.min()),
          "rad": (clean_acc - float(acc_E[-1])) / clean_acc,
          "initial_margin": float(plan.margin_MT[m][i]),
          "margin_final": float(margin_E[-1]),
          "margin_min": float(margin_E.min()),
        }
      )
    return rows

  return to_rows
