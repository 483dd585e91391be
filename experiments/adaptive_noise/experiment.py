"""`run(config)`: the multi-poison grid of experiments/targeted/, then the §7.2 answer."""

from __future__ import annotations

import os

from experiments import common
from experiments import targeted
from experiments.adaptive_noise.answer import answer
from experiments.adaptive_noise.answer import table
from experiments.adaptive_noise.config import COLUMNS
from experiments.adaptive_noise.config import RULES
from experiments.adaptive_noise.config import Config
from experiments.adaptive_noise.config import targeted_config
from experiments.adaptive_noise.plot import plot
from jaxshape import results


def run(config: Config) -> dict:
  """Runs the multi-poison grid, writes adaptive.csv / .png / answer.txt; returns rows, answer."""
  if not config.fixed_multipliers or not config.adaptive_multipliers:
    raise ValueError("need at least one fixed and one adaptive noise multiplier")
  common.check_config(config, RULES)
  out = common.prepare_out(config)
  with common.Timer() as timer:
    res = targeted.run(targeted_config(config))
  (setup,) = res["setups"].values()
  rows = table(setup["summary"], setup["controls"], config.seeds)
  results.write_csv(os.path.join(out, "adaptive.csv"), rows, COLUMNS)
  plot(os.path.join(out, "adaptive.png"), rows)
  text = answer(rows, config.level)
  with results.atomic_open(os.path.join(out, "answer.txt")) as f:
    f.write(text + "\n")
  print(
    results.format_table(
      rows,
      [
        "mechanism",
        "noise_multiplier",
        "success_rate",
        "ci_low",
        "ci_high",
        "mean_poisons",
        "utility_rad",
        "control_acc",
      ],
    )
  )
  print(f"\nAnswer (§7.2): {text}")
  print(f"wall time {timer.seconds:.1f} s; results in {out}")
  return {"rows": rows, "answer": text, "seconds": timer.seconds, "targeted": res}
