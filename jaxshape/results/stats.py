"""Summaries of result rows: mean and std per group, Wilson intervals, plain-text tables.

  >>> table = mean_std(parse(read_csv("out/results.csv")), by=["defense"], value="acc")
  >>> print(format_table(table, ["defense", "mean", "std", "n"]))

This module does not import jax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxshape.results.files import Row
from jaxshape.results.files import canonical
from jaxshape.results.files import format_value
from jaxshape.results.files import parse_value


def mean_std(rows: Sequence[Mapping[str, Any]], by: Sequence[str], value: str) -> list[Row]:
  """Mean, standard deviation and count of `value` per group of equal `by` fields.

  Groups appear in the order of their first row. Cells may be numbers or
  numeric strings; empty cells (None or "") are skipped. The standard
  deviation has ddof=1 when n > 1 and is 0.0 for a single row.

  Args:
    rows: result rows.
    by: the fields that define a group (e.g. ["defense", "clip_norm"]).
    value: the numeric field to summarise.

  Returns:
    One dict per group: the `by` fields, then "mean", "std" and "n".

  Example:
    >>> mean_std([{"d": "dp", "acc": 0.8}, {"d": "dp", "acc": 0.9}], ["d"], "acc")
    [{'d': 'dp', 'mean': 0.85..., 'std': 0.0707..., 'n': 2}]
  """
  groups: dict[tuple, list[float]] = {}
  labels: dict[tuple, dict] = {}
  for row in rows:
    ident = tuple(canonical(row.get(f)) for f in by)
    if ident not in groups:
      groups[ident] = []
      labels[ident] = {f: row.get(f) for f in by}
    cell = row.get(value)
    if cell is None or cell == "":
      continue
    groups[ident].append(float(cell))
  out = []
  for ident, values in groups.items():
    values_N = np.asarray(values, np.float64)
    n = values_N.size
    mean = float(np.mean(values_N)) if n else math.nan
    std = float(np.std(values_N, ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan)
    out.append({**labels[ident], "mean": mean, "std": std, "n": n})
  return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval for a success rate (95% for z = 1.96).

  Args:
    successes: number of successes, 0 <= successes <= n.
    n: number of trials; with n = 0 the interval is (0, 1).
    z: normal quantile of the confidence level.

  Returns:
    `(low, high)` bounds of the interval, within [0, 1].

  References:
    Wilson, "Probable inference, the law of succession, and statistical
    inference", JASA 1927.
  """
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
  if z <= 0:
    raise ValueError(f"z must be > 0, got {z}")
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """An aligned plain-text table of `rows` (numbers right-aligned, floats to 4 digits).

  Example:
    >>> print(format_table([{"defense": "dp", "acc": 0.8123}], ["defense", "acc"]))
    defense     acc
    -------  ------
    dp       0.8123
  """
  columns = list(columns)
  cells = [[_table_cell(row.get(c)) for c in columns] for row in rows]
  numeric = [
    all(_is_number(row.get(c)) for row in rows if row.get(c) not in (None, "")) for c in columns
  ]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

  def line(values):
    parts = [
      v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
    ]
    return "  ".join(parts).rstrip()

  out = [line(columns), line(["-" * w for w in widths])]
  out.extend(line(r) for r in cells)
  return "\n".join(out)


def _is_number(value: Any) -> bool:
  if isinstance(value, bool | np.bool_):
    return False
  if isinstance(value, int | float | np.integer | np.floating):
    return True
  return isinstance(value, str) and isinstance(parse_value(value), int | float)


def _table_cell(value: Any) -> str:
  if isinstance(value, str):
    value = parse_value(value) if _is_number(value) else value
  if isinstance(value, float | np.floating):
    return f"{float(value):.4g}"
  return format_value(value)
