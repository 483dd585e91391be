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


def run(config: Config) -> dict:
  """Runs the parts of `config`; writes the tables and plots; returns the rows and timings."""
  config = validate(config)
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
