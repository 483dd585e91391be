"""Setups (dataset x model), their data, pre-training, targets and the class-pair margins.

§6.3: pre-train 100 epochs on the clean set (batch 100; lr 0.08 for LR and MLP,
0.02 for the CNN; Adam for LR, SGD otherwise), then attack test points of one
class that the model classifies correctly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxshape import data
from jaxshape import models
from jaxshape import train

# The paper's setups (§6.3 Fig. 5, §6.4 Fig. 6) and what replaces a missing dataset.
PAPER_SETUPS = {
  "oneshot": ("purchase100:lr", "fashion_mnist:mlp", "cifar10:cnn"),
  "multipoison": ("purchase100:lr", "purchase100:mlp"),
}
FALLBACK = {"purchase100": "fashion_mnist", "cifar10": "fashion_mnist"}  # same model
PRETRAIN_FIELDS = ("max_train", "pretrain_epochs", "batch_size", "learning_rate", "hidden")


@dataclasses.dataclass(frozen=True)
class Setup:
  dataset: str
  model: str
  requested: str  # "dataset:model" as asked for
  note: str = ""  # why it differs from the request, if it does

  @property
  def name(self) -> str:
    return f"{self.dataset}_{self.model}"


def parse_setup(text: str) -> tuple[str, str]:
  parts = text.split(":")
  if len(parts) != 2 or parts[1] not in models.MODELS or parts[0] not in data.DATASETS:
    raise ValueError(
      f"--setups: a setup is 'dataset:model' with a dataset of {data.DATASETS} and a model "
      f"of {tuple(models.MODELS)}, got {text!r}"
    )
  return parts[0], parts[1]


def resolve_setups(config, loader=None) -> tuple[list[Setup], dict[str, data.Dataset]]:
  """The setups to run (missing datasets replaced when `config.fallback`) and their data."""
  loader = loader or functools.partial(common.load_data, config, download=config.download)
  names = config.setups or PAPER_SETUPS[config.mode]
  if config.setups is None and config.models is not None:
    skipped = [n for n in names if parse_setup(n)[1] not in config.models]
    names = [n for n in names if n not in skipped]
    if skipped:
      print(f"note: skipping {', '.join(skipped)} (pass --setups={','.join(skipped)} to run them)")
  if not names:
    raise ValueError("no setup left to run")
  loaded: dict[str, Any] = {}

  def get(name):
    if name not in loaded:
      try:
        loaded[name] = loader(name)
      except FileNotFoundError as e:
        loaded[name] = e
    return loaded[name]

  setups: list[Setup] = []
  for text in names:
    dataset, model = parse_setup(text)
    note = ""
    if isinstance(get(dataset), FileNotFoundError):
      if not config.fallback or dataset not in FALLBACK:
        raise get(dataset)
      new = FALLBACK[dataset]
      note = (
        f"{dataset} is not available here, so {model.upper()} / {dataset} is replaced by "
        f"{model.upper()} / {new} (pass --data_dir with {dataset} for the paper's setup)"
      )
      dataset = new
      if isinstance(get(dataset), FileNotFoundError):
        raise get(dataset)
    if all(s.name != f"{dataset}_{model}" for s in setups):
      setups.append(Setup(dataset, model, text, note))
  return setups, {s.dataset: loaded[s.dataset] for s in setups}


class Context(NamedTuple):
  """A setup's data and model, fixed for the whole run."""

  setup: Setup
  model: Any
  spec_kwargs: dict  # TrainSpec fields except defense / epochs
  learning_rate: float
  x: np.ndarray  # [N, ...] clean training inputs (the fixed subset)
  y: np.ndarray  # [N]
  x_test: np.ndarray  # [N_test, ...] the full test split (targets and bases come from it)
  y_test: np.ndarray
  x_eval: np.ndarray  # the test points accuracy is measured on
  y_eval: np.ndarray
  num_classes: int
  n_train_full: int


def make_context(config, setup: Setup, ds) -> Context:
  x, y = common.subsample(ds.x_train, ds.y_train, config.max_train, 0)
  x_test, y_test = np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test, np.int32)
  x_eval, y_eval = common.subsample(x_test, y_test, config.max_test, 1)
  for name in ("target_class", "base_class"):
    if getattr(config, name) >= ds.num_classes:
      raise ValueError(f"--{name} must be in [0, {ds.num_classes}), got {getattr(config, name)}")
  kwargs = {"hidden": tuple(config.hidden)} if setup.model == "mlp" else {}
  model = models.make_model(setup.model, ds.num_classes, **kwargs)
  spec_kwargs = {
    "loss_fn": models.ClassifierLoss(model),
    # The paper: Adam / DP-Adam for LR, SGD / DP-SGD for MLP and CNN.
    "optimizer": "adam" if setup.model == "lr" else "sgd",
    "batch_size": config.batch_size,
  }
  lr = config.learning_rate or (0.02 if setup.model == "cnn" else 0.08)
  n_full = ds.x_train.shape[0]
  return Context(
    setup, model, spec_kwargs, lr, x, y, x_test, y_test, x_eval, y_eval, ds.num_classes, n_full
  )


def make_spec(ctx: Context, defense_kind: str, epochs: int) -> train.TrainSpec:
  # Vanilla with track_norms goes through the exact per-example fast path (clip C = inf), which
  # on the CPU is far faster than XLA's convolution backward pass for the CNN.
  return train.TrainSpec(
    defense=defense_kind,
    epochs=epochs,
    track_norms=defense_kind == "vanilla" and ctx.setup.model == "cnn",
    **ctx.spec_kwargs,
  )


def hparams(lr: float, d: common.Defense) -> train.HParams:
  return train.HParams.create(lr, d.clip_norm, d.noise_multiplier)


def pretrain(
  ctx: Context,
  config,
  pre_defenses: Sequence[common.Defense],
  seeds: Sequence[int],
  cache: common.ParamsCache,
) -> dict[tuple[common.Defense, int], Any]:
  """One model per (defense, seed) trained from scratch on the clean set, via `cache`.

  Each model is its own program call (not vmapped), so its parameters do not depend on
  which other defenses or seeds the grid holds.
  """
  template = models.init_params(ctx.model, jax.random.key(0), ctx.x.shape[1:])
  train_data = {"x": jnp.asarray(ctx.x), "y": jnp.asarray(ctx.y)}
  fits: dict[str, Any] = {}
  out = {}
  for d in pre_defenses:
    for s in seeds:
      key = {
        "setup": ctx.setup.name,
        **{f: getattr(config, f) for f in PRETRAIN_FIELDS},
        **d.fields(),
        "seed": s,
      }

      def train_fn(d=d, s=s):
        if d.kind not in fits:
          spec = make_spec(ctx, d.kind, config.pretrain_epochs)
          fits[d.kind] = jax.jit(functools.partial(train.fit, spec))
        return fits[d.kind](hparams(ctx.learning_rate, d), jax.random.key(s), train_data).params

      out[d, s] = cache.get(f"{ctx.setup.name}_{d.slug}_seed{s}", key, template, train_fn)
  return out


def accuracy(ctx: Context, params) -> float:
  return float(train.accuracy(ctx.model, params, jnp.asarray(ctx.x_eval), jnp.asarray(ctx.y_eval)))


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(model, params, x_ND):
  return model.apply({"params": params}, x_ND)


def logits(ctx: Context, params, x_N: np.ndarray, chunk: int = 2000) -> np.ndarray:
  """The model's logits on `x_N`, in chunks; one compilation per (model, chunk shape)."""
  return np.concatenate(
    [
      np.asarray(_logits(ctx.model, params, jnp.asarray(x_N[i : i + chunk])))
      for i in range(0, len(x_N), chunk)
    ]
  )


def choose_targets(ctx: Context, params, target_class: int, count: int) -> np.ndarray:
  """Test indices of `count` targets: the target class in a fixed random order, kept where
  `params` classifies them correctly (else the attack would have nothing to do)."""
  candidates = np.flatnonzero(ctx.y_test == target_class)
  candidates = candidates[np.random.default_rng(2).permutation(candidates.size)]
  pred = logits(ctx, params, ctx.x_test[candidates]).argmax(-1)
  chosen = candidates[pred == target_class][:count]
  if chosen.size < count:
    print(f"warning: only {chosen.size} correctly classified targets of class {target_class}")
  return chosen.astype(np.int32)


def margin_table(ctx: Context, params) -> list[dict]:
  """For every ordered class pair (target -> attacker): the margins (logit of the true class
  minus that of the attacker's) of the correctly classified test points of the target
  class; a small margin makes the pair confusable, the attack's easiest case."""
  logits_NC = logits(ctx, params, ctx.x_test)
  pred_N = logits_NC.argmax(-1)
  rows = []
  for t in range(ctx.num_classes):
    ok = (ctx.y_test == t) & (pred_N == t)
    for b in range(ctx.num_classes):
      if b == t or not ok.any():
        continue
      m = logits_NC[ok, t] - logits_NC[ok, b]
      rows.append(
        {
          "target_class": t,
          "base_class": b,
          "n_correct": int(ok.sum()),
          "median_margin": float(np.median(m)),
          "q10_margin": float(np.quantile(m, 0.1)),
          "frac_under_2": float(np.mean(m < 2)),
        }
      )
  return sorted(rows, key=lambda r: r["median_margin"])
