"""Cost of gradient shaping: plain SGD vs DP steps, for jaxshape's models and a user's (and Opacus).

The models and batches are `experiments.bench_models`' (the paper's LR, MLP
and CNN on 28x28x1 and 32x32x3; a user's deep MLP, strided CNN, GroupNorm
ResNet-18 and Transformer); the PyTorch / Opacus side is
`experiments.bench_torch`.

For each model and batch size, in one process, it times whole jitted training
steps (gradient + optax update):

  sgd       jax.grad of the mean loss through the Flax model + optax.sgd
  sgd_fast  the same gradient through the engine's passes
            (`jaxshape.fast_grad`) + optax.sgd
  dp_vmap   per_example_grads (vmap of grad) -> dp_sgd (skipped when the
            per-example gradients alone would exceed 2 GB)
  dp_fast   clipped_sum_and_norms (the `jaxshape.per_example` engine) -> dp_sgd
  clip_fast clipped_sum_and_norms -> mean -> optax.sgd: per-example clipping
            without noise (gradient shaping's clipping alone)
  noise_only the DP step's Gaussian noise alone: `add_gaussian_noise` on an
            all-zero gradient sum + optax.sgd, i.e. one N(0, (sigma C)^2) draw
            per parameter (threefry), the floor under any exact DP-SGD step
  centered, cosine, quantile, trimmed, median: a `jaxshape.shaping` mechanism in
            place of the clipping of clip_fast (`experiments.bench_shaping`)

With `--compare=opacus` (needs the `[compare]` extra: torch and opacus) it
also times PyTorch SGD, Opacus hooks and Opacus ghost clipping on the same
shapes.

Timing: methods of one framework are interleaved round by round (so a change
in machine load hits all of them alike); in each round a method takes one
untimed step and then one timed step; the reported time is the median over
`--repeats` rounds after `--warmup` untimed steps, with fewer rounds (at
least 2) where they would exceed `--budget` seconds per model, batch and
framework. Peak memory of a JAX step is the compiled executable's own
estimate (`jit(...).lower(...).compile().memory_analysis()`): arguments +
outputs + temporaries - donated (aliased) bytes, i.e. everything the step
holds at once. The CPU device has no `memory_stats()`, and PyTorch rows
leave it empty.

The output ends with markdown ready to paste (machine, load average, command,
a targets table and every row).

Commands:
  python -m experiments.bench                         # all models, batch 64 and 256
  python -m experiments.bench --models=mlp --batches=100
  python -m experiments.bench --compare=opacus        # + PyTorch / Opacus
  python -m experiments.bench --quick                 # 3 repeats, for a smoke run
  python -m experiments.bench --out runs/bench        # also write runs/bench/bench.csv
  python -m experiments.bench --shaping               # clip_fast vs each shaping mechanism

References:
  Li et al. 2022, §4 (ghost clipping); Bu et al. 2023, §3 (book-keeping);
  Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in
  PyTorch", 2021; Hong et al. 2020, Appendix C, Table 4 (the models).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app
from absl import flags

import jaxshape
from experiments import bench_models
from experiments import bench_shaping
from experiments import bench_torch
from experiments.bench_models import L2_NORM_CLIP
from experiments.bench_models import LEARNING_RATE
from experiments.bench_models import MODELS
from experiments.bench_models import NOISE_MULTIPLIER
from experiments.bench_models import PAPER_MODELS  # noqa: F401 (re-exported)
from experiments.bench_models import USER_MODELS  # noqa: F401 (re-exported)
from jaxshape import models
from jaxshape import results

JAX_METHODS = ("sgd", "sgd_fast", "dp_vmap", "dp_fast", "clip_fast", "noise_only")
JAX_METHODS += tuple(bench_shaping.MECHANISMS)  # shaping steps (`experiments.bench_shaping`)
DEFAULT_METHODS = ("sgd", "dp_vmap", "dp_fast", "clip_fast", "noise_only")
COLUMNS = ("model", "batch", "method", "ms_per_step", "peak_mem_mb")
VMAP_MAX_BYTES = 2 << 30  # dp_vmap is skipped when B x params x 4 bytes exceeds this
# Seconds of timed rounds per model, batch and framework: bounds `make bench`
# (ResNet-18 takes seconds per step on 2 cores) while fast models get `repeats`.
BUDGET_S = 8.0


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What `run` times (the flags of `main`)."""

  models: tuple[str, ...] = MODELS
  batch_sizes: tuple[int, ...] = (64, 256)
  repeats: int = 20
  warmup: int = 3
  compare: str | None = None  # "opacus" to time PyTorch / Opacus too
  methods: tuple[str, ...] = DEFAULT_METHODS
  out: str | None = None
  seed: int = 0
  budget_s: float = BUDGET_S


QUICK = dict(repeats=3, warmup=1)


# ------------------------------------------------------------------ JAX steps


def _jax_steps(name: str, seed: int) -> tuple[dict[str, Callable], dict[str, Callable], Any]:
  """({method: step(params, opt_state, batch) -> (params, opt_state)}, {method: init}, params)."""
  model, params = bench_models.init(name, seed)
  loss_fn = models.ClassifierLoss(model)
  sgd = optax.sgd(LEARNING_RATE)
  dp = jaxshape.dp_sgd(LEARNING_RATE, L2_NORM_CLIP, NOISE_MULTIPLIER, key=jax.random.key(seed + 1))

  def apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def sgd_step(params, opt_state, batch):
    return apply(sgd, jax.grad(loss_fn)(params, batch), opt_state, params)

  def sgd_fast_step(params, opt_state, batch):
    return apply(sgd, jaxshape.fast_grad(loss_fn, params, batch), opt_state, params)

  def dp_vmap_step(params, opt_state, batch):
    grads_B = jaxshape.per_example_grads(loss_fn, params, batch)
    return apply(dp, grads_B, opt_state, params)

  def dp_fast_step(params, opt_state, batch):
    clipped = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, L2_NORM_CLIP, method="fast")
    return apply(dp, clipped, opt_state, params)

  def clip_fast_step(params, opt_state, batch):
    clipped = jaxshape.clipped_sum_and_norms(loss_fn, params, batch, L2_NORM_CLIP, method="fast")
    mean = jax.tree.map(lambda g: g / batch["y"].shape[0], clipped.sum)
    return apply(sgd, mean, opt_state, params)

  steps = {"sgd": sgd_step, "sgd_fast": sgd_fast_step, "dp_vmap": dp_vmap_step}
  noise = optax.chain(
    jaxshape.add_gaussian_noise(NOISE_MULTIPLIER, L2_NORM_CLIP, jax.random.key(seed + 1)),
    optax.sgd(LEARNING_RATE),
  )

  def noise_only_step(params, opt_state, batch):
    zero_sum = jaxshape.ClippedSum(
      jax.tree.map(jnp.zeros_like, params),
      jnp.zeros(batch["y"].shape, jnp.float32),
      jnp.ones(batch["y"].shape, jnp.float32),
      jnp.asarray(L2_NORM_CLIP, jnp.float32),
    )
    return apply(noise, zero_sum, opt_state, params)

  steps.update(dp_fast=dp_fast_step, clip_fast=clip_fast_step, noise_only=noise_only_step)
  inits = {m: (dp.init if m.startswith("dp") else sgd.init) for m in steps}
  inits["noise_only"] = noise.init
  shaping_steps, shaping_inits = bench_shaping.steps(loss_fn, bench_shaping.MECHANISMS)
  steps.update(shaping_steps)
  inits.update(shaping_inits)
  return steps, inits, params


def _peak_mb(compiled) -> float:
  mem = compiled.memory_analysis()
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  return total / 2**20


def bench_jax(name: str, batch_size: int, config: BenchConfig) -> list[dict]:
  """Rows for the JAX methods of one model at one batch size."""
  steps, inits, params = _jax_steps(name, config.seed)
  batch = jax.tree.map(jnp.asarray, bench_models.make_batch(name, batch_size, config.seed))
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  methods = [
    m for m in config.methods if m != "dp_vmap" or 4 * batch_size * num_params <= VMAP_MAX_BYTES
  ]
  runners, peaks = {}, {}
  for method in methods:
    # Copies: donation deletes the buffers, and init may return closed-over arrays.
    state = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, inits[method](params))]
    step = jax.jit(steps[method], donate_argnums=(0, 1)).lower(*state, batch).compile()
    peaks[method] = _peak_mb(step)

    def run_once(step=step, state=state):
      state[0], state[1] = step(state[0], state[1], batch)
      jax.block_until_ready(state[0])

    runners[method] = run_once
  ms = bench_models.time_interleaved(runners, config.repeats, config.warmup, config.budget_s)
  return [
    dict(model=name, batch=batch_size, method=m, ms_per_step=ms[m], peak_mem_mb=peaks[m])
    for m in methods
  ]


# ------------------------------------------------------------------ driver


def _ms(by, key, method):
  row = by.get((*key, method))
  return row["ms_per_step"] if row else None


def _ratio(num, den, fmt="{:.2f}"):
  return fmt.format(num / den) if num is not None and den else ""


def summary(rows: Sequence[dict]) -> str:
  """Every row as a markdown table, with ratios to its SGD step and to jaxshape's DP step."""
  by = {(r["model"], r["batch"], r["method"]): r for r in rows}
  lines = [
    "| model | batch | method | ms/step | peak MB | /sgd | /(sgd+noise) | / dp_fast |",
    "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    key = (r["model"], r["batch"])
    sgd, noise, fast = (_ms(by, key, m) for m in ("sgd", "noise_only", "dp_fast"))
    floor = sgd + noise if sgd is not None and noise is not None else None
    ms = r["ms_per_step"]
    peak = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else ""
    vs_fast = _ratio(ms, fast) if r["method"] != "dp_fast" else ""
    lines.append(
      f"| {r['model']} | {r['batch']} | {r['method']} | {ms:.2f} | {peak} | "
      f"{_ratio(ms, sgd)} | {_ratio(ms, floor)} | {vs_fast} |"
    )
  return "\n".join(lines)


def targets(rows: Sequence[dict]) -> str:
  """One markdown row per model and batch: the issue's targets as measured ratios.

  clip/sgd: clipping alone vs the SGD step; dp/(sgd+noise): the DP step vs
  the SGD step plus the noise draw; peak dp/sgd: peak memory; ghost/dp:
  Opacus ghost clipping's step time over jaxshape's DP step (> 1: jaxshape
  faster).
  """
  by = {(r["model"], r["batch"], r["method"]): r for r in rows}
  keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
  lines = [
    "| model | batch | sgd ms | dp_fast ms | clip/sgd | dp/(sgd+noise) | peak dp/sgd | "
    "opacus_ghost ms | ghost/dp |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for key in keys:
    sgd, fast, clip, noise, ghost = (
      _ms(by, key, m) for m in ("sgd", "dp_fast", "clip_fast", "noise_only", "opacus_ghost")
    )
    floor = sgd + noise if sgd is not None and noise is not None else None
    peaks = [by.get((*key, m), {}).get("peak_mem_mb") for m in ("dp_fast", "sgd")]
    cells = [
      key[0],
      str(key[1]),
      f"{sgd:.2f}" if sgd is not None else "",
      f"{fast:.2f}" if fast is not None else "",
      _ratio(clip, sgd),
      _ratio(fast, floor),
      _ratio(peaks[0], peaks[1]),
      f"{ghost:.2f}" if ghost is not None else "",
      _ratio(ghost, fast),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def machine() -> str:
  """CPU model, cores and library versions, one line."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.devices()[0].platform})"


def _load() -> str:
  return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run(config: BenchConfig) -> list[dict]:
  """Times every model, batch size and method of `config`; writes `bench.csv` to `config.out`."""
  unknown = [m for m in config.models if m not in MODELS]
  if unknown:
    raise ValueError(f"models must be among {MODELS}, got {unknown}")
  unknown = [m for m in config.methods if m not in JAX_METHODS]
  if unknown:
    raise ValueError(f"methods must be among {JAX_METHODS}, got {unknown}")
  if config.compare not in (None, "", "opacus"):
    raise ValueError(f"compare must be '' or 'opacus', got {config.compare!r}")
  if not config.batch_sizes or min(config.batch_sizes) < 1:
    raise ValueError(f"batch_sizes must be >= 1, got {config.batch_sizes}")
  if config.repeats < 1 or config.warmup < 0 or not config.budget_s > 0:
    raise ValueError("repeats must be >= 1, warmup >= 0 and budget_s > 0")
  rows, todo = [], [(m, b) for m in config.models for b in config.batch_sizes]
  for index, (name, batch_size) in enumerate(todo):
    start = time.perf_counter()
    rows += bench_jax(name, batch_size, config)
    if config.compare == "opacus":
      rows += bench_torch.bench_torch(name, batch_size, config, config.budget_s)
    print(
      f"[{index + 1}/{len(todo)}] {name} batch {batch_size}: {time.perf_counter() - start:.0f} s, "
      f"load {_load()}",
      file=sys.stderr,
      flush=True,
    )
  if config.out:
    os.makedirs(config.out, exist_ok=True)
    results.write_csv(os.path.join(config.out, "bench.csv"), rows, COLUMNS)
  return rows


FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to time, among {MODELS}.")
flags.DEFINE_list("batches", ["64", "256"], "Batch sizes of the timed steps.")
flags.DEFINE_integer("repeats", None, "Timed rounds per method (default 20; 3 with --quick).")
flags.DEFINE_integer("warmup", None, "Untimed steps per method first (default 3; 1 with --quick).")
flags.DEFINE_float("budget", BUDGET_S, "Seconds of timed rounds per model, batch and framework.")
flags.DEFINE_enum("compare", "", ["", "opacus"], "Also time PyTorch SGD and Opacus.")
flags.DEFINE_bool("quick", False, "Few repeats (a smoke run).")
flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"JAX methods to time, among {JAX_METHODS}.")
flags.DEFINE_string("out", None, "Folder for bench.csv.")
flags.DEFINE_bool(
  "shaping", False, "Time clip_fast and the shaping mechanisms (experiments.bench_shaping)."
)


def main(argv: Sequence[str]) -> None:
  del argv
  defaults = QUICK if FLAGS.quick else {}
  config = BenchConfig(
    models=tuple(FLAGS.models),
    batch_sizes=tuple(int(b) for b in FLAGS.batches),
    repeats=FLAGS.repeats or defaults.get("repeats", 20),
    warmup=FLAGS.warmup if FLAGS.warmup is not None else defaults.get("warmup", 3),
    compare=FLAGS.compare or None,
    methods=("clip_fast", *bench_shaping.FAST_MECHANISMS)
    if FLAGS.shaping
    else tuple(FLAGS.methods),
    out=FLAGS.out,
    budget_s=FLAGS.budget,
  )
  load_start, start = _load(), time.perf_counter()
  rows = run(config)
  command = " ".join(["python -m experiments.bench", *sys.argv[1:]])
  print(f"\n**Bench** `{command}` on {machine()}; load average {load_start} at the start, ")
  print(f"{_load()} at the end; {time.perf_counter() - start:.0f} s wall.\n")
  shaped = any(r["method"] in bench_shaping.MECHANISMS for r in rows)
  print(bench_shaping.table(rows) if shaped else targets(rows))
  print()
  print(summary(rows))


if __name__ == "__main__":
  app.run(main)
