"""Cost of gradient shaping: plain SGD vs DP steps, for jaxshape's models and a user's (and Opacus).

Models (10 classes except LR; float32):
  lr            LR 784->2 on 28x28x1 (the paper's)
  mlp           MLP 784-256-10 (the paper's)
  cnn_28x28x1   the paper's CNN (Table 4) on FashionMNIST-sized inputs
  cnn_32x32x3   the same on CIFAR-sized inputs
  deep_mlp      a user's MLP 784-512-128-64-10 with tanh
  strided_cnn   a user's CNN on 28x28x1: 5x5 stride-2 conv(32) + 3x3 conv(64) +
                2x2 avg-pool + dense(128) + dense(10)
  resnet18      `jaxshape.models.ResNet18` (GroupNorm) on 32x32x3
  transformer   a user's token classifier: Embed(1000, 64) on 32 tokens + one
                pre-LayerNorm block (4-head self-attention, MLP 256) + head
The user models are plain Flax modules written here, as a new user would;
none of them is special-cased by the engine.

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

With `--compare=opacus` (needs the `[compare]` extra: torch and opacus) it
also times the same models in PyTorch: a plain SGD step (`opacus_sgd`),
Opacus with per-sample-gradient hooks (`opacus_hooks`) and Opacus ghost
clipping (`opacus_ghost`).

Timing: methods of one framework are interleaved round by round (so a change
in machine load hits all of them alike); in each round a method takes one
untimed step and then one timed step; the reported time is the median over
`--repeats` rounds after `--warmup` untimed steps (ResNet-18: at most
`SLOW_REPEATS`). PyTorch runs with OMP_WAIT_POLICY=PASSIVE unless set
otherwise: with OpenMP's default spinning its steps measured 2.5-12x slower on
a loaded 2-core machine. Peak memory of a JAX step is the compiled
executable's own estimate (`jit(...).lower(...).compile().memory_analysis()`):
arguments + outputs + temporaries - donated (aliased) bytes, i.e. everything
the step holds at once. The CPU device has no `memory_stats()`, and PyTorch
rows leave it empty.

Commands:
  python -m experiments.bench                         # all models, batch 64 and 256
  python -m experiments.bench --models=mlp --batches=100
  python -m experiments.bench --compare=opacus        # + PyTorch / Opacus
  python -m experiments.bench --quick                 # 3 repeats, for a smoke run
  python -m experiments.bench --out runs/bench        # also write runs/bench/bench.csv

References:
  Li et al. 2022, §4 (ghost clipping); Bu et al. 2023, §3 (book-keeping);
  Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in
  PyTorch", 2021; Hong et al. 2020, Appendix C, Table 4 (the models).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

import jaxshape
from jaxshape import models
from jaxshape import results

PAPER_MODELS = ("lr", "mlp", "cnn_28x28x1", "cnn_32x32x3")
USER_MODELS = ("deep_mlp", "strided_cnn", "resnet18", "transformer")
MODELS = PAPER_MODELS + USER_MODELS
JAX_METHODS = ("sgd", "sgd_fast", "dp_vmap", "dp_fast", "clip_fast", "noise_only")
DEFAULT_METHODS = ("sgd", "dp_vmap", "dp_fast", "clip_fast", "noise_only")
TORCH_METHODS = ("opacus_sgd", "opacus_hooks", "opacus_ghost")
COLUMNS = ("model", "batch", "method", "ms_per_step", "peak_mem_mb")
LEARNING_RATE = 0.1
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.0
SLOW_REPEATS = {"resnet18": 3}  # at most this many timed rounds (seconds per step on 2 cores)
VMAP_MAX_BYTES = 2 << 30  # dp_vmap is skipped when B x params x 4 bytes exceeds this
VOCAB, TOKENS = 1000, 32


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


QUICK = dict(repeats=3, warmup=1)


# ------------------------------------------------------------------ a user's Flax models


class DeepMLP(nn.Module):
  """784-512-128-64-10 with tanh."""

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1)
    for width in (512, 128, 64):
      h = nn.tanh(nn.Dense(width)(h))
    return nn.Dense(10)(h)


class StridedCNN(nn.Module):
  """5x5 stride-2 conv(32) + 3x3 conv(64) + 2x2 avg-pool + dense(128) + dense(10)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(32, (5, 5), strides=2)(x))
    h = nn.relu(nn.Conv(64, (3, 3))(h))
    h = nn.avg_pool(h, (2, 2), (2, 2))
    h = nn.relu(nn.Dense(128)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(h)


class TokenTransformer(nn.Module):
  """Embed + one pre-LayerNorm block (self-attention, MLP) + mean-pool + head."""

  width: int = 64
  heads: int = 4

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, self.width)(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(h))
    h = h + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h))))
    return nn.Dense(10)(nn.LayerNorm()(h).mean(axis=1))


def _spec(name: str) -> tuple[Any, tuple[int, ...]]:
  """(Flax model, input shape of one example) for a bench model name."""
  if name == "lr":
    return models.LR(num_classes=2), (28, 28, 1)
  if name == "mlp":
    return models.MLP(num_classes=10, hidden=(256,)), (784,)
  if name in ("cnn_28x28x1", "cnn_32x32x3"):
    side, channels = (28, 1) if name == "cnn_28x28x1" else (32, 3)
    return models.CNN(num_classes=10), (side, side, channels)
  if name == "deep_mlp":
    return DeepMLP(), (784,)
  if name == "strided_cnn":
    return StridedCNN(), (28, 28, 1)
  if name == "resnet18":
    return models.ResNet18(num_classes=10), (32, 32, 3)
  if name == "transformer":
    return TokenTransformer(), (TOKENS,)
  raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def _num_classes(name: str) -> int:
  return 2 if name == "lr" else 10


def _batch(name: str, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  _, shape = _spec(name)
  rng = np.random.default_rng(seed)
  if name == "transformer":
    x = rng.integers(0, VOCAB, size=(batch_size, *shape)).astype(np.int32)
  else:
    x = rng.normal(size=(batch_size, *shape)).astype(np.float32)
  y = rng.integers(0, _num_classes(name), size=batch_size).astype(np.int32)
  return {"x": x, "y": y}


def _init(name: str, seed: int):
  model, shape = _spec(name)
  dummy = _batch(name, 1, seed)["x"]
  return model, model.init(jax.random.key(seed), dummy)["params"]


# ------------------------------------------------------------------ JAX steps


def _jax_steps(name: str, seed: int) -> tuple[dict[str, Callable], dict[str, Callable], Any]:
  """({method: step(params, opt_state, batch) -> (params, opt_state)}, {method: init}, params)."""
  model, params = _init(name, seed)
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


def _time_interleaved(runners: dict[str, Callable[[], None]], repeats: int, warmup: int):
  """{name: median ms} of `runners` taken round-robin, `repeats` rounds after `warmup` calls.

  In each round every runner is called once untimed and then once timed, so
  a step never pays for the buffers another method just freed (after the
  vmap path's hundreds of MB, the next step otherwise faults in fresh pages).
  """
  for run_once in runners.values():
    for _ in range(warmup):
      run_once()
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run_once in runners.items():
      run_once()
      start = time.perf_counter()
      run_once()
      times[name].append((time.perf_counter() - start) * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}


def bench_jax(name: str, batch_size: int, config: BenchConfig) -> list[dict]:
  """Rows for the JAX methods of one model at one batch size."""
  steps, inits, params = _jax_steps(name, config.seed)
  batch = jax.tree.map(jnp.asarray, _batch(name, batch_size, config.seed))
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
  repeats = min(config.repeats, SLOW_REPEATS.get(name, config.repeats))
  ms = _time_interleaved(runners, repeats, min(config.warmup, repeats))
  return [
    dict(model=name, batch=batch_size, method=m, ms_per_step=ms[m], peak_mem_mb=peaks[m])
    for m in methods
  ]


# ------------------------------------------------------------------ PyTorch / Opacus


def _torch_model(name: str):
  """The bench model `name` in PyTorch (NCHW images, same layer shapes)."""
  import torch  # torch only under --compare=opacus
  import torch.nn as tnn

  if name == "lr":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 2))
  if name == "mlp":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 256), tnn.ReLU(), tnn.Linear(256, 10))
  if name == "deep_mlp":
    layers, width = [tnn.Flatten()], 784
    for out in (512, 128, 64):
      layers += [tnn.Linear(width, out), tnn.Tanh()]
      width = out
    return tnn.Sequential(*layers, tnn.Linear(width, 10))
  if name == "strided_cnn":
    return tnn.Sequential(
      tnn.Conv2d(1, 32, 5, stride=2, padding=2),
      tnn.ReLU(),
      tnn.Conv2d(32, 64, 3, padding=1),
      tnn.ReLU(),
      tnn.AvgPool2d(2),
      tnn.Flatten(),
      tnn.Linear(64 * 7 * 7, 128),
      tnn.ReLU(),
      tnn.Linear(128, 10),
    )
  if name == "resnet18":

    class Block(tnn.Module):
      def __init__(self, cin, cout, stride):
        super().__init__()
        g = min(32, cout)
        self.body = tnn.Sequential(
          tnn.Conv2d(cin, cout, 3, stride, 1, bias=False),
          tnn.GroupNorm(g, cout),
          tnn.ReLU(),
          tnn.Conv2d(cout, cout, 3, 1, 1, bias=False),
          tnn.GroupNorm(g, cout),
        )
        self.skip = tnn.Identity()
        if stride != 1 or cin != cout:
          self.skip = tnn.Sequential(
            tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.GroupNorm(g, cout)
          )

      def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))

    layers, cin = [tnn.Conv2d(3, 64, 3, 1, 1, bias=False), tnn.GroupNorm(32, 64), tnn.ReLU()], 64
    for stage in range(4):
      for block in range(2):
        cout = 64 * 2**stage
        layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
        cin = cout
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(512, 10))
  if name == "transformer":
    from opacus.layers import DPMultiheadAttention

    class Transformer(tnn.Module):
      def __init__(self, width=64, heads=4):
        super().__init__()
        self.embed = tnn.Embedding(VOCAB, width)
        self.norm0, self.norm1, self.norm2 = (tnn.LayerNorm(width) for _ in range(3))
        self.attn = DPMultiheadAttention(width, heads, batch_first=True)
        self.mlp = tnn.Sequential(
          tnn.Linear(width, 4 * width), tnn.GELU(), tnn.Linear(4 * width, width)
        )
        self.head = tnn.Linear(width, 10)

      def forward(self, ids):
        h = self.embed(ids)
        q = self.norm0(h)
        h = h + self.attn(q, q, q, need_weights=False)[0]
        h = h + self.mlp(self.norm1(h))
        return self.head(self.norm2(h).mean(dim=1))

    return Transformer()
  side, channels = (28, 1) if name == "cnn_28x28x1" else (32, 3)
  flat = 32 * ((side - 4) // 2) ** 2
  return tnn.Sequential(
    tnn.Conv2d(channels, 16, 3),
    tnn.ReLU(),
    tnn.Conv2d(16, 32, 3),
    tnn.ReLU(),
    tnn.MaxPool2d(2),
    tnn.Flatten(),
    tnn.Linear(flat, 64),
    tnn.ReLU(),
    tnn.Linear(64, 10),
  )


def bench_torch(name: str, batch_size: int, config: BenchConfig) -> list[dict]:
  """Rows for PyTorch SGD, Opacus hooks and Opacus ghost clipping on one model."""
  # Before torch loads its OpenMP runtime: spinning threads stall when cores are shared.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  from opacus import PrivacyEngine

  torch.manual_seed(config.seed)
  data = _batch(name, batch_size, config.seed)
  x = torch.from_numpy(data["x"])
  if x.ndim == 4:  # NHWC -> NCHW
    x = x.permute(0, 3, 1, 2).contiguous()
  if name == "transformer":
    x = x.long()
  y = torch.from_numpy(data["y"]).long()
  loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x.repeat(4, *([1] * (x.ndim - 1))), y.repeat(4)),
    batch_size=batch_size,
  )
  criterion = torch.nn.CrossEntropyLoss()
  runners = {}

  model = _torch_model(name)
  opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

  def sgd_once():
    opt.zero_grad(set_to_none=True)
    criterion(model(x), y).backward()
    opt.step()

  runners["opacus_sgd"] = sgd_once
  for mode in ("hooks", "ghost"):
    model_m = _torch_model(name)
    opt_m = torch.optim.SGD(model_m.parameters(), lr=LEARNING_RATE)
    kwargs = dict(
      module=model_m,
      optimizer=opt_m,
      data_loader=loader,
      noise_multiplier=NOISE_MULTIPLIER,
      max_grad_norm=L2_NORM_CLIP,
      poisson_sampling=False,
      grad_sample_mode=mode,
    )
    engine = PrivacyEngine()
    try:
      if mode == "ghost":
        model_m, opt_m, crit_m, _ = engine.make_private(criterion=criterion, **kwargs)
      else:
        model_m, opt_m, _ = engine.make_private(**kwargs)
        crit_m = criterion
    except Exception as error:  # noqa: BLE001 (report and go on: Opacus may not support a layer)
      print(f"opacus_{mode} on {name}: not timed ({type(error).__name__}: {error})")
      continue

    def dp_once(model_m=model_m, opt_m=opt_m, crit_m=crit_m):
      opt_m.zero_grad(set_to_none=True)
      crit_m(model_m(x), y).backward()
      opt_m.step()

    runners[f"opacus_{mode}"] = dp_once
  repeats = min(config.repeats, SLOW_REPEATS.get(name, config.repeats))
  ms = _time_interleaved(runners, repeats, min(config.warmup, repeats))
  return [
    dict(model=name, batch=batch_size, method=m, ms_per_step=ms[m], peak_mem_mb=None)
    for m in TORCH_METHODS
    if m in ms
  ]


# ------------------------------------------------------------------ driver


def summary(rows: Sequence[dict]) -> str:
  """The table of rows, with DP/SGD ratios and jaxshape's speed-up over PyTorch/Opacus."""
  by = {(r["model"], r["batch"], r["method"]): r for r in rows}
  lines = [
    f"{'model':<12} {'batch':>5} {'method':<13} {'ms/step':>9} {'peak MB':>8} "
    f"{'/sgd':>6} {'/sgd+noise':>10} {'dp_fast x':>9}"
  ]
  for r in rows:
    key = (r["model"], r["batch"])
    sgd, noise, fast = (by.get((*key, m)) for m in ("sgd", "noise_only", "dp_fast"))
    floor = sgd["ms_per_step"] + noise["ms_per_step"] if sgd and noise else None
    ms = r["ms_per_step"]
    cells = [
      f"{r['model']:<12} {r['batch']:>5} {r['method']:<13} {ms:>9.2f}",
      f"{r['peak_mem_mb']:>8.1f}" if r["peak_mem_mb"] is not None else f"{'':>8}",
      f"{ms / sgd['ms_per_step']:>6.2f}" if sgd else f"{'':>6}",
      f"{ms / floor:>10.2f}" if floor else f"{'':>10}",
      f"{ms / fast['ms_per_step']:>9.2f}" if fast and r["method"] != "dp_fast" else f"{'':>9}",
    ]
    lines.append(" ".join(cells))
  lines.append(
    "/sgd, /sgd+noise: time relative to that SGD step (plus the noise draw) of the same model; "
    "dp_fast x: how many times slower than jaxshape's fast DP step."
  )
  return "\n".join(lines)


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
  if config.repeats < 1 or config.warmup < 0:
    raise ValueError("repeats must be >= 1 and warmup >= 0")
  rows = []
  for name in config.models:
    for batch_size in config.batch_sizes:
      rows += bench_jax(name, batch_size, config)
      if config.compare == "opacus":
        rows += bench_torch(name, batch_size, config)
      print(
        summary([r for r in rows if r["model"] == name and r["batch"] == batch_size]), flush=True
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
flags.DEFINE_enum("compare", "", ["", "opacus"], "Also time PyTorch SGD and Opacus.")
flags.DEFINE_bool("quick", False, "Few repeats (a smoke run).")
flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"JAX methods to time, among {JAX_METHODS}.")
flags.DEFINE_string("out", None, "Folder for bench.csv.")


def main(argv: Sequence[str]) -> None:
  del argv
  defaults = QUICK if FLAGS.quick else {}
  config = BenchConfig(
    models=tuple(FLAGS.models),
    batch_sizes=tuple(int(b) for b in FLAGS.batches),
    repeats=FLAGS.repeats or defaults.get("repeats", 20),
    warmup=FLAGS.warmup if FLAGS.warmup is not None else defaults.get("warmup", 3),
    compare=FLAGS.compare or None,
    methods=tuple(FLAGS.methods),
    out=FLAGS.out,
  )
  load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, {load}")
  rows = run(config)
  print(summary(rows))
  print("at the end: load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
  app.run(main)
