"""One targeted run: per setup, pre-train, choose targets, craft, re-train, report.

Outputs in `config.out`, one folder per setup `<dataset>_<model>/`:
  margins.csv    the pre-trained vanilla model's margins for every class pair (why the pair).
  attempts.csv   one row per re-training and target (resumable; controls: attack "control").
  targeted.csv   one row per (attack, defense, seed, target) (`outcome.TARGETED_COLUMNS`).
  summary.csv    one row per (attack, defense) (`outcome.SUMMARY_COLUMNS`).
  targeted.png   success per defense and attack with intervals and the control.
  setup.json     what ran, usable poisons, timings.
`<out>/summary.csv` stacks the setups' summaries; `<out>/cache/` holds pre-trained
parameters and poisons (or `--cache_dir`), reused by runs with the same settings.
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common
from experiments.targeted import config as config_lib
from experiments.targeted import crafting
from experiments.targeted import outcome
from experiments.targeted import report
from experiments.targeted import retrain
from experiments.targeted import setups
from jaxshape import results
from jaxshape import sweep

# Version of what a row of attempts.csv means; 3: one shuffling per (arm, seed) shared by all
# attempts and the control, poisons in displaced slots, first success as a mask (issue 10).
RETRAIN_VERSION = 3
RUN_FIELDS = (
  *setups.PRETRAIN_FIELDS,
  *crafting.CRAFT_FIELDS,
  "mode",
  "scenario",
  "retrain_epochs",
  "max_test",
)


def check_resumable(config, folder: str, csv_path: str) -> None:
  """Refuses to mix re-trainings of different settings in one attempts.csv.

  Seeds, targets, attacks, defenses, attempts and poison counts may grow between runs (they
  only add rows); anything else that changes what a row means needs a new output folder.
  """
  path = os.path.join(folder, "run.json")
  signature = {f: getattr(config, f) for f in RUN_FIELDS}
  signature["retrain_version"] = RETRAIN_VERSION
  signature = results.parse([{k: results.format_value(v) for k, v in signature.items()}])[0]
  if os.path.exists(csv_path) and not os.path.exists(path):
    raise ValueError(
      f"{folder} holds re-trainings of unknown settings (no run.json); use a new --out"
    )
  if os.path.exists(path) and os.path.exists(csv_path):
    old = results.read_json(path)
    changed = sorted(
      k for k in signature if results.canonical(old.get(k)) != results.canonical(signature[k])
    )
    if changed:
      raise ValueError(
        f"{folder} holds results of other settings ({', '.join(changed)} differ); "
        "pass a new --out or remove the folder"
      )
  results.write_json(path, signature)


def run_setup(config, setup: setups.Setup, ds, folder: str, cache: common.ParamsCache) -> dict:
  """Pre-trains, crafts, re-trains and aggregates one setup into `folder`."""
  os.makedirs(folder, exist_ok=True)
  ctx = setups.make_context(config, setup, ds)
  seeds = list(range(config.seeds))
  arms = retrain.make_arms(config.scenario, config_lib.defenses(config))
  q = config.attempts if config.mode == "oneshot" else max(config.poison_counts)
  notes = [setup.note] if setup.note else []
  if ctx.x.shape[0] < ctx.n_train_full:
    notes.append(
      f"pre- and re-training on a fixed random subset of {ctx.x.shape[0]} of the "
      f"{ctx.n_train_full} clean training points"
    )
  for note in notes:
    print(f"[{setup.name}] note: {note}")
  seconds = {}
  with common.Timer() as t:
    pre = list(dict.fromkeys(a.pre for a in arms))
    params = setups.pretrain(ctx, config, pre, seeds, cache)
  seconds["pretrain"] = t.seconds
  margins = setups.margin_table(ctx, params[pre[0], 0])
  results.write_csv(os.path.join(folder, "margins.csv"), margins, list(margins[0]))
  print(f"[{setup.name}] class-pair margins of the pre-trained {pre[0].label} model:")
  print(report.format_margins(margins, (config.target_class, config.base_class)))
  with common.Timer() as t:
    models_m = list(params)
    crafted, margin_by_model = {}, {}
    for m, (d, s) in enumerate(models_m):
      targets_T = setups.choose_targets(ctx, params[d, s], config.target_class, config.targets)
      logits_TC = setups.logits(ctx, params[d, s], ctx.x_test[targets_T])
      margin_by_model[d, s] = logits_TC[:, config.target_class] - logits_TC[:, config.base_class]
      for attack in config.attacks:
        name = f"poisons_{setup.name}_{attack}_{d.slug}_seed{s}"
        crafted[attack, m] = crafting.craft(
          ctx, config, attack, params[d, s], targets_T, q, s, cache, name
        )
  seconds["craft"] = t.seconds
  plan = retrain.make_plan(ctx, config, arms, seeds, params, crafted, margin_by_model)
  csv_path = os.path.join(folder, "attempts.csv")
  check_resumable(config, folder, csv_path)
  build = retrain.build_program(ctx, config)
  to_rows = retrain.make_to_rows(plan, config.base_class)
  before = len(results.read_csv(csv_path)) if os.path.exists(csv_path) else 0
  jobs = retrain.control_jobs(plan, ctx) + retrain.attack_jobs(plan, ctx, config)
  with common.Timer() as t:
    rows = sweep.run(
      build,
      jobs,
      csv_path,
      to_rows=to_rows,
      columns=retrain.ATTEMPT_COLUMNS,
      max_batch=config.max_batch,
      progress=config.progress,
      desc=f"{setup.name} {config.mode}",
      shared=plan.shared,
    )
  seconds["retrain"] = t.seconds
  seconds["retrain_jobs"] = len(jobs)
  new_rows = len(rows) - before
  targeted = outcome.aggregate(
    plan, rows, config.mode, attempts=config.attempts, counts=set(config.poison_counts)
  )
  summary = outcome.summarize(plan, targeted)
  results.write_csv(
    os.path.join(folder, "targeted.csv"),
    [{c: r[c] for c in outcome.TARGETED_COLUMNS} for r in targeted],
    outcome.TARGETED_COLUMNS,
  )
  results.write_csv(os.path.join(folder, "summary.csv"), summary, outcome.SUMMARY_COLUMNS)
  title = f"{config.mode} ({config.scenario}): {setup.model.upper()} / {setup.dataset}"
  report.plot_summary(
    os.path.join(folder, "targeted.png"), [(title, summary)], config.mode == "multipoison"
  )
  usable = {f"{a}_{m}": int(c.count_T.sum()) for (a, m), c in crafted.items()}
  results.write_json(
    os.path.join(folder, "setup.json"),
    {
      "requested": setup.requested,
      "dataset": setup.dataset,
      "model": setup.model,
      "notes": notes,
      "n_train": int(ctx.x.shape[0]),
      "n_eval": int(ctx.x_eval.shape[0]),
      "learning_rate": ctx.learning_rate,
      "optimizer": ctx.spec_kwargs["optimizer"],
      "usable_poisons": usable,
      "median_initial_margin": float(np.median(np.concatenate(plan.margin_MT))),
      "seconds": seconds,
      "new_attempt_rows": new_rows,
    },
  )
  print(f"\n[{setup.name}] {title}")
  print(report.format_summary(summary, config.mode))
  print(
    f"[{setup.name}] wall time: pre-training {seconds['pretrain']:.0f} s, crafting "
    f"{seconds['craft']:.0f} s, re-training {seconds['retrain']:.0f} s "
    f"({new_rows} new rows in attempts.csv)"
  )
  return {
    "rows": targeted,
    "summary": summary,
    "attempts": rows,
    "margins": margins,
    # One row per (defense, seed, target) of the no-poison control re-trainings.
    "controls": [r for r in rows if r["attack"] == retrain.CONTROL],
    "seconds": seconds,
    "new_rows": new_rows,
    "notes": notes,
    "plan": plan,
  }


def run(config) -> dict:
  """Runs every setup of `config`; returns {setup name: its rows and summary} and timings."""
  config = config_lib.validate(config)
  out = common.prepare_out(config)
  cache = common.ParamsCache(config.cache_dir or os.path.join(out, "cache"))
  with common.Timer() as timer:
    setup_list, datasets = setups.resolve_setups(config)
    by_setup = {
      s.name: run_setup(config, s, datasets[s.dataset], os.path.join(out, s.name), cache)
      for s in setup_list
    }
  stacked = [
    {"dataset": s.dataset, "model": s.model, **row}
    for s in setup_list
    for row in by_setup[s.name]["summary"]
  ]
  results.write_csv(
    os.path.join(out, "summary.csv"), stacked, ("dataset", "model", *outcome.SUMMARY_COLUMNS)
  )
  print(f"wall time {timer.seconds:.1f} s (pre-training and crafting included); results in {out}")
  return {"setups": by_setup, "seconds": timer.seconds, "out": out}


def with_scenario_defaults(config, defense_flags_given: bool):
  """The §6.5 defense for the transfer scenarios unless a defense flag was given."""
  return config if defense_flags_given else config_lib.scenario_defaults(config)
