"""Result rows on disk (CSV, JSON, PNG, all written atomically) and their statistics.

An experiment's results are rows (dicts of column -> scalar) kept in a CSV,
its configuration in a `config.json` beside it, and its figures as PNGs. Every
file is written to a temporary file in the same directory, flushed to disk and
moved over the destination with `os.replace`, so a run killed at any moment
leaves either the old file or the new one, never a torn one.

Cells are written with `format_value` (floats by `repr`, which round-trips
exactly) and read back as strings; `parse` turns numeric strings back into
ints and floats. This module does not import jax.

  >>> write_csv("out/results.csv", rows, columns=["defense", "seed", "acc"])
  >>> table = mean_std(parse(read_csv("out/results.csv")), by=["defense"], value="acc")
  >>> print(format_table(table, ["defense", "mean", "std", "n"]))
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import secrets
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import IO
from typing import Any

import numpy as np

PathLike = str | os.PathLike
Row = dict[str, Any]


# --- Atomic files -------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
  """Opens a temporary file beside `path` that replaces `path` when the block ends cleanly.

  The parent directory is created if needed. On success the data are flushed
  and fsync-ed, then `os.replace` moves the file into place (atomic on POSIX);
  on an exception the temporary file is removed and `path` is untouched.

  Args:
    path: the destination.
    mode: "w" (text) or "wb" (bytes).
    **kwargs: passed to `open` (e.g. `newline=""` for csv).

  Example:
    >>> with atomic_open("out/notes.txt") as f:
    ...   f.write("done\\n")
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # O_EXCL with a random name instead of mkstemp, so the umask sets the permissions.
  tmp_path = os.path.join(
    directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
  )
  fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with open(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
    raise
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Makes a rename durable (best effort: not every platform can open a directory)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


# --- Cells --------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
  """The CSV text of one cell: floats by `repr` (exact round trip), ints and strings as is.

  None is the empty string; numpy scalars and 0-d arrays are formatted like
  the Python scalars they hold; bools are "True"/"False".
  """
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if value is None:
    return ""
  if isinstance(value, bool | np.bool_):
    return str(bool(value))
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, float | np.floating):
    return repr(float(value))
  return str(value)


def parse_value(text: Any) -> Any:
  """Inverse of `format_value`: int, float, bool or None where the text is one, else the text."""
  if not isinstance(text, str):
    return text
  if text == "":
    return None
  if text in ("True", "False"):
    return text == "True"
  try:
    return int(text)
  except ValueError:
    pass
  try:
    return float(text)
  except ValueError:
    return text


def parse(rows: Sequence[Mapping[str, Any]]) -> list[Row]:
  """Rows of strings (as `read_csv` gives them) with numeric cells parsed (see `parse_value`)."""
  return [{k: parse_value(v) for k, v in row.items()} for row in rows]


def canonical(value: Any) -> str:
  """A string under which equal values compare equal whether they came from Python or a CSV.

  Numbers are normalised through float (so 1, 1.0, "1" and "1.0" agree);
  anything else is its `format_value` text. Used to match a job's identity
  against rows already on disk.
  """
  text = format_value(value)
  if text in ("True", "False"):
    return text
  try:
    return repr(float(text))
  except ValueError:
    return text


# --- CSV and JSON -------------------------------------------------------------------------------


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
  """Writes `rows` under the header `columns`, atomically.

  Args:
    path: destination CSV.
    rows: dicts whose keys are a subset of `columns` (missing cells are empty).
    columns: the header, in order.

  Raises:
    ValueError: if `columns` has duplicates or a row has a key not in `columns`.
  """
  columns = _check_columns(columns)
  known = set(columns)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for i, row in enumerate(rows):
    extra = [k for k in row if k not in known]
    if extra:
      raise ValueError(f"row {i} has keys {extra} that are not among the columns {columns}")
    writer.writerow([format_value(row.get(c)) for c in columns])
  with atomic_open(path, "w", newline="") as f:
    f.write(buffer.getvalue())


def read_header(path: PathLike) -> list[str] | None:
  """The header of the CSV at `path`, or None if the file is missing or empty."""
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    return next(csv.reader(f), None)


def read_csv(path: PathLike, *, columns: Sequence[str] | None = None) -> list[Row]:
  """The rows of the CSV at `path` as dicts of strings (see `parse` for numbers).

  A missing or empty file has no rows.

  Args:
    path: the CSV.
    columns: if given, the header the file must have.

  Raises:
    ValueError: if the header differs from `columns`, or a row has a
      different number of cells than the header (a corrupt file).
  """
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      return []
    if columns is not None and list(header) != list(columns):
      raise ValueError(
        f"{os.fspath(path)} has columns {header}, expected {list(columns)}; "
        "write to a new path (or move the old file away) instead of mixing schemas"
      )
    rows = []
    for line in reader:
      if len(line) != len(header):
        raise ValueError(
          f"{os.fspath(path)}, line {reader.line_num}: {len(line)} cells for "
          f"{len(header)} columns; the file is corrupt"
        )
      rows.append(dict(zip(header, line, strict=True)))
  return rows


def write_json(path: PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically.

  Numpy scalars and arrays, tuples, sets, paths and dataclasses are converted
  to JSON types; anything else unknown is written as its `str`.
  """
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
  with atomic_open(path, "w") as f:
    f.write(text + "\n")


def read_json(path: PathLike) -> Any:
  """The JSON object stored at `path`."""
  with open(path) as f:
    return json.load(f)


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, set | frozenset):
    return sorted(obj, key=str)
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.asdict(obj)
  return str(obj)


def _check_columns(columns: Sequence[str]) -> list[str]:
  columns = list(columns)
  if not columns:
    raise ValueError("columns must not be empty")
  duplicates = sorted({c for c in columns if columns.count(c) > 1})
  if duplicates:
    raise ValueError(f"columns must be unique, got duplicates {duplicates}")
  return columns


# --- Statistics ---------------------------------------------------------------------------------


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


# --- Text and figures ---------------------------------------------------------------------------


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


def line_plot(
  path: PathLike,
  series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
  xlabel: str,
  ylabel: str,
  title: str,
  logx: bool = False,
  *,
  logy: bool = False,
  ylim: tuple[float, float] | None = None,
  dpi: int = 150,
) -> None:
  """Writes a line plot with error bars to `path` (PNG, atomically; Agg, no pyplot state).

  Args:
    path: destination image (the format is PNG whatever the suffix).
    series: label -> (x, y_mean, y_std); y_std may be None for no error bars.
    xlabel, ylabel, title: axis labels and title.
    logx: logarithmic x axis (e.g. noise multipliers, poison ratios).
    logy: logarithmic y axis.
    ylim: fixed y range, e.g. (0, 1) for accuracies.
    dpi: resolution.

  Example:
    >>> line_plot("out/acc.png", {"dp": ([0.1, 1.0], [0.9, 0.7], [0.01, 0.02])},
    ...           "noise multiplier", "test accuracy", "DP-SGD", logx=True)
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not series:
    raise ValueError("series must not be empty")
  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  n = len(series)
  for i, (label, (x, y_mean, y_std)) in enumerate(series.items()):
    x_N = np.asarray(x, np.float64)
    y_N = np.asarray(y_mean, np.float64)
    if x_N.shape != y_N.shape or x_N.ndim != 1:
      raise ValueError(f"series {label!r}: x {x_N.shape} and y_mean {y_N.shape} must be equal 1-D")
    yerr_N = None
    if y_std is not None:
      yerr_N = np.asarray(y_std, np.float64)
      if yerr_N.shape != y_N.shape:
        raise ValueError(f"series {label!r}: y_std {yerr_N.shape} must match y {y_N.shape}")
    ax.errorbar(x_N, y_N, yerr=yerr_N, label=str(label), markersize=4, capsize=3, **style(i, n))
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(frameon=False)
  save_figure(fig, path, dpi=dpi)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def style(i: int, n: int) -> dict[str, Any]:
  """Color, marker and line style of series `i` of `n`, all distinct up to 20 series.

  Up to 10 series: matplotlib's tab10 colors with round markers. More: tab20
  colors with a marker and a line style that also change, so no two series of
  a crowded plot (e.g. the 14 defenses of §6.2) share a look.
  """
  if n <= 10:
    return {"color": f"C{i % 10}", "marker": "o", "linestyle": "-"}
  from matplotlib import colormaps

  return {
    "color": colormaps["tab20"](i % 20),
    "marker": _MARKERS[i % len(_MARKERS)],
    "linestyle": ("-", "--")[i // 10 % 2],
  }


def save_figure(fig: Any, path: PathLike, *, dpi: int = 150) -> None:
  """Saves a matplotlib `Figure` to `path` as PNG, atomically."""
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def panel_plot(
  path: PathLike,
  panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float], Any]]]],
  xlabel: str,
  ylabel: str,
  *,
  logx: bool = False,
  ylim: tuple[float, float] | None = None,
  dpi: int = 130,
) -> None:
  """Side-by-side line plots sharing axes labels, one per (title, series) panel.

  Each series is label -> (x, y_mean, y_std) as in `line_plot`; y_std may be
  None. Written atomically as PNG.

  Example:
    >>> panel_plot("out/rad.png", [("label_flip", {"vanilla": (x, m, s)}),
    ...                            ("steinhardt", {"vanilla": (x, m2, s2)})],
    ...            "poisons (%)", "RAD")
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not panels:
    raise ValueError("panels must not be empty")
  fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, series) in zip(axes, panels, strict=True):
    for i, (label, (x, y_mean, y_std)) in enumerate(series.items()):
      x_N = np.asarray(x, np.float64)
      y_N = np.asarray(y_mean, np.float64)
      yerr = None if y_std is None else np.asarray(y_std, np.float64)
      ax.errorbar(
        x_N, y_N, yerr=yerr, label=str(label), markersize=3, capsize=2, **style(i, len(series))
      )
    if logx:
      ax.set_xscale("log")
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
  save_figure(fig, path, dpi=dpi)
