"""Tests jaxshape/sweep.py on a real multi-process run: two processes, `jax.distributed`.

Two processes on this machine join one run through `sweep.initialize(True, ...)`
(a local coordinator on 127.0.0.1, CPU collectives over gloo), each with two
forced host devices, so the grid is sharded over four devices on two hosts as
on a small TPU pod. Checked: the rows equal a single-process run, only process
0 writes files (each process gets its own folder, as hosts of a pod do), and a
run whose process 0 is SIGKILLed mid-sweep resumes, repeating and losing
nothing. Every child has a timeout and is killed when the test ends.

One worker by hand (start two, with PROCESS_ID 0 and 1):

  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python -c \\
    "from tests import test_multihost as t; t.worker('/tmp/mh', 0, 12355, None)"
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxshape import results
from jaxshape import sweep
from tests import test_sweep

REPO = test_sweep.REPO
GROUP = ("linreg", 4)
ROWS_MARK = "ROWS "
CHILD_TIMEOUT = 240  # seconds a two-process run may take on 2 busy cores

pytestmark = pytest.mark.slow


def worker(out_dir: str, process_id: int, port: int, die_at_job: int | None) -> None:
  """One process of the two-process sweep (run in a subprocess).

  Args:
    out_dir: holds one folder per process, `proc0` and `proc1`: this process's CSV path.
    process_id: 0 or 1.
    port: the coordinator's port on 127.0.0.1.
    die_at_job: if set, process 0 SIGKILLs itself when `to_rows` reaches this job
      (counting from 0), after the chunks before it were written.
  """
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_numpy_rank_promotion", "raise")
  sweep.initialize(
    True,
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=120,
  )
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  assert jax.local_device_count() == 2
  calls = []

  def to_rows(job, out):
    if process_id == 0 and die_at_job is not None and len(calls) == die_at_job:
      os.kill(os.getpid(), signal.SIGKILL)
    calls.append([job.key["lr"], job.key["seed"]])
    return [{"loss": float(out["loss"])}]

  rows = sweep.run(
    lambda group: test_sweep.build_linreg(group, with_shared=True),
    test_sweep._jobs(GROUP),
    os.path.join(out_dir, f"proc{process_id}", "r.csv"),
    to_rows=to_rows,
    columns=test_sweep.COLUMNS,
    max_batch=4,
    progress=False,
    shared=test_sweep._regression_data(),
  )
  print(ROWS_MARK + json.dumps({"rows": rows, "calls": calls}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(out_dir, die_at_job=None):
  """Starts both processes, waits (bounded), kills leftovers; returns [(returncode, stdout, stderr)]."""
  port = _free_port()
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
  )
  procs = []
  try:
    for pid in (0, 1):
      code = (
        "from tests import test_multihost as t; "
        f"t.worker({str(out_dir)!r}, {pid}, {port}, {die_at_job!r})"
      )
      procs.append(
        subprocess.Popen(
          [sys.executable, "-c", code],
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          start_new_session=True,
        )
      )
    deadline = time.monotonic() + CHILD_TIMEOUT
    outcomes = []
    for i, proc in enumerate(procs):
      if die_at_job is not None and i == 1:
        # Process 0 died: process 1 waits on it in a collective; stop it.
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
      try:
        out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"process {i} did not finish in {CHILD_TIMEOUT} s:\n{err[-3000:]}")
      outcomes.append((proc.returncode, out, err))
    return outcomes
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _report(stdout: str) -> dict:
  lines = [line for line in stdout.splitlines() if line.startswith(ROWS_MARK)]
  assert len(lines) == 1, stdout[-2000:]
  return json.loads(lines[0][len(ROWS_MARK) :])


def _files(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def single_process_rows(tmp_path_factory):
  """The same sweep in this process (one device): the reference rows."""
  path = tmp_path_factory.mktemp("single") / "r.csv"
  return sweep.run(
    lambda group: test_sweep.build_linreg(group, with_shared=True),
    test_sweep._jobs(GROUP),
    path,
    to_rows=lambda job, out: [{"loss": float(out["loss"])}],
    columns=test_sweep.COLUMNS,
    max_batch=4,
    progress=False,
    shared=test_sweep._regression_data(),
  )


def _assert_same_rows(rows, reference):
  key = lambda r: (r["lr"], r["seed"])
  rows, reference = sorted(rows, key=key), sorted(reference, key=key)
  assert [key(r) for r in rows] == [key(r) for r in reference]  # none lost, none twice
  np.testing.assert_allclose(
    [r["loss"] for r in rows], [r["loss"] for r in reference], rtol=1e-5, atol=1e-7
  )


def test_two_processes_match_one_and_only_process_0_writes(tmp_path, single_process_rows):
  outcomes = _run_pair(tmp_path)
  for pid, (code, _, err) in enumerate(outcomes):
    assert code == 0, f"process {pid} failed:\n{err[-4000:]}"
  reports = [_report(out) for _, out, _ in outcomes]
  for report in reports:  # every process computes every job and returns every row
    _assert_same_rows(report["rows"], single_process_rows)
    assert sorted(map(tuple, report["calls"])) == sorted(
      (r["lr"], r["seed"]) for r in single_process_rows
    )
  assert _files(tmp_path) == ["proc0", "proc0/r.csv"]  # process 1 wrote nothing
  _assert_same_rows(
    results.parse(results.read_csv(tmp_path / "proc0" / "r.csv")), single_process_rows
  )


def test_killed_two_process_run_resumes(tmp_path, single_process_rows):
  die_at_job = 5  # inside the second chunk of four jobs: the first chunk is on disk
  outcomes = _run_pair(tmp_path, die_at_job=die_at_job)
  assert outcomes[0][0] == -signal.SIGKILL, outcomes[0][2][-3000:]
  written = results.parse(results.read_csv(tmp_path / "proc0" / "r.csv"))
  assert len(written) == 4  # the finished chunk, nothing half-written
  assert _files(tmp_path) == ["proc0", "proc0/r.csv"]

  outcomes = _run_pair(tmp_path)
  for pid, (code, _, err) in enumerate(outcomes):
    assert code == 0, f"process {pid} failed on resume:\n{err[-4000:]}"
  done_before = {(r["lr"], r["seed"]) for r in written}
  for _, out, _ in outcomes:
    calls = {tuple(c) for c in _report(out)["calls"]}
    assert not calls & done_before, "a finished job ran again"
    assert len(calls) == len(single_process_rows) - len(done_before)
  final = results.parse(results.read_csv(tmp_path / "proc0" / "r.csv"))
  _assert_same_rows(final, single_process_rows)
  assert _files(tmp_path) == ["proc0", "proc0/r.csv"]
