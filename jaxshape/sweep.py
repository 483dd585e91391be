"""A grid of configurations x seeds as one vmapped, jitted, sharded program per group; resumable.

Shapes: G jobs of a chunk (padded to a multiple of the device count).

A `Job` is one training run: a static `group` (jobs with equal groups share
one compiled program), numeric `values` (traced: learning rate, clip norm,
noise multiplier, ...), a `seed` and a `key`, the fields that identify its
rows in the results CSV. `run` skips the jobs whose rows are already in the
CSV, and for each group compiles `jax.jit(jax.vmap(program))` once, feeds it
chunks of jobs sharded over every device on a 1-D mesh ("grid"), turns each
job's outputs into rows and rewrites the CSV atomically after every chunk.
A run killed at any point and restarted loses no finished chunk and repeats
none; a CSV whose last row was cut mid-row (a copy stopped mid-file) loses
that row with a warning and its job runs again.

  >>> def build(spec):
  ...   def program(values, key):
  ...     hparams = train.HParams.create(values["learning_rate"], values["l2_norm_clip"])
  ...     return train.fit(spec, hparams, key, data).records["test_acc"][-1]
  ...   return program
  >>> jobs = [Job(spec, {"learning_rate": 0.1, "l2_norm_clip": c}, seed,
  ...             {"defense": "dp", "clip_norm": c, "seed": seed})
  ...         for c in (0.1, 1.0) for seed in range(5)]
  >>> rows = run(build, jobs, "out/results.csv",
  ...            to_rows=lambda job, acc: [{**job.key, "test_acc": float(acc)}],
  ...            columns=["defense", "clip_norm", "seed", "test_acc"])

A job's PRNG key is `jax.random.key(seed)` and nothing else, so its result
does not depend on the other jobs of the grid or on how they are chunked.

On a TPU pod, call `initialize(multihost=True)` on every host first: the
mesh then spans all hosts' devices, every host runs the same jobs, and only
process 0 writes the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxshape import results

Program = Callable[..., Any]
Build = Callable[[Hashable], Program]
ToRows = Callable[["Job", Any], list[dict]]

GRID_AXIS = "grid"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep.

  Attributes:
    group: static structure (e.g. a `TrainSpec` and an attack name), hashable;
      jobs with equal groups share one compiled program.
    values: numeric hyperparameters, fed to the program as traced float32
      scalars (e.g. learning_rate, l2_norm_clip, noise_multiplier).
    seed: the job's PRNG key is `jax.random.key(seed)`; a 32-bit integer.
    key: the fields (a subset of the CSV columns) and values that identify the
      job's rows; the job is done when the CSV has a row that matches them.
  """

  group: Hashable
  values: Mapping[str, float]
  seed: int
  key: Mapping[str, Any]


def initialize(multihost: bool, **kwargs) -> None:
  """Joins a multi-host run (`jax.distributed.initialize(**kwargs)`) when `multihost`.

  Call it on every host before any other jax call. With `multihost=False`
  it does nothing; calling it twice is harmless.
  """
  if multihost and not jax.distributed.is_initialized():
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
  """Whether this process writes files (process 0 of a multi-host run)."""
  return jax.process_index() == 0


def run(
  build: Build,
  jobs: Sequence[Job],
  csv_path: str | os.PathLike,
  *,
  to_rows: ToRows,
  columns: Sequence[str],
  max_batch: int | None = None,
  progress: bool = True,
  desc: str = "sweep",
  devices: Sequence[jax.Device] | None = None,
  shared: Any = None,
) -> list[dict]:
  """Runs the jobs not yet in `csv_path`, a chunk of a group at a time, appending their rows.

  Args:
    build: `build(group) -> program`, where `program(values, key)` (or
      `program(values, key, shared)` when `shared` is given) maps a dict of
      float32 scalars and a PRNG key to a pytree of arrays. Called once per
      group that has pending jobs; data it closes over are compiled into the
      program as constants (pass large data as `shared` instead).
    jobs: the grid; `key`s must be distinct and their fields among `columns`.
    csv_path: the results CSV; created if missing, else its header must equal
      `columns`.
    to_rows: `to_rows(job, outputs) -> rows`, with the job's outputs as numpy
      arrays (no grid axis). Each job needs at least one row; a row's missing
      `job.key` fields are filled in, and conflicting ones are an error.
    columns: the CSV header, in order.
    max_batch: most jobs per program call (rounded down to a multiple of the
      device count, at least one per device); a group larger than this is cut
      into equal chunks, each written when done. None: one chunk per group.
    progress: show a tqdm bar over jobs, with ETA and the running chunk.
    desc: the bar's label.
    devices: the devices to shard the grid over; default `jax.devices()` (all
      devices of all hosts).
    shared: a pytree of arrays passed to every program call replicated on all
      devices (e.g. the training set), as a third argument.

  Returns:
    All rows of the CSV after the run (old and new), numbers parsed (see
    `results.parse`).

  Raises:
    ValueError: on a CSV whose header differs from `columns`, duplicate job
      keys, key fields that are not columns, mismatched value names within a
      group, seeds outside int32, bad `max_batch`, or rows that disagree with
      their job.
  """
  columns = list(columns)
  jobs = list(jobs)
  _validate(jobs, columns, max_batch)
  if os.path.isdir(csv_path):
    raise ValueError(f"csv_path {os.fspath(csv_path)} is a folder, expected a CSV file path")
  for j, job in enumerate(jobs):
    bad = {k: v for k, v in job.values.items() if not _is_number(v)}
    if bad:
      raise ValueError(f"jobs[{j}].values must be numbers (inf allowed, not NaN), got {bad}")
  devices = list(jax.devices() if devices is None else devices)
  mesh = Mesh(np.array(devices, dtype=object), (GRID_AXIS,))
  writer = is_main_process()

  rows_text = _read_resumable(csv_path, columns, jobs, writer=writer)
  if writer and results.read_header(csv_path) is None:
    results.write_csv(csv_path, [], columns)
  done_J = _done_mask(jobs, rows_text)
  if jax.process_count() > 1:  # Every host must run the same chunks: follow process 0.
    done_J = np.asarray(multihost_utils.broadcast_one_to_all(done_J))
  pending = [job for job, done in zip(jobs, done_J, strict=True) if not done]
  plan = _plan(pending, len(devices), max_batch)
  shared_args = () if shared is None else (_replicate(shared, mesh),)

  bar = tqdm.tqdm(
    total=len(jobs),
    initial=len(jobs) - len(pending),
    desc=desc,
    unit="job",
    disable=not (progress and writer),
    dynamic_ncols=True,
  )
  with bar:
    for gi, (group, chunks) in enumerate(plan):
      grid_fn = _compile(build(group), mesh, with_shared=shared is not None)
      for ci, chunk in enumerate(chunks):
        bar.set_postfix_str(
          f"group {gi + 1}/{len(plan)} chunk {ci + 1}/{len(chunks)} [{len(chunk.jobs)} jobs]"
        )
        values, seeds_G = _stack(chunk, mesh)
        outputs = grid_fn(values, seeds_G, *shared_args)
        outputs = jax.tree.map(_to_numpy, outputs)
        new_rows = []
        for i, job in enumerate(chunk.jobs):
          job_out = jax.tree.map(lambda a, i=i: a[i], outputs)
          new_rows.extend(_job_rows(job, to_rows(job, job_out), columns))
        rows_text.extend(new_rows)
        if writer:
          results.write_csv(csv_path, rows_text, columns)
        bar.update(len(chunk.jobs))
  return results.parse(rows_text)


# --- Resuming -----------------------------------------------------------------------------------


def _read_resumable(
  csv_path: str | os.PathLike, columns: list[str], jobs: list[Job], *, writer: bool
) -> list[dict]:
  """The CSV's rows, after dropping a last row that was cut mid-row (and repairing the file).

  `run` rewrites the CSV atomically, so a cut row comes from outside (a copy
  or download stopped mid-file, a full disk, an editor): the file then does
  not end with a line break. The cut row is dropped with a warning. Rows are
  appended job by job, so the only job that may be left with part of its rows
  is the job of the last intact row; when the cut row may be one of its rows
  (its key cells agree with that job's as far as they go), all of that job's
  rows are dropped too and the job runs again. Nothing is repeated (no job
  has rows twice) and nothing is lost. The writer process rewrites the file.

  A file cut exactly at a line break cannot be told from a finished one: a
  job that writes several rows may then keep only some of them.
  """
  if not os.path.exists(csv_path):
    return []
  with open(csv_path, "rb") as f:
    contents = f.read()
  if not contents or contents.endswith((b"\n", b"\r")):
    return results.read_csv(csv_path, columns=columns)
  start = contents.rfind(b"\n") + 1
  cut_row = contents[start:].decode("utf-8", errors="replace")
  if start == 0:  # the header itself was cut
    if not ",".join(columns).startswith(cut_row):
      return results.read_csv(csv_path, columns=columns)  # a foreign header: say so
    _warn_cut(csv_path, cut_row, "")
    if writer:
      results.write_csv(csv_path, [], columns)
    return []
  lines = list(csv.reader(io.StringIO(contents[:start].decode("utf-8", errors="replace"))))
  header, intact = lines[0], lines[1:]
  if header != columns or any(len(line) != len(header) for line in intact):
    return results.read_csv(csv_path, columns=columns)  # raises, naming the problem
  rows = [dict(zip(header, line, strict=True)) for line in intact]
  dropped = ""
  suspect = _job_of(rows[-1], jobs) if rows else None
  if suspect is not None and _may_continue(next(csv.reader([cut_row]), []), rows[-1], suspect):
    fields = tuple(suspect.key)
    ident = _identity(suspect.key)
    kept = [row for row in rows if _identity({f: row[f] for f in fields}) != ident]
    dropped = f", and the {len(rows) - len(kept)} earlier rows of its job {dict(suspect.key)}"
    rows = kept
  _warn_cut(csv_path, cut_row, dropped)
  if writer:
    results.write_csv(csv_path, rows, columns)
  return rows


def _warn_cut(csv_path: str | os.PathLike, cut_row: str, dropped: str) -> None:
  warnings.warn(
    f"{os.fspath(csv_path)}: the last row was cut mid-row ({cut_row[:60]!r}); dropped it"
    f"{dropped}; the job runs again",
    stacklevel=3,
  )


def _job_of(row: dict, jobs: list[Job]) -> Job | None:
  """The job whose key matches `row`, if any."""
  for job in jobs:
    if all(f in row for f in job.key) and _identity({f: row[f] for f in job.key}) == _identity(
      job.key
    ):
      return job
  return None


def _may_continue(cells: list[str], last_row: dict, job: Job) -> bool:
  """Whether a cut row with `cells` (the last one partial) may belong to `job` (`last_row`'s)."""
  columns = list(last_row)
  for field in job.key:
    i = columns.index(field)
    if i < len(cells) - 1 and cells[i] != last_row[field]:
      return False
    if i == len(cells) - 1 and not last_row[field].startswith(cells[i]):
      return False
  return True


# --- Planning -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Chunk:
  jobs: list[Job]  # the real jobs
  size: int  # padded size: the same for every chunk of a group (one compilation)


def _validate(jobs: list[Job], columns: list[str], max_batch: int | None) -> None:
  if max_batch is not None and (
    isinstance(max_batch, bool) or not isinstance(max_batch, int | np.integer) or max_batch < 1
  ):
    raise ValueError(f"max_batch must be None or an integer >= 1, got {max_batch!r}")
  known = set(columns)
  if len(known) != len(columns):
    raise ValueError(f"columns must be unique, got {columns}")
  names_by_group: dict[Hashable, tuple[str, ...]] = {}
  seen: dict[tuple, int] = {}
  for j, job in enumerate(jobs):
    if not isinstance(job, Job):
      raise ValueError(f"jobs[{j}] is a {type(job).__name__}, not a sweep.Job")
    if not job.key:
      raise ValueError(f"jobs[{j}] has an empty key; it must name the fields of its rows")
    unknown = [f for f in job.key if f not in known]
    if unknown:
      raise ValueError(f"jobs[{j}].key has fields {unknown} that are not among columns {columns}")
    if isinstance(job.seed, bool) or not isinstance(job.seed, int | np.integer):
      raise ValueError(f"jobs[{j}].seed must be an int, got {job.seed!r}")
    if not _INT32_MIN <= int(job.seed) <= _INT32_MAX:
      raise ValueError(f"jobs[{j}].seed must fit in int32, got {job.seed}")
    names = tuple(sorted(job.values))
    expected = names_by_group.setdefault(job.group, names)
    if names != expected:
      raise ValueError(
        f"jobs[{j}].values has names {list(names)}, but another job of group "
        f"{job.group!r} has {list(expected)}; jobs of a group must share value names"
      )
    ident = _identity(job.key)
    if ident in seen:
      raise ValueError(f"jobs[{seen[ident]}] and jobs[{j}] have the same key {dict(job.key)}")
    seen[ident] = j


def _is_number(value: Any) -> bool:
  if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
    return False
  return not np.isnan(value)


def _identity(key: Mapping[str, Any]) -> tuple:
  return tuple(sorted((f, results.canonical(v)) for f, v in key.items()))


def _done_mask(jobs: list[Job], rows_text: list[dict]) -> np.ndarray:
  """`[J]` bool: whether each job already has a row in `rows_text`."""
  on_disk: dict[tuple[str, ...], set[tuple]] = {}
  done_J = np.zeros([len(jobs)], bool)
  for j, job in enumerate(jobs):
    fields = tuple(sorted(job.key))
    if fields not in on_disk:
      on_disk[fields] = {_identity({f: row[f] for f in fields}) for row in rows_text}
    done_J[j] = _identity(job.key) in on_disk[fields]
  return done_J


def _plan(pending: list[Job], num_devices: int, max_batch: int | None) -> list[tuple]:
  """Groups in order of first appearance, each cut into equal chunks padded for the devices."""
  by_group: dict[Hashable, list[Job]] = {}
  for job in pending:
    by_group.setdefault(job.group, []).append(job)
  plan = []
  for group, group_jobs in by_group.items():
    n = len(group_jobs)
    limit = n if max_batch is None else max(num_devices, max_batch // num_devices * num_devices)
    num_chunks = -(-n // limit)
    per_chunk = -(-n // num_chunks)
    size = -(-per_chunk // num_devices) * num_devices
    chunks = [
      _Chunk(group_jobs[start : start + per_chunk], size) for start in range(0, n, per_chunk)
    ]
    plan.append((group, chunks))
  return plan


# --- Execution ----------------------------------------------------------------------------------


def _compile(program: Program, mesh: Mesh, *, with_shared: bool):
  """`jit(vmap(program))` over (values, seeds) with outputs sharded on the grid axis."""

  def one(values, seed, *shared):
    return program(values, jax.random.key(seed), *shared)

  in_axes = (0, 0, None) if with_shared else (0, 0)
  return jax.jit(jax.vmap(one, in_axes=in_axes), out_shardings=NamedSharding(mesh, P(GRID_AXIS)))


def _stack(chunk: _Chunk, mesh: Mesh) -> tuple[dict[str, jax.Array], jax.Array]:
  """The chunk's values (`[G]` float32 each) and seeds (`[G]` int32), padded and sharded."""
  padded = chunk.jobs + [chunk.jobs[0]] * (chunk.size - len(chunk.jobs))
  sharding = NamedSharding(mesh, P(GRID_AXIS))
  values = {
    name: _place(np.asarray([float(job.values[name]) for job in padded], np.float32), sharding)
    for name in chunk.jobs[0].values
  }
  seeds_G = _place(np.asarray([int(job.seed) for job in padded], np.int32), sharding)
  return values, seeds_G


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full (multi-host safe)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _replicate(tree: Any, mesh: Mesh) -> Any:
  replicated = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated)
  return jax.tree.map(lambda x: _place(np.asarray(x), replicated), tree)


def _to_numpy(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _job_rows(job: Job, rows: Any, columns: list[str]) -> list[dict[str, str]]:
  """`to_rows`' rows for `job`, checked against its key and formatted as CSV text."""
  if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
    raise ValueError(
      f"to_rows must return a non-empty list of dicts for job {dict(job.key)}, got {rows!r}; "
      "without a row a rerun cannot tell the job is done"
    )
  known = set(columns)
  out = []
  for row in rows:
    extra = [k for k in row if k not in known]
    if extra:
      raise ValueError(f"to_rows gave keys {extra} that are not among columns {columns}")
    row = dict(row)
    for field, value in job.key.items():
      if field not in row:
        row[field] = value
      elif results.canonical(row[field]) != results.canonical(value):
        raise ValueError(
          f"to_rows gave {field}={row[field]!r} for a job whose key has {field}={value!r}"
        )
    out.append({c: results.format_value(row.get(c)) for c in columns})
  return out
