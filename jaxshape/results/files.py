"""Result files written atomically: CSV rows, JSON, any file through `atomic_open`.

An experiment's results are rows (dicts of column -> scalar) kept in a CSV,
its configuration in a `config.json` beside it, and its figures as PNGs
(`jaxshape.results.plots`, through `atomic_open`). Every file is written to a
temporary file in the same directory, flushed to disk and moved over the
destination with `os.replace`, so a run killed at any moment leaves either
the old file or the new one, never a torn one.

Cells are written with `format_value` (floats by `repr`, which round-trips
exactly) and read back as strings; `parse` turns numeric strings back into
ints and floats. This module does not import jax.

  >>> write_csv("out/results.csv", rows, columns=["defense", "seed", "acc"])
  >>> rows = parse(read_csv("out/results.csv"))
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
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
