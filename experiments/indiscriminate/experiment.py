"""`run(config)`: craft each attack's poisons, train the grid, write the CSVs and figures."""

from __future__ import annotations

import os

import numpy as np

from experiments import common
from experiments.indiscriminate import crafting
from experiments.indiscriminate import report as report_lib
from experiments.indiscriminate import training
from experiments.indiscriminate.config import EPOCH_COLUMNS
from experiments.indiscriminate.config import RESULT_COLUMNS
from experiments.indiscriminate.config import RULES
from experiments.indiscriminate.config import Config
from experiments.indiscriminate.config import defenses
from jaxshape import report
from jaxshape import results
from jaxshape import sweep


def run(config: Config) -> dict:
  """Crafts, trains the grid, writes epochs.csv, results.csv and plots; returns the rows."""
  common.check_config(config, RULES)
  out = common.prepare_out(config)
  ds, x, y = crafting.load(config)
  epochs_csv = os.path.join(out, "epochs.csv")
  grid = defenses(config)
  crafted = {}
  with common.Timer() as timer:
    for attack in config.attacks:
      with common.Timer() as craft_timer:
        crafted[attack] = crafting.craft(config, attack, x, y, ds.num_classes)
      px_V = crafted[attack][0]
      print(
        f"{attack}: crafted {px_V.shape[0]} poison variant(s) of up to {px_V.shape[1]} "
        f"poisons in {craft_timer.seconds:.1f} s"
      )
    # Every attack's variants in one pool (all have the largest ratio's count of rows), so
    # one compiled program per defense kind serves every attack.
    jobs, offset = [], 0
    for attack in config.attacks:
      px_V, _, index = crafted[attack]
      for (ratio, seed), (variant, count) in sorted(index.items()):
        for defense, clip, sigma, _ in grid:
          values = {
            "variant": offset + variant,
            "n_poisons": count,
            "learning_rate": config.learning_rate,
            "l2_norm_clip": clip,
            "noise_multiplier": sigma,
          }
          key = {
            "attack": attack,
            "poison_ratio": ratio,
            "defense": defense,
            "clip_norm": clip,
            "noise_multiplier": sigma,
            "seed": seed,
          }
          jobs.append(sweep.Job(defense, values, seed, key))
      offset += px_V.shape[0]
    px_V = np.concatenate([crafted[a][0] for a in config.attacks])
    py_V = np.concatenate([crafted[a][1] for a in config.attacks])
    build = training.build_program(config, ds.num_classes, x.shape[0], px_V.shape[1])
    shared = {
      "pool_x": np.concatenate([x, px_V.reshape(-1, *x.shape[1:])]),
      "pool_y": np.concatenate([y, py_V.reshape(-1)]),
      "x_test": np.asarray(ds.x_test),
      "y_test": np.asarray(ds.y_test),
    }

    def to_rows(job, records):
      return [
        {
          **job.key,
          "n_poisons": int(job.values["n_poisons"]),
          "epoch": e + 1,
          **{k: float(records[k][e]) for k in EPOCH_COLUMNS[8:]},
        }
        for e in range(config.epochs)
      ]

    epoch_rows = sweep.run(
      build,
      jobs,
      epochs_csv,
      to_rows=to_rows,
      columns=EPOCH_COLUMNS,
      max_batch=config.max_batch,
      progress=config.progress,
      desc="indiscriminate",
      shared=shared,
    )
  rows = report_lib.summarize(epoch_rows, config, x.shape[0])
  rows = [r for r in rows if r["attack"] in config.attacks]
  results.write_csv(os.path.join(out, "results.csv"), rows, RESULT_COLUMNS)
  report_lib.plot_rad(os.path.join(out, "rad.png"), rows, config.attacks)
  report_lib.plot_train_acc(os.path.join(out, "train_acc.png"), epoch_rows, config)
  pca_rows = report_lib.pca(out, crafted, x, y, config)
  print(report_lib.summary_table(rows, config))
  print(f"wall time {timer.seconds:.1f} s (crafting included); {report.files_note(out)}")
  return {"rows": rows, "epoch_rows": epoch_rows, "pca": pca_rows, "seconds": timer.seconds}
