"""`run(config)`: every selected scenario crafted, (pre-)trained and measured; CSV and PNG."""

from __future__ import annotations

import os
from typing import Any

from experiments import common
from experiments.gradient_analysis import crafting
from experiments.gradient_analysis import pretraining
from experiments.gradient_analysis import report
from experiments.gradient_analysis import training
from experiments.gradient_analysis.config import SCENARIO_SPECS
from experiments.gradient_analysis.config import Config
from experiments.gradient_analysis.config import validate


def run(config: Config) -> dict:
  """Crafts, (pre-)trains and measures every selected scenario; writes CSV and PNG."""
  validate(config)
  out = common.prepare_out(config)
  csv_path = os.path.join(out, "gradients.csv")
  loaded: dict[str, dict[str, Any]] = {}
  pretrained = None
  rows: list[dict] = []
  with common.Timer() as timer:
    for scenario in config.scenarios:
      spec0 = SCENARIO_SPECS[scenario]
      if spec0.dataset not in loaded:
        loaded[spec0.dataset] = crafting.load(config, spec0.dataset)
      d = loaded[spec0.dataset]
      init_S = None
      if spec0.retrain:
        if pretrained is None:
          pretrained = pretraining.pretrain(config, d)
        init_S = pretrained[0]
      rows = training.run_scenario(config, scenario, d, init_S, csv_path)
  rows = report.selected(rows, config)
  report.plot(os.path.join(out, "gradients.png"), rows, config)
  summary = report.summarize(rows)
  print(report.format_summary(summary))
  print(
    f"wall time {timer.seconds:.1f} s (measure={config.measure}); wrote {csv_path} and "
    f"{out}/gradients.png"
  )
  return {
    "rows": rows,
    "summary": summary,
    "seconds": timer.seconds,
    "pretrain_acc": None if pretrained is None else pretrained[1],
  }
