"""The multi-poison part: every mechanism against multi-poison Poison Frogs on LR (§6.4).

Reuses `experiments.targeted`: its setup (softmax regression on a fixed subset
of FashionMNIST, Adam lr 0.08, batch 100), its vanilla pre-training (one model
per seed, cached), its targets (T-shirts the model gets right, attacked toward
shirt), its Poison Frogs crafting (cached) and its re-training set (each poison
takes the slot of one fixed clean point, so a poisoned run sees exactly the
no-poison control's batches but for its poisons: `retrain.training_set`). What
differs: every mechanism re-trains the *vanilla* pre-trained model (the
attacker crafts against it), with `train.HParams.shaping_param` and the
detector's filter (examples whose score at the pre-trained model is above the
filter's threshold are left out). Success (§6.1): the target is a shirt after
any re-training epoch with RAD < 0.05, for any of `mp_poison_counts`; the
no-poison control is one re-training per (mechanism, seed).

References:
  Hong et al. 2020, §6.1, §6.4; Shafahi et al. 2018, "Poison Frogs!".
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import targeted
from experiments.shaping import detection
from experiments.shaping.config import AUC_COLUMNS
from experiments.shaping.config import MECHANISM_FIELDS
from experiments.shaping.config import Config
from experiments.shaping.config import by_cost
from experiments.shaping.config import mechanism_ident
from experiments.shaping.config import mechanisms
from experiments.targeted import crafting
from experiments.targeted import outcome
from experiments.targeted import retrain
from experiments.targeted import setups
from jaxshape import detect
from jaxshape import sweep
from jaxshape import train

CONTROL = retrain.CONTROL
RUN_COLUMNS = (
  "attack",
  *MECHANISM_FIELDS,
  "seed",
  "target_index",
  "n_poisons",
  "success",
  "success_epoch",
  "acc_final",
  "margin_final",
  "n_removed",
  "n_poison_removed",
)


def targeted_config(config: Config) -> targeted.Config:
  """The `experiments.targeted` settings this part shares (setup, pre-training, crafting)."""
  return targeted.Config(
    out=os.path.join(config.out, "multipoison"),
    cache_dir=os.path.join(config.out, "cache"),
    data_dir=config.data_dir,
    download=False,
    seeds=config.seeds,
    progress=config.progress,
    mode="multipoison",
    attacks=(config.mp_attack,),
    setups=("fashion_mnist:lr",),
    targets=config.mp_targets,
    include_vanilla=True,
    clip_norms=(),
    noise_multipliers=(),
    max_train=config.mp_max_train,
    max_test=config.mp_max_test,
    pretrain_epochs=config.mp_pretrain_epochs,
    retrain_epochs=config.mp_retrain_epochs,
    batch_size=config.mp_batch_size,
    learning_rate=config.mp_learning_rate,
    poison_counts=tuple(config.mp_poison_counts),
    candidates=config.mp_candidates,
    craft_iters=config.mp_craft_iters,
  )


def build_program(ctx, tconfig):
  """`build(defense_kind)`: re-train pre-trained model `m` on the clean set with the first
  `n_poisons` poisons of `variant`, minus the examples scored above `threshold`; per epoch
  the test accuracy and every target's prediction and margin (as `retrain.build_program`)."""
  n = ctx.x.shape[0]

  def build(kind: str):
    spec = setups.make_spec(ctx, kind, tconfig.retrain_epochs)

    def program(values, key, shared):
      m = values["model"].astype(jnp.int32)
      v = values["variant"].astype(jnp.int32)
      params = jax.tree.map(lambda a: a[m], shared["params_M"])
      data = retrain.training_set(shared, n, v, values["n_poisons"])
      keep_N = (shared["score_MR"][m][data["index"]] <= values["threshold"]).astype(jnp.float32)
      data["mask"] = keep_N
      base_P = shared["base_VP"][v]
      slot_P = jnp.where(base_P >= 0, base_P, shared["displace_P"])
      on_P = (jnp.arange(base_P.shape[0]) < values["n_poisons"]).astype(jnp.float32)
      xt_T = shared["xt_MT"][m]

      def eval_fn(params):
        logits_TC = ctx.model.apply({"params": params}, xt_T)
        return {
          "test_acc": train.accuracy(ctx.model, params, shared["x_eval"], shared["y_eval"]),
          "pred_T": jnp.argmax(logits_TC, axis=-1).astype(jnp.int32),
          "margin_T": logits_TC[:, tconfig.target_class] - logits_TC[:, tconfig.base_class],
        }

      hp = train.HParams.create(
        values["learning_rate"],
        values["l2_norm_clip"],
        values["noise_multiplier"],
        values["shaping_param"],
      )
      records = train.fit(spec, hp, key, data, init_params=params, eval_fn=eval_fn).records
      return {
        **{k: records[k] for k in ("test_acc", "pred_T", "margin_T")},
        "n_removed": jnp.sum(1.0 - keep_N),
        "n_poison_removed": jnp.sum(on_P * (1.0 - keep_N[slot_P])),
      }

    return program

  return build


def run_part(config: Config, out: str, cache: common.ParamsCache) -> dict:
  """Pre-trains, crafts, scores, re-trains the grid; returns the rows and detector rows."""
  tconfig = targeted.validate(targeted_config(config))
  (setup,), datasets = setups.resolve_setups(tconfig)
  ctx = setups.make_context(tconfig, setup, datasets[setup.dataset])
  seeds = list(range(config.seeds))
  q = max(config.mp_poison_counts)
  with common.Timer() as t:
    params = setups.pretrain(ctx, tconfig, [common.VANILLA], seeds, cache)
    crafted, margins = {}, {}
    for m, (d, s) in enumerate(params):
      targets_T = setups.choose_targets(ctx, params[d, s], tconfig.target_class, tconfig.targets)
      logits_TC = setups.logits(ctx, params[d, s], ctx.x_test[targets_T])
      margins[d, s] = logits_TC[:, tconfig.target_class] - logits_TC[:, tconfig.base_class]
      name = f"poisons_{setup.name}_{config.mp_attack}_{d.slug}_seed{s}"
      crafted[config.mp_attack, m] = crafting.craft(
        ctx, tconfig, config.mp_attack, params[d, s], targets_T, q, s, cache, name
      )
  print(f"multi-poison: pre-training and crafting {t.seconds:.1f} s")
  arms = [retrain.Arm(common.VANILLA, common.VANILLA)]
  plan = retrain.make_plan(ctx, tconfig, arms, seeds, params, crafted, margins)
  shared = plan.shared
  n = ctx.x.shape[0]
  p = shared["base_VP"].shape[1]

  # Detector scores of every pool row at each pre-trained model (clean + that model's poisons).
  score_MR, detect_rows, thresholds = [], [], {}
  with common.Timer() as t:
    for m, (d, s) in enumerate(plan.models):
      own = [v for v, (_, vm, _, _) in enumerate(plan.variants) if vm == m]
      counts = [int(crafted[config.mp_attack, m].count_T[plan.variants[v][2]]) for v in own]
      rows = np.concatenate(
        [np.arange(n), *[n + v * p + np.arange(k) for v, k in zip(own, counts, strict=True)]]
      )
      key = {"part": "multipoison", **targeted_key(tconfig), "seed": s}

      def compute(rows=rows, d=d, s=s):
        x_r, y_r = shared["pool_x"][rows], shared["pool_y"][rows]
        return detection.scores(ctx.model, params[d, s], x_r, y_r, ctx.num_classes)

      got = detection.cached_scores(cache, f"detect_mp_seed{s}", key, compute)
      full = np.zeros(shared["pool_x"].shape[0])
      full[rows] = got[config.filter_score]
      score_MR.append(full)
      for f in config.filter_fractions:
        thresholds[m, f] = detection.threshold(got[config.filter_score][:n], f)
      start = n
      for v, count in zip(own, counts, strict=True):
        sel = np.concatenate([np.arange(n), start + np.arange(count)])
        start += count
        is_poison = np.arange(sel.size) >= n
        real = {k: val[sel] for k, val in got.items()}
        detect_rows.append(
          {
            "attack": config.mp_attack,
            "seed": s,
            "target_index": int(plan.targets(m)[plan.variants[v][2]]),
            "n_poisons": count,
            **detection.aucs(real, is_poison),
            "precision_at_k": detect.precision_at_k(real[config.filter_score], is_poison)
            if count
            else math.nan,
          }
        )
  print(f"detector: {len(plan.models)} models scored in {t.seconds:.1f} s")
  shared = {**shared, "score_MR": np.stack(score_MR).astype(np.float32)}

  jobs = []
  for mech in mechanisms(config):
    d = mech.defense
    for s in seeds:
      m = plan.models.index((common.VANILLA, s))
      values = {
        "model": m,
        "learning_rate": ctx.learning_rate,
        "l2_norm_clip": d.clip_norm,
        "noise_multiplier": d.noise_multiplier,
        "shaping_param": d.shaping_param,
        "threshold": thresholds[m, mech.filter_fraction] if mech.name == "filter" else math.inf,
      }
      base = {"attack": CONTROL, **mech.fields(), "seed": s, "n_poisons": 0}
      jobs.append(sweep.Job(d.kind, {**values, "variant": 0, "n_poisons": 0}, 10_000 + s, base))
      for v, (attack, vm, i, _) in enumerate(plan.variants):
        c = plan.crafted[attack, vm]
        if vm != m:
          continue
        for k in sorted(set(config.mp_poison_counts)):
          if k <= c.count_T[i]:
            key = {**base, "attack": attack, "n_poisons": k, "target_index": int(c.target_idx_T[i])}
            jobs.append(
              sweep.Job(d.kind, {**values, "variant": v, "n_poisons": k}, 10_000 + s, key)
            )

  def to_rows(job, outputs):
    m = int(job.values["model"])
    targets_T = plan.targets(m)
    if job.key["attack"] == CONTROL:
      positions = range(targets_T.size)
    else:
      positions = [plan.variants[int(job.values["variant"])][2]]
    acc_E = np.asarray(outputs["test_acc"], np.float64)
    rows = []
    for i in positions:
      pred_E = np.asarray(outputs["pred_T"])[:, i]
      success, epoch = outcome.decide_success(
        pred_E, acc_E, tconfig.base_class, plan.clean_acc_M[m]
      )
      rows.append(
        {
          "target_index": int(targets_T[i]),
          "success": success,
          "success_epoch": epoch,
          "acc_final": float(acc_E[-1]),
          "margin_final": float(np.asarray(outputs["margin_T"])[-1, i]),
          "n_removed": int(round(float(outputs["n_removed"]))),
          "n_poison_removed": int(round(float(outputs["n_poison_removed"]))),
        }
      )
    return rows

  runs = sweep.run(
    build_program(ctx, tconfig),
    by_cost(jobs),
    os.path.join(out, "multipoison_runs.csv"),
    to_rows=to_rows,
    columns=RUN_COLUMNS,
    max_batch=config.mp_max_batch,
    progress=config.progress,
    desc="shaping multi-poison",
    shared=shared,
  )
  return {
    "runs": runs,
    "detect": detect_rows,
    "n_clean": n,
    "pretrained_acc": dict(zip(seeds, plan.clean_acc_M, strict=True)),
  }


def targeted_key(tconfig) -> dict:
  """What the pre-trained models and poisons depend on (the detector cache's key)."""
  fields = (*setups.PRETRAIN_FIELDS, *crafting.CRAFT_FIELDS, "targets", "poison_counts")
  return {f: getattr(tconfig, f) for f in fields}


def result_rows(config: Config, runs: list[dict], detect_rows: list[dict], n_clean: int):
  """results.csv rows, one per (mechanism point, seed): the share of targets hit (any of
  the poison counts), the control's hits, the control's accuracy (`clean_acc`) and the
  cost against vanilla's control (same seed), the filter's mean detector AUCs."""
  labels = {mechanism_ident(m.fields()): m for m in mechanisms(config)}
  controls, hits = {}, {}
  counts = set(config.mp_poison_counts)
  for r in runs:
    if r["seed"] >= config.seeds or (r["attack"] != CONTROL and r["n_poisons"] not in counts):
      continue  # rows of an earlier run with a larger grid
    ident = (mechanism_ident(r), r["seed"])
    if r["attack"] == CONTROL:
      controls.setdefault(ident, {})[r["target_index"]] = r
    else:
      t = hits.setdefault(ident, {}).setdefault(r["target_index"], [])
      t.append(r)
  vanilla = {
    seed: next(iter(c.values()))["acc_final"]
    for (ident, seed), c in controls.items()
    if ident[0] == "vanilla"
  }
  out = []
  for (ident, seed), ctrl in controls.items():
    mech = labels.get(ident)
    if mech is None:
      continue
    targets = sorted(ctrl)
    mine = hits.get((ident, seed), {})
    wins = sum(any(r["success"] is True for r in mine.get(t, [])) for t in targets)
    c_wins = sum(ctrl[t]["success"] is True for t in targets)
    clean_acc = next(iter(ctrl.values()))["acc_final"]
    poisoned = [r for rs in mine.values() for r in rs]
    k_max = max(config.mp_poison_counts)
    row = {
      "attack": config.mp_attack,
      "poison_ratio": k_max / n_clean,
      "n_poisons": k_max,
      **mech.fields(),
      "label": mech.label,
      "seed": seed,
      "metric_name": "success",
      "metric": wins / len(targets) if targets else math.nan,
      "acc": float(np.mean([r["acc_final"] for r in poisoned])) if poisoned else math.nan,
      "clean_acc": clean_acc,
      "cost": 100.0 * (vanilla.get(seed, math.nan) - clean_acc),
      "targets": len(targets),
      "successes": wins,
      "control_successes": c_wins,
      "n_removed": float(np.mean([r["n_removed"] for r in poisoned])) if poisoned else 0,
      "n_poison_removed": float(np.mean([r["n_poison_removed"] for r in poisoned]))
      if poisoned
      else 0,
    }
    if mech.name == "filter":
      mine_d = [d for d in detect_rows if d["seed"] == seed]
      row.update({k: float(np.nanmean([d[k] for d in mine_d])) for k in AUC_COLUMNS})
    out.append(row)
  return out
