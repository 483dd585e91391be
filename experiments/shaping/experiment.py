"""`run(config)`: both parts, then results.csv, summary.csv, best.csv, detect.csv and the plots."""

from __future__ import annotations

import os

from experiments import common
from experiments.shaping import indiscriminate
from experiments.shaping import multipoison
from experiments.shaping import report
from experiments.shaping.config import AUC_COLUMNS
from experiments.shaping.config import RESULT_COLUMNS
from experiments.shaping.config import Config
from experiments.shaping.config import validate
from jaxshape import report as report_lib
from jaxshape import results

DETECT_COLUMNS = (
  "attack",
  "poison_ratio",
  "n_poisons",
  "seed",
  "target_index",
  *AUC_COLUMNS,
  "precision_at_k",
)


# What a row of the run CSVs means; the grids (mechanism points, attacks, ratios, seeds,
# targets, poison counts) may grow between runs of one --out, these may not.
RUN_FIELDS = (
  "noise_clip",
  "centered_decay",
  "cosine_clip",
  "quantile_initial_clip",
  "filter_score",
  "dataset",
  "epochs",
  "batch_size",
  "learning_rate",
  "max_train",
  "steinhardt_iterations",
  "detect_epochs",
  "mp_attack",
  "mp_max_train",
  "mp_max_test",
  "mp_pretrain_epochs",
  "mp_retrain_epochs",
  "mp_batch_size",
  "mp_learning_rate",
  "mp_candidates",
  "mp_craft_iters",
)


def check_resumable(config: Config) -> None:
  """Refuses an --out whose run CSVs came from other settings (`RUN_FIELDS`); records them."""
  path = os.path.join(config.out, "run.json")
  signature = {f: results.canonical(getattr(config, f)) for f in RUN_FIELDS}
  if os.path.exists(path):
    old = results.read_json(path)
    changed = sorted(k for k in signature if old.get(k) != signature[k])
    if changed:
      raise ValueError(
        f"{config.out} holds runs of other settings ({', '.join(changed)} differ); "
        "pass a new --out or remove the folder"
      )
  os.makedirs(config.out, exist_ok=True)
  results.write_json(path, signature)


def run(config: Config) -> dict:
  """Runs the parts of `config`; writes the tables and plots; returns the rows and timings."""
  config = validate(config)
  check_resumable(config)
  out = common.prepare_out(config)
  cache = common.ParamsCache(os.path.join(out, "cache"))
  rows, detect_rows, seconds = [], [], {}
  with common.Timer() as timer:
    if "indiscriminate" in config.parts:
      with common.Timer() as t:
        part = indiscriminate.run_part(config, out, cache)
      seconds["indiscriminate"] = t.seconds
      rows += indiscriminate.result_rows(config, part["runs"], part["detect"])
      detect_rows += part["detect"]
    if "multipoison" in config.parts:
      with common.Timer() as t:
        part = multipoison.run_part(config, out, cache)
      seconds["multipoison"] = t.seconds
      rows += multipoison.result_rows(config, part["runs"], part["detect"], part["n_clean"])
      detect_rows += part["detect"]
  results.write_csv(os.path.join(out, "results.csv"), rows, RESULT_COLUMNS)
  results.write_csv(os.path.join(out, "detect.csv"), detect_rows, DETECT_COLUMNS)
  summary = report.summarize(rows)
  results.write_csv(os.path.join(out, "summary.csv"), summary, report.SUMMARY_COLUMNS)
  best = report.best_points(summary)
  results.write_csv(os.path.join(out, "best.csv"), best, report.BEST_COLUMNS)
  for attack in dict.fromkeys(r["attack"] for r in summary):
    report.plot_pareto(os.path.join(out, f"pareto_{attack}.png"), summary, attack)
  print(report.table(summary))
  print(report.best_table(best))
  seconds["total"] = timer.seconds
  results.write_json(os.path.join(out, "timing.json"), seconds)
  print(f"\nwall time {timer.seconds:.1f} s ({seconds}); {report_lib.files_note(out)}")
  return {
    "rows": rows,
    "summary": summary,
    "best": best,
    "detect": detect_rows,
    "seconds": seconds,
    "out": out,
  }
