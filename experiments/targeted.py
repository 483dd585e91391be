r"""Targeted clean-label poisoning vs gradient shaping (§6.3 Fig. 5, §6.4 Fig. 6, §6.5 Table 3).

For each setup (dataset x model) and seed: pre-train on the clean training set
(§6.3: 100 epochs; batch 100; lr 0.08 for LR and MLP, 0.02 for the CNN; Adam
for LR, SGD otherwise), choose `--targets` test points of `--target_class`
that the model classifies correctly, craft poisons against the model, then
re-train it on clean + poisons (§6.3: 50 epochs). Success (§6.1): the target
is classified as the attacker's class (`--base_class`) at the end of *any*
re-training epoch while RAD < 0.05, RAD relative to the test accuracy of the
pre-trained model being re-trained.

Attacks (`--attack`):
  poison_frogs  Shafahi et al.'s feature collision: the `--candidates` test
                points of the base class nearest the target in penultimate
                space are the bases; `--craft_iters` forward-backward steps;
                only poisons within feature distance 3.5 are used, nearest first.
  witches_brew  Geiping et al.'s gradient matching: clean training points of
                the base class perturbed within l-inf `--wb_epsilon`; they
                *replace* their clean copies in the re-training set.

Modes (`--mode`):
  oneshot       one poison. The paper crafts from 100 candidates and counts a
                target as hit if *any* single poison succeeds (100 re-trainings
                per target). Here each of the `--attempts` best poisons (smallest
                feature distance within the bound) is a separate re-training, with
                its own shuffling, and the target counts as hit if any succeeds.
  multipoison   poisons 1..k added in order (nearest first), k over
                `--poison_counts` (default 1, 2, ..., 10), each k a separate
                re-training, stopping at the first k that succeeds;
                `n_poisons_used` is that k (failures: the largest k tried).

Scenarios (`--scenario`, §6.5) pair a pre-training and a re-training defense:
  standard         pre-train and re-train with the same defense D (as the
                   paper's code did: one DP pre-trained model per configuration,
                   poisons crafted against it).
  vanilla_then_dp  a vanilla model re-trained with D (Table 3 "Vanilla, w. DP").
  dp_then_vanilla  a model pre-trained with D re-trained without defense.
Defenses D: vanilla, clipping only (`--clip_norms`, sigma 0), clipping at
`--noise_clip` (4) plus Gaussian noise (`--noise_multipliers`) and, if given,
the §7.2 adaptive noise (`--adaptive_multipliers`). For the two §6.5 scenarios,
when no defense flag is given, D is the paper's C = 4, sigma = 0.01 (plus the
vanilla reference). The CSV's defense columns name D (the re-training defense,
or the pre-training one for dp_then_vanilla).

Each poison takes the place of one fixed random clean point of a third class,
so every re-training set has N examples and full batches (an *added* poison
made the last batch of each epoch a lone example averaged at full weight, 100x
an ordinary example and, with DP, 100x the noise; that, not the attack, was
the LR's RAD of about 0.2; `_targeted_lib.displaced_points`).

Every run also re-trains each (defense, seed) without poisons (the no-poison
control), as many times as the rule gives a target chances (one-shot: one per
attempt, shuffled like it; multi-poison: one per poison count): the same
any-of-N rule applied to them gives the rate at which targets "flip" with no
attack at all, printed beside the success rate. Each re-training also records
the target's margin (logit of its class minus the attacker's); `margin_shift`
is the mean change of the final margin a poison causes against the paired
control (negative: toward the attacker), a graded measure of the poison's
pull that is informative even where no target flips.

Outputs in `--out` (default runs/targeted/<attack>_<mode>_<scenario>), one
folder per setup `<dataset>_<model>/`:
  targeted.csv  one row per target x configuration x seed, exactly
                `target_index, defense, clip_norm, noise_multiplier, seed,
                success, success_epoch, n_poisons_used, clean_acc, acc_final,
                rad` (target_index: test-split index; success_epoch: first
                successful epoch, 1-based, empty if none; clean_acc: the
                pre-trained model's accuracy; acc_final, rad: final epoch of
                the reported re-training).
  attempts.csv  the resumable sweep: one row per re-training (per attempt or
                poison count; controls have n_poisons 0 and attempt -1).
  summary.csv   per defense: success rate with a 95% Wilson interval, mean
                poisons needed, mean RAD, the mean margin shift and the
                controls' mean smallest margin, the rate of flips ignoring RAD,
                the no-poison control rate (and its number of runs), clean
                accuracy and the defense's utility cost (RAD of its clean
                re-training vs vanilla's).
  targeted.png  success rate per defense with interval error bars (multi-
                poison: also poisons needed); setup.json (what ran, timings).
  pretrained/, poisons/  caches reused by reruns.
`<out>/summary.csv` stacks the setups' summaries. Rerunning skips finished
re-trainings; changing a setting that alters them needs a new `--out`.

Presets. quick, multi-poison: the paper's setups with FashionMNIST for the
missing Purchase-100 (LR and MLP on FashionMNIST; the output says so),
pre-training and re-training on a fixed random subset of 10,000 of the 60,000
clean training points, 20 pre-training and 8 re-training epochs, 20 targets
(coat, class 4) attacked toward dress (class 3), 20 candidate bases, 1,000
crafting iterations (feature distances settle well before), poison counts
1, 2, 4, 8, one seed; defenses vanilla, clip C=4, clip C=1, C=4 + sigma 0.1.
quick, one-shot (`MODE_PRESETS`): the MLP / FashionMNIST only (LR with
`--setups=fashion_mnist:lr`), the same data, targets and defenses, the
paper's 10,000 crafting iterations from the 10 nearest candidates, the 3 best
poisons as attempts and 16 re-training epochs: 252 re-trainings, about 1,050
CPU-seconds (32 min wall measured at load average 6-10 on the shared 2-core
machine; about 9-10 min if both cores are free). One poison among 10,000
points barely moves the MLP: the target's margin shifts by -0.64 logits on
average (16 epochs; -0.85 over the paper's 50) against margins of 1.3-14, and
no target flipped in any run (numbers: RESULTS.md, targeted poisoning).
paper: the paper's setups (one-shot: LR / Purchase-100, MLP / FashionMNIST,
CNN / CIFAR-10; multi-poison: LR and MLP / Purchase-100), full training sets,
100 + 50 epochs, 100 targets, 100 candidates and attempts, 10,000 iterations,
poison counts 1..10; a missing CIFAR-10 or Purchase-100 is replaced by
FashionMNIST with the same model, and the output says so. The CNN on
FashionMNIST costs about 15x the MLP per example on the CPU: run it with
`--setups=fashion_mnist:cnn` when there is time.

Commands:
  python -m experiments.targeted --preset=smoke --out=runs/targeted_smoke
  python -m experiments.targeted --preset=quick --mode=oneshot
  python -m experiments.targeted --preset=quick --mode=multipoison
  python -m experiments.targeted --preset=quick --scenario=vanilla_then_dp
  python -m experiments.targeted --preset=quick --attack=witches_brew
  python -m experiments.targeted --preset=paper --mode=oneshot --data_dir=data

References:
  Hong et al. 2020, §6.1, §6.3 (Fig. 5), §6.4 (Fig. 6), §6.5 (Table 3).
  Shafahi et al. 2018, "Poison Frogs!"; Geiping et al. 2021, "Witches' Brew".
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags

from experiments import _targeted_lib as lib
from experiments import common
from jaxshape import results
from jaxshape import sweep

SCENARIO_CLIP, SCENARIO_NOISE = 4.0, 0.01  # §6.5: DP-Adam with C 4, sigma 0.01


@dataclasses.dataclass(frozen=True)
class Config:
  out: str = ""  # default: runs/targeted/<attack>_<mode>_<scenario>
  data_dir: str | None = None
  download: bool = True  # let tensorflow-datasets download missing data
  seeds: int = 1
  progress: bool = True
  attack: str = "poison_frogs"
  mode: str = "oneshot"
  scenario: str = "standard"
  setups: tuple[str, ...] | None = None  # "dataset:model"; None: the paper's for the mode
  models: tuple[str, ...] | None = None  # run only the setups of these models
  fallback: bool = True  # replace a missing CIFAR-10 / Purchase-100 by FashionMNIST
  targets: int = 100
  target_class: int = 4
  base_class: int = 3  # the attacker's class (the bases' class)
  include_vanilla: bool = True
  clip_norms: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0, 0.1)
  noise_multipliers: tuple[float, ...] = (0.001, 0.01, 0.1, 0.4, 0.8, 1.0, 2.0, 4.0)
  noise_clip: float = 4.0
  adaptive_multipliers: tuple[float, ...] = ()
  max_train: int | None = None  # re-train on a fixed random subset of the clean set
  max_test: int | None = None  # measure accuracy on a fixed random subset of the test set
  pretrain_epochs: int = 100
  retrain_epochs: int = 50
  batch_size: int = 100
  learning_rate: float | None = None  # None: 0.08 for LR and MLP, 0.02 for the CNN
  hidden: tuple[int, ...] = (256,)
  attempts: int = 1  # one-shot: best poisons tried, each a separate re-training
  poison_counts: tuple[int, ...] = tuple(range(1, 11))  # multi-poison: k tried in order
  candidates: int = 100
  craft_iters: int = 10_000
  craft_lr: float = 0.01
  beta0: float = 0.25
  max_feature_distance: float = 3.5
  watermark: float = 0.0
  wb_epsilon: float = 8 / 255
  wb_steps: int = 240
  wb_restarts: int = 2
  wb_augment: bool = False  # re-training applies no augmentation
  max_batch: int | None = 16  # re-trainings per compiled call (memory: each copies the data)


QUICK_ATTEMPTS = 3
QUICK_RETRAIN_EPOCHS = 16

PRESETS = {
  "smoke": Config(
    out="runs/targeted_smoke",
    download=False,
    setups=("fashion_mnist:mlp",),
    targets=2,
    clip_norms=(1.0,),
    noise_multipliers=(),
    max_train=300,
    max_test=300,
    pretrain_epochs=2,
    retrain_epochs=2,
    batch_size=50,
    hidden=(16,),
    poison_counts=(1, 2),
    candidates=4,
    craft_iters=20,
    wb_steps=4,
    wb_restarts=1,
    max_batch=None,
  ),
  "quick": Config(
    download=False,
    models=("lr", "mlp"),
    targets=20,
    clip_norms=(4.0, 1.0),
    noise_multipliers=(0.1,),
    max_train=10_000,
    pretrain_epochs=20,
    retrain_epochs=8,
    poison_counts=(1, 2, 4, 8),
    candidates=20,
    craft_iters=1_000,
  ),
  "paper": Config(seeds=1, attempts=100, max_batch=4),
}


# Changes of a preset for one mode, applied before the flags (`preset(name, mode)`).
MODE_PRESETS = {
  # The one-shot quick run (issue 5): the MLP only, the paper's 10,000-iteration crafting
  # limit, several attempts per target (the any-of-N rule) and enough re-training epochs
  # for one poison among 10,000 points to act (see the module docstring).
  ("quick", "oneshot"): {
    "models": ("mlp",),
    "attempts": QUICK_ATTEMPTS,
    "retrain_epochs": QUICK_RETRAIN_EPOCHS,
    "craft_iters": 10_000,
    "candidates": 10,
  },
}


def preset(name: str, mode: str | None = None) -> Config:
  """The preset `name` for `mode` (default: the preset's own mode), e.g. the one-shot
  quick run is `preset("quick", "oneshot")`."""
  config = PRESETS[name]
  mode = mode or config.mode
  return dataclasses.replace(config, mode=mode, **MODE_PRESETS.get((name, mode), {}))


def scenario_defaults(config: Config) -> Config:
  """The §6.5 defense (C 4, sigma 0.01, plus vanilla) for the two transfer scenarios."""
  if config.scenario == "standard":
    return config
  return dataclasses.replace(
    config,
    clip_norms=(),
    noise_clip=SCENARIO_CLIP,
    noise_multipliers=(SCENARIO_NOISE,),
    adaptive_multipliers=(),
  )


def validate(config: Config) -> Config:
  for name, allowed in (("attack", lib.ATTACKS), ("mode", lib.MODES), ("scenario", lib.SCENARIOS)):
    if getattr(config, name) not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
  for name in (
    "targets",
    "seeds",
    "attempts",
    "candidates",
    "pretrain_epochs",
    "retrain_epochs",
    "batch_size",
  ):
    if getattr(config, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
  if not config.poison_counts or min(config.poison_counts) < 1:
    raise ValueError(f"poison_counts must be integers >= 1, got {config.poison_counts}")
  if not lib.defense_grid(config):
    raise ValueError("no defense to evaluate: give include_vanilla or a defense grid")
  if not config.out:
    config = dataclasses.replace(
      config,
      out=os.path.join("runs", "targeted", f"{config.attack}_{config.mode}_{config.scenario}"),
    )
  return config


def run_setup(config: Config, setup: lib.Setup, ds, folder: str) -> dict:
  """Pre-trains, crafts, re-trains and aggregates one setup into `folder`."""
  os.makedirs(folder, exist_ok=True)
  ctx = lib.make_context(config, setup, ds)
  seeds = list(range(config.seeds))
  arms = lib.make_arms(config.scenario, lib.defense_grid(config))
  q = config.attempts if config.mode == "oneshot" else max(config.poison_counts)
  notes = [setup.note] if setup.note else []
  if ctx.x.shape[0] < ctx.n_train_full:
    notes.append(
      f"re-training (and pre-training) on a fixed random subset of {ctx.x.shape[0]} "
      f"of the {ctx.n_train_full} clean training points"
    )
  for note in notes:
    print(f"[{setup.name}] note: {note}")
  seconds = {}
  with common.Timer() as t:
    pre = list(dict.fromkeys(a.pre for a in arms))
    params = lib.pretrain(ctx, config, pre, seeds, os.path.join(folder, "pretrained"))
  seconds["pretrain"] = t.seconds
  with common.Timer() as t:
    crafted = {}
    for d, s in params:
      targets_T = lib.choose_targets(ctx, params[d, s], config.target_class, config.targets)
      crafted[d, s] = lib.craft(
        ctx,
        config,
        params[d, s],
        targets_T,
        q,
        s,
        os.path.join(folder, "poisons", f"{d.slug}_seed{s}.npz"),
      )
  seconds["craft"] = t.seconds
  plan = lib.make_plan(ctx, config, arms, seeds, params, crafted)
  build = lib.build_program(ctx, config, config.base_class)
  to_rows = lib.make_to_rows(plan, config.base_class)
  csv_path = os.path.join(folder, "attempts.csv")
  check_resumable(config, folder, csv_path)
  run_sweep = lambda jobs, desc: sweep.run(
    build,
    jobs,
    csv_path,
    to_rows=to_rows,
    columns=lib.ATTEMPT_COLUMNS,
    max_batch=config.max_batch,
    progress=config.progress,
    desc=desc,
    shared=plan.shared,
  )
  before = len(results.read_csv(csv_path)) if os.path.exists(csv_path) else 0
  with common.Timer() as t:
    controls = lib.control_jobs(plan, ctx, control_runs(config))
    if config.mode == "oneshot":
      rows = run_sweep(controls + lib.oneshot_jobs(plan, ctx), f"{setup.name} one-shot")
    else:
      rows = results.parse(results.read_csv(csv_path))
      for i, k in enumerate(sorted(set(config.poison_counts))):
        done = {
          (
            lib.Defense(r["defense"], float(r["clip_norm"]), float(r["noise_multiplier"])),
            r["seed"],
            r["target_index"],
          )
          for r in rows
          if r["success"] is True and r["n_poisons"] > 0
        }
        # The controls share the first round's compiled programs.
        jobs = (controls if i == 0 else []) + lib.multipoison_jobs(plan, ctx, k, done)
        if jobs:
          rows = run_sweep(jobs, f"{setup.name} {k} poison(s)")
  seconds["retrain"] = t.seconds
  new_rows = len(rows) - before
  targeted, control_rows = lib.aggregate(plan, rows, config.mode)
  summary = lib.summarize(plan, targeted, control_rows)
  results.write_csv(
    os.path.join(folder, "targeted.csv"),
    [{c: r[c] for c in lib.TARGETED_COLUMNS} for r in targeted],
    lib.TARGETED_COLUMNS,
  )
  results.write_csv(os.path.join(folder, "summary.csv"), summary, lib.SUMMARY_COLUMNS)
  title = (
    f"{config.attack} {config.mode} ({config.scenario}): {setup.model.upper()} / {setup.dataset}"
  )
  lib.plot_summary(
    os.path.join(folder, "targeted.png"),
    [(title, summary)],
    multipoison=config.mode == "multipoison",
  )
  accepted = [int(c.count_T.sum()) for c in crafted.values()]
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
      "usable_poisons": accepted,
      "seconds": seconds,
      "new_attempt_rows": new_rows,
    },
  )
  print(f"\n[{setup.name}] {title}")
  print(format_summary(summary, config.mode))
  print(
    f"[{setup.name}] wall time: pre-training {seconds['pretrain']:.0f} s, crafting "
    f"{seconds['craft']:.0f} s, re-training {seconds['retrain']:.0f} s "
    f"({new_rows} new rows in attempts.csv)"
  )
  return {
    "rows": targeted,
    "summary": summary,
    "attempts": rows,
    "controls": control_rows,
    "seconds": seconds,
    "new_rows": new_rows,
    "notes": notes,
  }


def control_runs(config: Config) -> int:
  """Clean re-trainings per (defense, seed): as many as the success rule gives each target
  (one-shot: `attempts`; multi-poison: the poison counts tried), so the control's chance
  flips are counted under the same any-of-N rule as the attack's."""
  return config.attempts if config.mode == "oneshot" else len(set(config.poison_counts))


# Version of what a row of attempts.csv means; 2: poisons displace clean points (full
# batches), per-attempt shuffling, one control per attempt (issue 5).
RETRAIN_VERSION = 2

RUN_FIELDS = (
  *lib.PRETRAIN_FIELDS,
  *lib.CRAFT_FIELDS,
  "mode",
  "scenario",
  "retrain_epochs",
  "max_test",
)


def check_resumable(config: Config, folder: str, csv_path: str) -> None:
  """Refuses to mix re-trainings of different settings in one attempts.csv.

  Seeds, targets, defenses, attempts and poison counts may grow between runs (they only add
  rows); anything else that changes what a row means needs a new output folder.
  """
  path = os.path.join(folder, "run.json")
  signature = {f: getattr(config, f) for f in RUN_FIELDS}
  signature["retrain_version"] = RETRAIN_VERSION
  signature = results.parse([{k: results.format_value(v) for k, v in signature.items()}])[0]
  if os.path.exists(csv_path) and not os.path.exists(path):
    raise ValueError(
      f"{folder} holds re-trainings of unknown settings (no run.json); pass a new --out or "
      "remove the folder"
    )
  if os.path.exists(path) and os.path.exists(csv_path):
    old = results.read_json(path)
    changed = sorted(
      k for k in signature if results.canonical(old.get(k)) != results.canonical(signature[k])
    )
    if changed:
      raise ValueError(
        f"{folder} holds results of other settings ({', '.join(changed)} "
        "differ); pass a new --out or remove the folder"
      )
  results.write_json(path, signature)


def format_summary(summary: list[dict], mode: str) -> str:
  table = []
  for s in summary:
    row = {
      "defense": s["label"],
      "success": f"{s['successes']}/{s['n']} = {s['success_rate']:.2f} "
      f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]",
      "flip (any RAD)": s["flip_rate"],
      "control": f"{s['control_successes']}/{s['control_n']} (any of {s['control_runs']})",
      "mean RAD": s["mean_rad"],
      "margin shift": s["margin_shift"],
      "control margin": s["control_margin"],
      "clean acc": s["clean_acc"],
      "utility RAD": s["utility_rad"],
    }
    if mode == "multipoison":
      row["poisons needed"] = s["mean_poisons"]
    table.append(row)
  return results.format_table(table, list(table[0].keys()))


def run(config: Config) -> dict:
  """Runs every setup of `config`; returns {setup name: its rows and summary} and timings."""
  config = validate(config)
  out = common.prepare_out(config)
  with common.Timer() as timer:
    setups, datasets = lib.resolve_setups(config)
    by_setup = {}
    for setup in setups:
      folder = os.path.join(out, setup.name)
      by_setup[setup.name] = run_setup(config, setup, datasets[setup.dataset], folder)
  stacked = [
    {"dataset": s.dataset, "model": s.model, **row}
    for s in setups
    for row in by_setup[s.name]["summary"]
  ]
  results.write_csv(
    os.path.join(out, "summary.csv"), stacked, ("dataset", "model", *lib.SUMMARY_COLUMNS)
  )
  print(f"wall time {timer.seconds:.1f} s (pre-training and crafting included); results in {out}")
  return {"setups": by_setup, "seconds": timer.seconds, "out": out}


def _floats(values):
  return tuple(float(v) for v in values) if values is not None else None


def main(argv):
  del argv
  fl = flags.FLAGS
  mode = fl.mode or PRESETS[fl.preset].mode
  config = common.config_from_flags(
    {name: preset(name, mode) for name in PRESETS},
    {
      "attack": fl.attack,
      "mode": fl.mode,
      "scenario": fl.scenario,
      "targets": fl.targets,
      "clip_norms": _floats(fl.clip_norms),
      "noise_multipliers": _floats(fl.noise_multipliers),
      "noise_clip": fl.noise_clip,
      "adaptive_multipliers": _floats(fl.adaptive_multipliers),
      "setups": tuple(fl.setups) if fl.setups else None,
      "max_train": fl.max_train,
      "pretrain_epochs": fl.pretrain_epochs,
      "retrain_epochs": fl.retrain_epochs,
      "attempts": fl.attempts,
      "poison_counts": tuple(int(k) for k in fl.poison_counts or ()),
      "candidates": fl.candidates,
      "craft_iters": fl.craft_iters,
      "max_batch": fl.max_batch,
    },
  )
  defense_flags = ("clip_norms", "noise_multipliers", "noise_clip", "adaptive_multipliers")
  if not any(fl[name].present for name in defense_flags):
    config = scenario_defaults(config)
  run(config)


def define_flags():
  common.define_common_flags()
  flags.DEFINE_enum("attack", None, lib.ATTACKS, "The targeted attack.")
  flags.DEFINE_enum("mode", None, lib.MODES, "One poison, or poisons 1..k until success.")
  flags.DEFINE_enum("scenario", None, lib.SCENARIOS, "Pre-training / re-training defenses (§6.5).")
  flags.DEFINE_integer("targets", None, "Number of targets per model.")
  flags.DEFINE_list("clip_norms", None, "Clip norms of the clipping-only rows (sigma = 0).")
  flags.DEFINE_list("noise_multipliers", None, "Noise multipliers (with C = --noise_clip).")
  flags.DEFINE_float("noise_clip", None, "Clip norm of the noise rows (default 4).")
  flags.DEFINE_list("adaptive_multipliers", None, "§7.2 adaptive-noise multipliers (C = 4).")
  flags.DEFINE_list("setups", None, "dataset:model pairs, e.g. fashion_mnist:mlp,cifar10:cnn.")
  flags.DEFINE_integer("max_train", None, "Train on a fixed random subset of this size.")
  flags.DEFINE_integer("pretrain_epochs", None, "Clean pre-training epochs.")
  flags.DEFINE_integer("retrain_epochs", None, "Re-training epochs with the poisons.")
  flags.DEFINE_integer("attempts", None, "One-shot: best poisons tried per target.")
  flags.DEFINE_list("poison_counts", None, "Multi-poison: numbers of poisons tried, in order.")
  flags.DEFINE_integer("candidates", None, "Candidate bases per target (Poison Frogs).")
  flags.DEFINE_integer("craft_iters", None, "Crafting iterations (Poison Frogs).")
  flags.DEFINE_integer("max_batch", None, "Re-trainings per compiled call (memory).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
