"""Tests jaxshape/sweep.py: vmap vs a loop, sharded vs unsharded, resume, schema, batch independence.

The sharded test runs `sharded_main` in a subprocess with four forced host
devices (XLA flags must be set before jax initialises):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    python -c "from tests import test_sweep; test_sweep.sharded_main('/tmp/out')"
"""

import collections
import csv
import functools
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import models
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

N, D = 64, 3
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)
SEEDS = (0, 1)
COLUMNS = ["lr", "seed", "loss"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _regression_data():
  key_x, key_w, key_e = jax.random.split(jax.random.key(42), 3)
  x_ND = jax.random.normal(key_x, (N, D))
  w_D = jax.random.normal(key_w, (D,))
  y_N = x_ND @ w_D + 0.1 * jax.random.normal(key_e, (N,))
  return x_ND, y_N


def build_linreg(group, with_shared=False):
  """A few noisy clipped gradient steps of least squares; `group = ("linreg", steps)`.

  The data are closed over, or with `with_shared` passed as `(x_ND, y_N)`.
  """
  _, steps = group
  closed = None if with_shared else _regression_data()

  def program(values, key, data=None):
    x_ND, y_N = closed if data is None else data

    def loss_fn(w_D):
      return jnp.mean(jnp.square(x_ND @ w_D - y_N))

    def step(w_D, t):
      grad_D = jax.grad(loss_fn)(w_D)
      scale = jnp.minimum(1.0, values["l2_norm_clip"] / (jnp.linalg.norm(grad_D) + 1e-12))
      noise_D = jax.random.normal(jax.random.fold_in(key, t), (D,))
      grad_D = grad_D * scale + values["noise_multiplier"] * values["l2_norm_clip"] * noise_D
      w_D = w_D - values["learning_rate"] * grad_D
      return w_D, loss_fn(w_D)

    w0_D = 0.1 * jax.random.normal(key, (D,))
    w_D, loss_T = jax.lax.scan(step, w0_D, jnp.arange(steps))
    return {"w": w_D, "loss_T": loss_T, "loss": loss_T[-1]}

  return program


def _classification_data():
  key_x, key_y = jax.random.split(jax.random.key(7))
  x_N4 = jax.random.normal(key_x, (N, 4))
  y_N = ((x_N4[:, 0] + 0.5 * jax.random.normal(key_y, (N,))) > 0).astype(jnp.int32)
  return {"x": x_N4, "y": y_N}


def build_fit(group):
  """`train.fit` of a two-class LR with DP-SGD; `group` is the `TrainSpec`."""
  data = _classification_data()

  def program(values, key):
    hparams = train.HParams.create(
      values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
    )
    result = train.fit(group, hparams, key, data)
    return {"params": result.params, "loss": result.records["train_loss"][-1]}

  return program


FIT_SPEC = train.TrainSpec(
  models.ClassifierLoss(models.LR(2)), optimizer="sgd", defense="dp", batch_size=16, epochs=2
)
BUILDS = {"linreg": (build_linreg, ("linreg", 4)), "fit": (build_fit, FIT_SPEC)}


def _jobs(group, lrs=LEARNING_RATES, seeds=SEEDS):
  return [
    sweep.Job(
      group,
      {"learning_rate": lr, "l2_norm_clip": 1.0, "noise_multiplier": 0.5},
      seed,
      {"lr": lr, "seed": seed},
    )
    for lr in lrs
    for seed in seeds
  ]


class Recorder:
  """A `to_rows` that keeps each job's outputs and counts its calls."""

  def __init__(self, fail_at=None):
    self.outputs = {}
    self.calls = collections.Counter()
    self.fail_at = fail_at

  def __call__(self, job, out):
    ident = (job.key["lr"], job.key["seed"])
    if self.fail_at is not None and sum(self.calls.values()) == self.fail_at:
      raise RuntimeError("simulated kill")
    self.calls[ident] += 1
    self.outputs[ident] = out
    return [{"loss": float(out["loss"])}]


def _loop(program, jobs):
  """The reference: the same program, jitted, once per job."""
  program_jit = jax.jit(program)
  out = {}
  for job in jobs:
    values = {k: jnp.float32(v) for k, v in job.values.items()}
    out[(job.key["lr"], job.key["seed"])] = jax.device_get(
      program_jit(values, jax.random.key(job.seed))
    )
  return out


def _csv_rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


@pytest.mark.parametrize("name, max_batch", [("linreg", None), ("linreg", 4), ("fit", 4)], ids=str)
def test_sweep_matches_loop(tmp_path, name, max_batch):
  build, group = BUILDS[name]
  jobs = _jobs(group)
  recorder = Recorder()
  rows = sweep.run(
    build,
    jobs,
    tmp_path / "r.csv",
    to_rows=recorder,
    columns=COLUMNS,
    max_batch=max_batch,
    progress=False,
  )
  want = _loop(build(group), jobs)
  assert set(recorder.outputs) == set(want)
  for ident, out in want.items():
    chex.assert_trees_all_close(recorder.outputs[ident], out, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_shapes(recorder.outputs[ident], out)
  assert [(r["lr"], r["seed"]) for r in rows] == [(j.key["lr"], j.key["seed"]) for j in jobs]
  assert rows == results.parse(results.read_csv(tmp_path / "r.csv"))


def test_compiles_once_per_group_in_order(tmp_path):
  built, traced = [], collections.Counter()

  def build(group):
    built.append(group)
    program = build_linreg(group)

    def counted(values, key):
      traced[group] += 1
      return program(values, key)

    return counted

  groups = [("linreg", 3), ("linreg", 2)]
  jobs = [
    sweep.Job(g, job.values, job.seed, {**job.key, "steps": g[1]})
    for job in _jobs(None)
    for g in groups
  ]
  rows = sweep.run(
    build,
    jobs,
    tmp_path / "r.csv",
    to_rows=lambda job, out: [{"loss": float(out["loss"])}],
    columns=["steps", *COLUMNS],
    max_batch=3,  # 10 jobs per group: chunks of 3, 3, 3 and 1 padded to 3
    progress=False,
  )
  assert built == groups
  assert traced == {g: 1 for g in groups}
  assert len(rows) == len(jobs)


def test_resume_after_kill_loses_and_repeats_nothing(tmp_path):
  path = tmp_path / "r.csv"
  jobs = _jobs(("linreg", 4))
  run = functools.partial(
    sweep.run, build_linreg, jobs, path, columns=COLUMNS, max_batch=4, progress=False
  )

  killed = Recorder(fail_at=5)  # dies in the second chunk (jobs 4..7)
  with pytest.raises(RuntimeError, match="simulated kill"):
    run(to_rows=killed)
  first_chunk = {(j.key["lr"], j.key["seed"]) for j in jobs[:4]}
  assert set(killed.calls) == first_chunk | {(jobs[4].key["lr"], jobs[4].key["seed"])}
  assert len(_csv_rows(path)) == 1 + 4  # header + the finished chunk
  assert sorted(os.listdir(tmp_path)) == ["r.csv"]  # no temp files left behind

  resumed = Recorder()
  rows = run(to_rows=resumed)
  assert not first_chunk & set(resumed.calls), "a finished chunk was recomputed"
  assert set(resumed.calls) | first_chunk == {(j.key["lr"], j.key["seed"]) for j in jobs}
  assert all(n == 1 for n in resumed.calls.values())
  idents = [(r["lr"], r["seed"]) for r in rows]
  assert len(idents) == len(set(idents)) == len(jobs)

  clean = Recorder()
  clean_rows = sweep.run(
    build_linreg, jobs, tmp_path / "clean.csv", to_rows=clean, columns=COLUMNS, progress=False
  )
  key_fn = lambda r: (r["lr"], r["seed"])
  assert sorted(rows, key=key_fn) == sorted(clean_rows, key=key_fn)

  before = path.read_bytes()
  again = Recorder()
  built = []
  rows_again = sweep.run(
    lambda g: built.append(g),
    jobs,
    path,
    to_rows=again,
    columns=COLUMNS,
    progress=False,
  )
  assert not built and not again.calls
  assert rows_again == rows
  assert path.read_bytes() == before


STEP_COLUMNS = ["lr", "seed", "step", "loss"]


def _step_rows(job, out):
  """Several rows per job (one per step), as the experiments write one per epoch."""
  return [{"step": t, "loss": float(loss)} for t, loss in enumerate(out["loss_T"])]


def _cut_offsets(contents: bytes) -> dict[str, int]:
  """Byte offsets to cut a results file at: inside the header, inside cells, at a job's end."""
  ends = [i + 1 for i, b in enumerate(contents) if b == ord("\n")]  # after each line break
  steps = 4  # rows per job: line k (1-based after the header) ends at ends[k]
  rng = np.random.default_rng(0)
  return {
    "header": ends[0] // 2,
    "first row": ends[0] + 3,
    "last cell of a job's last row": ends[steps] - 2,
    "key cell of a new job's first row": ends[steps] + 1,
    "middle of a job": ends[steps + 2] - 5,
    "last cell of the file": len(contents) - 2,
    "random": int(rng.integers(ends[0] + 1, len(contents) - 1)),
    "at a job's end (no cut row)": ends[2 * steps],
  }


def test_resume_after_a_cut_last_row_repeats_and_loses_nothing(tmp_path):
  jobs = _jobs(("linreg", 4), lrs=(0.01, 0.1, 1.0))
  full_path = tmp_path / "full.csv"
  run = functools.partial(sweep.run, build_linreg, jobs, columns=STEP_COLUMNS, progress=False)
  full_rows = run(full_path, to_rows=_step_rows)
  contents = full_path.read_bytes()
  ident = lambda r: (r["lr"], r["seed"], r["step"])
  for where, offset in _cut_offsets(contents).items():
    path = tmp_path / "cut.csv"
    path.write_bytes(contents[:offset])
    cut_line = contents[contents.rfind(b"\n", 0, offset) + 1 : offset]
    intact = full_rows[: max(0, contents[:offset].count(b"\n") - 1)]
    finished = {
      (r["lr"], r["seed"])
      for r in intact
      if sum((q["lr"], q["seed"]) == (r["lr"], r["seed"]) for q in intact) == 4
    }
    calls = collections.Counter()

    def to_rows(job, out, calls=calls):
      calls[(job.key["lr"], job.key["seed"])] += 1
      return _step_rows(job, out)

    if where.startswith("at a job's end"):
      rows = run(path, to_rows=to_rows)
    else:
      with pytest.warns(UserWarning, match="the last row was cut mid-row") as record:
        rows = run(path, to_rows=to_rows)
      assert repr(cut_line.decode()[:20])[1:-1] in str(record[0].message), where
    assert sorted(map(ident, rows)) == sorted(map(ident, full_rows)), where  # none twice
    # None lost, and the same values (a job alone in a chunk may differ in the last bits).
    on_disk = sorted(results.parse(results.read_csv(path)), key=ident)
    for got in (sorted(rows, key=ident), on_disk):
      np.testing.assert_allclose(
        [r["loss"] for r in got], [r["loss"] for r in sorted(full_rows, key=ident)], rtol=1e-5
      )
      assert list(map(ident, got)) == sorted(map(ident, full_rows)), where
    assert all(n == 1 for n in calls.values()), where
    # Every unfinished job ran; of the finished ones, at most the one the cut row may continue.
    assert set(calls) >= {(j.key["lr"], j.key["seed"]) for j in jobs} - finished, where
    assert len(set(calls) & finished) <= (0 if where.startswith("at a job's end") else 1), where


def test_done_matches_keys_written_by_csv(tmp_path):
  """Keys given as ints or floats match the text the CSV holds (1 == 1.0 == "1.0")."""
  path = tmp_path / "r.csv"
  results.write_csv(path, [{"lr": "1.0", "seed": "0", "loss": "0.5"}], COLUMNS)
  jobs = [
    sweep.Job(
      ("linreg", 2),
      {"learning_rate": 1, "l2_norm_clip": 1, "noise_multiplier": 0},
      0,
      {"lr": 1, "seed": 0.0},
    ),
    sweep.Job(
      ("linreg", 2),
      {"learning_rate": 0.1, "l2_norm_clip": 1, "noise_multiplier": 0},
      0,
      {"lr": 0.1, "seed": 0},
    ),
  ]
  recorder = Recorder()
  rows = sweep.run(build_linreg, jobs, path, to_rows=recorder, columns=COLUMNS, progress=False)
  assert list(recorder.calls) == [(0.1, 0)]
  assert [(r["lr"], r["seed"]) for r in rows] == [(1.0, 0), (0.1, 0)]


def test_result_independent_of_batch_composition(tmp_path):
  group = ("linreg", 4)
  full = Recorder()
  sweep.run(
    build_linreg, _jobs(group), tmp_path / "a.csv", to_rows=full, columns=COLUMNS, progress=False
  )
  # Other neighbours, another order, other chunk sizes, and a job alone in its chunk.
  other_jobs = _jobs(group, lrs=(0.3, 0.05, 0.01), seeds=(1, 0, 5))
  other = Recorder()
  sweep.run(
    build_linreg,
    other_jobs,
    tmp_path / "b.csv",
    to_rows=other,
    columns=COLUMNS,
    max_batch=2,
    progress=False,
  )
  common = set(full.outputs) & set(other.outputs)
  assert len(common) == 4
  for ident in common:
    chex.assert_trees_all_close(full.outputs[ident], other.outputs[ident], rtol=1e-6, atol=1e-7)
  seed0, seed1 = other.outputs[(0.3, 0)], other.outputs[(0.3, 1)]
  assert not np.allclose(seed0["w"], seed1["w"]), "seeds must give different runs"


def test_header_mismatch_raises(tmp_path):
  path = tmp_path / "r.csv"
  results.write_csv(path, [{"lr": 0.1, "seed": 0, "acc": 0.5}], ["lr", "seed", "acc"])
  with pytest.raises(ValueError, match="columns"):
    sweep.run(
      build_linreg, _jobs(("linreg", 2)), path, to_rows=Recorder(), columns=COLUMNS, progress=False
    )
  assert _csv_rows(path)[0] == ["lr", "seed", "acc"]


def _bad_rows(job, out):
  return [{"lr": 123.0, "loss": 0.0}]


@pytest.mark.parametrize(
  "change, to_rows, match",
  [
    (lambda jobs: jobs + jobs[:1], Recorder(), "same key"),
    (
      lambda jobs: [sweep.Job(j.group, j.values, j.seed, {**j.key, "x": 1}) for j in jobs],
      Recorder(),
      "not among columns",
    ),
    (lambda jobs: [sweep.Job(j.group, j.values, 2**40, j.key) for j in jobs], Recorder(), "int32"),
    (
      lambda jobs: jobs + [sweep.Job(jobs[0].group, {"learning_rate": 1.0}, 0, {"lr": 9})],
      Recorder(),
      "value names",
    ),
    (lambda jobs: jobs, lambda job, out: [], "non-empty"),
    (lambda jobs: jobs, _bad_rows, "key has lr"),
    (
      lambda jobs: [
        sweep.Job(j.group, {**j.values, "learning_rate": "0.1"}, 0, j.key) for j in jobs
      ],
      Recorder(),
      "values must be numbers",
    ),
    (
      lambda jobs: [
        sweep.Job(j.group, {**j.values, "l2_norm_clip": math.nan}, 0, j.key) for j in jobs
      ],
      Recorder(),
      "not NaN",
    ),
  ],
  ids=[
    "duplicate-key",
    "unknown-field",
    "seed-range",
    "value-names",
    "no-rows",
    "key-conflict",
    "value-string",
    "value-nan",
  ],
)
def test_invalid_input_raises(tmp_path, change, to_rows, match):
  jobs = change(_jobs(("linreg", 2)))
  with pytest.raises(ValueError, match=match):
    sweep.run(
      build_linreg, jobs, tmp_path / "r.csv", to_rows=to_rows, columns=COLUMNS, progress=False
    )


@pytest.mark.parametrize("max_batch", [0, 2.5, True, "4"])
def test_invalid_max_batch_raises(tmp_path, max_batch):
  with pytest.raises(ValueError, match="max_batch"):
    sweep.run(
      build_linreg,
      _jobs(("linreg", 2)),
      tmp_path / "r.csv",
      to_rows=Recorder(),
      columns=COLUMNS,
      max_batch=max_batch,
      progress=False,
    )


def test_csv_path_that_is_a_folder_raises(tmp_path):
  with pytest.raises(ValueError, match="csv_path .* is a folder"):
    sweep.run(build_linreg, _jobs(("linreg", 2)), tmp_path, to_rows=Recorder(), columns=COLUMNS)


def test_shared_data_matches_closure(tmp_path):
  group = ("linreg", 3)
  jobs = _jobs(group, lrs=(0.1, 1.0), seeds=(3,))
  closure, shared = Recorder(), Recorder()
  sweep.run(
    build_linreg, jobs, tmp_path / "a.csv", to_rows=closure, columns=COLUMNS, progress=False
  )
  sweep.run(
    functools.partial(build_linreg, with_shared=True),
    jobs,
    tmp_path / "b.csv",
    to_rows=shared,
    columns=COLUMNS,
    progress=False,
    shared=_regression_data(),
  )
  assert set(closure.outputs) == set(shared.outputs)
  for ident in closure.outputs:
    chex.assert_trees_all_close(closure.outputs[ident], shared.outputs[ident], rtol=1e-6)


def test_progress_bar_shows_jobs_and_chunk(tmp_path, capsys):
  sweep.run(
    build_linreg,
    _jobs(("linreg", 2)),
    tmp_path / "r.csv",
    to_rows=Recorder(),
    columns=COLUMNS,
    max_batch=5,
    desc="grid",
  )
  err = capsys.readouterr().err
  assert "grid" in err and "10/10" in err and "chunk 2/2" in err


def test_initialize_single_host_is_a_no_op():
  sweep.initialize(multihost=False)
  assert not jax.distributed.is_initialized()
  assert sweep.is_main_process()


def test_sharded_matches_unsharded(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  code = f"from tests import test_sweep; test_sweep.sharded_main({str(tmp_path)!r})"
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["device_count"] == 4
  assert report["sharded_devices"] == [4]
  assert report["unsharded_devices"] == [1]


def sharded_main(out_dir):
  """Runs the test grid on four devices and on one and checks they agree (subprocess)."""
  jax.config.update("jax_numpy_rank_promotion", "raise")
  assert jax.device_count() == 4, jax.devices()
  seen = collections.defaultdict(set)
  to_numpy = sweep._to_numpy

  def spy(tag):
    def fn(x):
      seen[tag].add(len(x.sharding.device_set))
      return to_numpy(x)

    return fn

  cases = {
    "closure": (build_linreg, None),
    "shared": (functools.partial(build_linreg, with_shared=True), _regression_data()),
  }
  outputs = {}
  for tag, devices in [("sharded", None), ("unsharded", jax.devices()[:1])]:
    sweep._to_numpy = spy(tag)
    for name, (build, shared) in cases.items():
      recorder = Recorder()
      sweep.run(
        build,
        _jobs(("linreg", 4)),
        os.path.join(out_dir, f"{tag}-{name}.csv"),
        to_rows=recorder,
        columns=COLUMNS,
        progress=False,
        devices=devices,
        shared=shared,
      )
      outputs[(tag, name)] = recorder.outputs
  sweep._to_numpy = to_numpy
  for name in cases:
    a, b = outputs[("sharded", name)], outputs[("unsharded", name)]
    assert set(a) == set(b) and len(a) == 10
    for ident in a:
      chex.assert_trees_all_close(a[ident], b[ident], rtol=1e-5, atol=1e-6)
  report = {
    "device_count": jax.device_count(),
    "sharded_devices": sorted(seen["sharded"]),
    "unsharded_devices": sorted(seen["unsharded"]),
  }
  results.write_json(os.path.join(out_dir, "report.json"), report)
