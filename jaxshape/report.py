"""Tables a person can read at the end of a run: configurations x a swept value, mean ± std.

`pivot_table` turns result rows (one per configuration x value x seed) into a
plain-text table with one line per configuration (e.g. a defense), one
column per value of a swept field (e.g. the poison ratio), each cell the mean
± standard deviation over seeds, and side columns for per-configuration
numbers (clean accuracy, epsilon). `files_note` says where a run's CSVs and
plots are. Used by `make demo` (experiments.indiscriminate).

Example:
  >>> rows = [{"defense": "vanilla", "ratio": 0.1, "seed": s, "rad": 0.2 + 0.01 * s}
  ...         for s in range(3)]
  >>> print(pivot_table(rows, row_by=["defense"], column_by="ratio", value="rad"))
  defense      ratio 0.1
  -------  -------------
  vanilla  0.210 ± 0.010
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from jaxshape import results

__all__ = [
  "files_note",
  "mean_pm_std",
  "pivot_table",
]


def mean_pm_std(values: Sequence[float], *, digits: int = 3) -> str:
  """ "mean ± std" of the finite-or-inf values (ddof=1; one value: just it; none: "-")."""
  values = [float(v) for v in values if v is not None and v != "" and not math.isnan(float(v))]
  if not values:
    return "-"
  mean = sum(values) / len(values)
  if len(values) == 1 or not math.isfinite(mean):
    return _number(mean, digits)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  text = _number(mean, digits)
  if "e" in text or "." not in text:
    return f"{text} ± {_number(std, digits)}"
  return f"{text} ± {std:.{len(text.split('.')[1])}f}"  # the mean's decimals


def pivot_table(
  rows: Sequence[Mapping[str, Any]],
  *,
  row_by: Sequence[str],
  column_by: str,
  value: str,
  row_label: Callable[[Mapping[str, Any]], str] | None = None,
  column_label: Callable[[Any], str] | None = None,
  side_columns: Mapping[str, str] | None = None,
  span_columns: Mapping[str, str] | None = None,
  row_header: str | None = None,
  digits: int = 3,
) -> str:
  """A plain-text table: a line per configuration, a column per value of `column_by`.

  Args:
    rows: result rows (numbers or numeric strings), one per configuration x
      column value x seed.
    row_by: the fields that identify a configuration (a line), in the order
      lines first appear.
    column_by: the swept field whose values become columns (sorted).
    value: the field summarised in each cell as mean ± std over the rows of
      that configuration and column value (the seeds).
    row_label: a configuration's label from its first row; default: the
      `row_by` values joined by spaces.
    column_label: a column header from a `column_by` value; default:
      "<column_by> <value>".
    side_columns: {header: field} summarised per configuration as mean ± std
      over its rows at the first (smallest) `column_by` value, i.e. one per
      seed (e.g. {"clean acc": "clean_acc"}).
    span_columns: {header: field} per configuration over all its rows: the
      value, or "min–max" where it varies (e.g. {"epsilon": "epsilon"}, which
      depends on the poison ratio through the training set size).
    row_header: the header of the label column; default: `row_by` joined by "/".
    digits: significant digits of every mean (a std gets the mean's decimals).

  Returns:
    The table as text (no trailing newline).
  """
  row_by = list(row_by)
  side_columns = dict(side_columns or {})
  span_columns = dict(span_columns or {})
  if row_label is None:
    row_label = lambda row: " ".join(str(row.get(f)) for f in row_by)  # noqa: E731
  if column_label is None:
    column_label = lambda v: f"{column_by} {v:g}" if isinstance(v, float) else f"{column_by} {v}"  # noqa: E731
  lines: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in rows:
    lines.setdefault(tuple(results.canonical(row.get(f)) for f in row_by), []).append(row)
  column_values = sorted({results.parse_value(row.get(column_by)) for row in rows}, key=_sort_key)
  first = "/".join(row_by) if row_header is None else row_header
  header = [first, *(column_label(v) for v in column_values), *side_columns, *span_columns]
  table = []
  for members in lines.values():
    cells = [row_label(members[0])]
    for v in column_values:
      same = [
        r[value]
        for r in members
        if results.canonical(r.get(column_by)) == results.canonical(v) and value in r
      ]
      cells.append(mean_pm_std([results.parse_value(x) for x in same], digits=digits))
    first_value = results.canonical(column_values[0])
    at_first = [r for r in members if results.canonical(r.get(column_by)) == first_value]
    for field in side_columns.values():
      cells.append(
        mean_pm_std([results.parse_value(r.get(field)) for r in at_first], digits=digits)
      )
    for field in span_columns.values():
      cells.append(_span([results.parse_value(r.get(field)) for r in members], digits))
    table.append(cells)
  widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]

  def fmt(cells):
    first = cells[0].ljust(widths[0])
    rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join([first, *rest]).rstrip()

  out = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(cells) for cells in table)]
  return "\n".join(out)


def files_note(out_dir: str | os.PathLike[str]) -> str:
  """Where a run's results are: "results in DIR: a.csv, b.csv; plots: c.png"."""
  out_dir = os.fspath(out_dir)
  names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
  csvs = [n for n in names if n.endswith(".csv")]
  pngs = [n for n in names if n.endswith(".png")]
  others = [n for n in names if n.endswith(".json")]
  parts = [f"tables: {', '.join(csvs) or 'none'}", f"plots: {', '.join(pngs) or 'none'}"]
  if others:
    parts.append(f"config: {', '.join(others)}")
  return f"results in {out_dir}/ ({'; '.join(parts)})"


def _span(values: Sequence[Any], digits: int) -> str:
  """The value of a per-configuration field, or "min–max" where it varies."""
  numbers = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
  if not numbers:
    return "-"
  lo, hi = min(numbers), max(numbers)
  if math.isclose(lo, hi, rel_tol=1e-9, abs_tol=0.0):
    return _number(lo, digits)
  return f"{_number(lo, digits)}–{_number(hi, digits)}"


def _number(value: Any, digits: int) -> str:
  if isinstance(value, str):
    return value
  value = float(value)
  if math.isinf(value):
    return "inf" if value > 0 else "-inf"
  if value == 0:
    return "0"
  if abs(value) >= 10 ** (digits + 2) or abs(value) < 10 ** -(digits + 1):
    return f"{value:.{digits - 1}e}"
  decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
  return f"{value:.{decimals}f}"


def _sort_key(value: Any) -> tuple:
  if isinstance(value, int | float):
    return (0, float(value), "")
  return (1, 0.0, str(value))
