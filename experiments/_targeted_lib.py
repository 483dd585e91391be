"""Machinery of the targeted-poisoning experiments (paper §6.3-§6.5, §7.2).

Used by `experiments/targeted.py` and `experiments/adaptive_noise.py`; not an
experiment by itself. Shapes: T targets, K candidate bases, Q poisons kept per
target (one-shot attempts, or the multi-poison cap), V poison variants (the
poison set of one re-training job), P poisons per variant, M pre-trained
models, E re-training epochs, N clean training examples, F penultimate
features, D input features.

The pipeline of one setup (dataset x model):
  1. pre-train one model per (pre-training defense, seed) on the clean set
     (cached in `pretrained/`);
  2. per model, choose T targets: test points of the target class, in a fixed
     random order, that the model classifies correctly;
  3. per model, craft poisons against it (white box; cached in `poisons/`);
  4. re-train every (arm, seed, target, attempt or poison count) from the
     pre-trained model on clean + poisons as one `jaxshape.sweep` (rows in
     `attempts.csv`, resumable), each poison displacing one clean point so
     the set keeps N examples (`displaced_points`), plus as many clean
     re-trainings per (arm, seed) as the rule gives each target chances
     (attempts, or poison counts) as the no-poison control;
  5. aggregate to one row per target x configuration x seed (`decide_success`).

References:
  Hong et al. 2020, §6.1 (success: target misclassified at any re-training
  epoch with RAD < 0.05), §6.3-§6.5, §7.2. Shafahi et al. 2018 (Poison Frogs);
  Geiping et al. 2021 (Witches' Brew).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxshape import data
from jaxshape import models
from jaxshape import poisons
from jaxshape import results
from jaxshape import sweep
from jaxshape import train

ATTACKS = ("poison_frogs", "witches_brew")
MODES = ("oneshot", "multipoison")
SCENARIOS = ("standard", "vanilla_then_dp", "dp_then_vanilla")
MAX_RAD = 0.05  # §6.1: a targeted attack counts only while RAD < 0.05 (Suciu et al.)

# The paper's setups (§6.3 Fig. 5, §6.4 Fig. 6) and what replaces a missing dataset.
PAPER_SETUPS = {
  "oneshot": ("purchase100:lr", "fashion_mnist:mlp", "cifar10:cnn"),
  "multipoison": ("purchase100:lr", "purchase100:mlp"),
}
_FALLBACK = {"purchase100": "fashion_mnist", "cifar10": "fashion_mnist"}  # same model

ATTEMPT_COLUMNS = (
  "target_index",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "attempt",
  "n_poisons",
  "success",
  "success_epoch",
  "flip_epoch",
  "clean_acc",
  "acc_final",
  "acc_min",
  "rad",
  "margin_final",
  "margin_min",
)
TARGETED_COLUMNS = (
  "target_index",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "success",
  "success_epoch",
  "n_poisons_used",
  "clean_acc",
  "acc_final",
  "rad",
)
SUMMARY_COLUMNS = (
  "label",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "n",
  "successes",
  "success_rate",
  "ci_low",
  "ci_high",
  "mean_poisons",
  "std_poisons",
  "mean_rad",
  "margin_shift",
  "control_margin",
  "flip_rate",
  "control_successes",
  "control_n",
  "control_runs",
  "control_rate",
  "clean_acc",
  "control_acc",
  "utility_rad",
)


# --- Defenses and arms --------------------------------------------------------------------------


class Defense(NamedTuple):
  """One gradient-shaping configuration: kind ("vanilla", "dp", "adaptive"), C, sigma."""

  kind: str
  clip_norm: float
  noise_multiplier: float

  @property
  def label(self) -> str:
    if self.kind == "vanilla":
      return "vanilla"
    if self.kind == "adaptive":
      return f"adaptive C={self.clip_norm:g} s={self.noise_multiplier:g}"
    if self.noise_multiplier == 0:
      return f"clip C={self.clip_norm:g}"
    return f"noise C={self.clip_norm:g} s={self.noise_multiplier:g}"

  @property
  def slug(self) -> str:
    if self.kind == "vanilla":
      return "vanilla"
    return f"{self.kind}_C{self.clip_norm:g}_s{self.noise_multiplier:g}"

  def fields(self) -> dict:
    return {
      "defense": self.kind,
      "clip_norm": self.clip_norm,
      "noise_multiplier": self.noise_multiplier,
    }


VANILLA = Defense("vanilla", math.inf, 0.0)


class Arm(NamedTuple):
  """A pre-training defense and a re-training defense (§6.5's scenarios pair them)."""

  pre: Defense
  re: Defense

  @property
  def key(self) -> Defense:
    """The defense the CSV rows name: the re-training one, or the pre-training one
    when only pre-training is defended (dp_then_vanilla)."""
    return self.pre if self.re == VANILLA else self.re


def defense_grid(config) -> list[Defense]:
  """Vanilla, clipping only (`clip_norms`), clip `noise_clip` + noise, + adaptive noise."""
  grid = [VANILLA] if config.include_vanilla else []
  grid += [Defense("dp", float(c), 0.0) for c in config.clip_norms]
  grid += [Defense("dp", float(config.noise_clip), float(s)) for s in config.noise_multipliers]
  grid += [
    Defense("adaptive", float(config.noise_clip), float(s)) for s in config.adaptive_multipliers
  ]
  return list(dict.fromkeys(grid))


def make_arms(scenario: str, grid: Sequence[Defense]) -> list[Arm]:
  """standard: pre-train and re-train with D (the paper's code: each DP configuration had its
  own DP pre-trained model); vanilla_then_dp: a vanilla model re-trained with D;
  dp_then_vanilla: a model pre-trained with D re-trained without defense."""
  if scenario == "standard":
    return [Arm(d, d) for d in grid]
  if scenario == "vanilla_then_dp":
    return [Arm(VANILLA, d) for d in grid]
  if scenario == "dp_then_vanilla":
    return [Arm(d, VANILLA) for d in grid]
  raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")


# --- The success rule ---------------------------------------------------------------------------


def decide_success(
  pred_E: Sequence[int],
  acc_E: Sequence[float],
  attacker_class: int,
  clean_acc: float,
  max_rad: float = MAX_RAD,
) -> tuple[bool, int | None]:
  """The §6.1 rule: the target is the attacker's class at the end of *any* epoch, RAD < max_rad.

  Args:
    pred_E: the target's predicted class after each re-training epoch.
    acc_E: test accuracy after each epoch.
    attacker_class: the class the attacker wants for the target.
    clean_acc: test accuracy of the clean pre-trained model (RAD's reference).
    max_rad: the RAD bound (0.05; strict).

  Returns:
    `(success, epoch)`: the first epoch (1-based) where both hold, or None.

  Example:
    >>> decide_success([4, 3, 3], [0.85, 0.70, 0.84], 3, 0.85)
    (True, 3)
  """
  pred_E = np.asarray(pred_E)
  acc_E = np.asarray(acc_E, np.float64)
  if pred_E.shape != acc_E.shape or pred_E.ndim != 1:
    raise ValueError(f"pred_E {pred_E.shape} and acc_E {acc_E.shape} must be equal 1-D")
  if not clean_acc > 0:
    raise ValueError(f"clean_acc must be > 0, got {clean_acc}")
  rad_E = (clean_acc - acc_E) / clean_acc
  ok_E = (pred_E == attacker_class) & (rad_E < max_rad)
  if not ok_E.any():
    return False, None
  return True, int(np.argmax(ok_E)) + 1


def first_flip(pred_E: Sequence[int], attacker_class: int) -> int | None:
  """First epoch (1-based) the target is the attacker's class, whatever the accuracy."""
  hit_E = np.asarray(pred_E) == attacker_class
  return int(np.argmax(hit_E)) + 1 if hit_E.any() else None


# --- Setups and data ----------------------------------------------------------------------------


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
      f"a setup is 'dataset:model' with a dataset of {data.DATASETS} and a model "
      f"of {tuple(models.MODELS)}, got {text!r}"
    )
  return parts[0], parts[1]


def resolve_setups(config, loader=None) -> tuple[list[Setup], dict[str, data.Dataset]]:
  """The setups to run (missing datasets replaced when `config.fallback`) and their data."""
  loader = loader or functools.partial(
    data.load, data_dir=config.data_dir, download=config.download
  )
  names = config.setups or PAPER_SETUPS[config.mode]
  if config.setups is None and config.models is not None:
    skipped = [n for n in names if parse_setup(n)[1] not in config.models]
    names = [n for n in names if n not in skipped]
    if skipped:
      print(
        f"note: skipping {', '.join(skipped)} (models {config.models} only; pass "
        f"--setups={','.join(skipped)} to run them)"
      )
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

  setups = []
  for text in names:
    dataset, model = parse_setup(text)
    note = ""
    if isinstance(get(dataset), FileNotFoundError):
      if not config.fallback or dataset not in _FALLBACK:
        raise get(dataset)
      new_dataset = _FALLBACK[dataset]
      note = (
        f"{dataset} is not available here, so {model.upper()} / {dataset} is replaced by "
        f"{model.upper()} / {new_dataset} (pass --data_dir with {dataset} for the "
        f"paper's setup)"
      )
      dataset = new_dataset
      if isinstance(get(dataset), FileNotFoundError):
        raise get(dataset)
    setup = Setup(dataset, model, text, note)
    if setup.name not in {s.name for s in setups}:
      setups.append(setup)
    elif note:
      setups = [
        dataclasses.replace(s, note=s.note + "; " + note) if s.name == setup.name else s
        for s in setups
      ]
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
  n_full = ds.x_train.shape[0]
  x, y = common.subsample(ds.x_train, ds.y_train, config.max_train, 0)
  x_test, y_test = np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test, np.int32)
  x_eval, y_eval = common.subsample(x_test, y_test, config.max_test, 1)
  for name, cls in (("target_class", config.target_class), ("base_class", config.base_class)):
    if not 0 <= cls < ds.num_classes:
      raise ValueError(f"{name} must be in [0, {ds.num_classes}), got {cls}")
  if config.target_class == config.base_class:
    raise ValueError("target_class and base_class must differ")
  kwargs = {"hidden": tuple(config.hidden)} if setup.model == "mlp" else {}
  model = models.make_model(setup.model, ds.num_classes, **kwargs)
  spec_kwargs = {
    "loss_fn": models.ClassifierLoss(model),
    # The paper: Adam / DP-Adam for LR, SGD / DP-SGD for MLP and CNN.
    "optimizer": "adam" if setup.model == "lr" else "sgd",
    "batch_size": config.batch_size,
  }
  lr = config.learning_rate or (0.02 if setup.model == "cnn" else 0.08)
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


def hparams(lr: float, d: Defense) -> train.HParams:
  return train.HParams.create(lr, d.clip_norm, d.noise_multiplier)


# --- Pre-training -------------------------------------------------------------------------------


def _signature(config, fields: Sequence[str], extra: dict | None = None) -> str:
  values = {f: getattr(config, f) for f in fields}
  values.update(extra or {})
  return json.dumps(values, sort_keys=True, default=str)


PRETRAIN_FIELDS = ("max_train", "pretrain_epochs", "batch_size", "learning_rate", "hidden")


def _save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
  with results.atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def _load_arrays(path: str, signature: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  if str(arrays.get("signature")) != signature:
    return None
  return arrays


def pretrain(
  ctx: Context, config, pre_defenses: Sequence[Defense], seeds: Sequence[int], folder: str
) -> dict[tuple[Defense, int], Any]:
  """Parameters of one model per (defense, seed), trained from scratch on the clean set.

  Parameters are cached as `.npz` in `folder` and reused by later runs with the same
  settings.
  """
  os.makedirs(folder, exist_ok=True)
  template = models.init_params(ctx.model, jax.random.key(0), ctx.x.shape[1:])
  leaves, treedef = jax.tree.flatten(template)
  signature = _signature(config, PRETRAIN_FIELDS, {"setup": ctx.setup.name})
  found, pending = {}, []
  for d in pre_defenses:
    for s in seeds:
      arrays = _load_arrays(os.path.join(folder, f"{d.slug}_seed{s}.npz"), signature)
      if arrays is None:
        pending.append((d, s))
      else:
        found[d, s] = jax.tree.unflatten(treedef, [arrays[f"leaf_{i}"] for i in range(len(leaves))])
  train_data = {"x": jnp.asarray(ctx.x), "y": jnp.asarray(ctx.y)}
  fits = {}
  for d, s in pending:
    # One compiled program per kind, run model by model (not vmapped), so a model's
    # parameters do not depend on which other defenses or seeds the grid holds.
    if d.kind not in fits:
      fits[d.kind] = jax.jit(
        functools.partial(train.fit, make_spec(ctx, d.kind, config.pretrain_epochs))
      )
    result = fits[d.kind](hparams(ctx.learning_rate, d), jax.random.key(s), train_data)
    params = jax.tree.map(np.asarray, result.params)
    arrays = {f"leaf_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(params))}
    _save_arrays(
      os.path.join(folder, f"{d.slug}_seed{s}.npz"), {**arrays, "signature": np.asarray(signature)}
    )
    found[d, s] = params
  return found


def accuracy(ctx: Context, params) -> float:
  return float(train.accuracy(ctx.model, params, jnp.asarray(ctx.x_eval), jnp.asarray(ctx.y_eval)))


def choose_targets(ctx: Context, params, target_class: int, count: int) -> np.ndarray:
  """Test indices of `count` targets: the target class in a fixed random order, kept where
  `params` classifies them correctly (else the attack would have nothing to do)."""
  candidates = np.flatnonzero(ctx.y_test == target_class)
  candidates = candidates[np.random.default_rng(2).permutation(candidates.size)]
  pred = np.asarray(train.predictions(ctx.model, params, jnp.asarray(ctx.x_test[candidates])))
  chosen = candidates[pred == target_class][:count]
  if chosen.size < count:
    print(f"warning: only {chosen.size} correctly classified targets of class {target_class}")
  return chosen.astype(np.int32)


# --- Crafting -----------------------------------------------------------------------------------


class Crafted(NamedTuple):
  """Poisons against one pre-trained model for its T targets (Q per target, best first)."""

  target_idx_T: np.ndarray  # [T] int32 test indices of the targets
  x_TQ: np.ndarray  # [T, Q, ...] float32 poisons (zeros where missing)
  base_TQ: np.ndarray  # [T, Q] int32 clean-training index each poison replaces, -1: added
  score_TQ: np.ndarray  # [T, Q] float32 feature distance (frogs) or alignment loss (brew)
  count_T: np.ndarray  # [T] int32 usable poisons per target (<= Q)


CRAFT_FIELDS = (
  "attack",
  "candidates",
  "craft_iters",
  "craft_lr",
  "beta0",
  "max_feature_distance",
  "watermark",
  "wb_epsilon",
  "wb_steps",
  "wb_restarts",
  "wb_augment",
  "base_class",
  "target_class",
)


def craft(
  ctx: Context, config, params, target_idx_T: np.ndarray, q: int, seed: int, path: str
) -> Crafted:
  """Poisons for each target (cached at `path`); Poison Frogs or Witches' Brew."""
  signature = _signature(
    config,
    CRAFT_FIELDS,
    {
      "q": q,
      "seed": seed,
      "mode": config.mode,
      "targets": target_idx_T.tolist(),
      "pretrain": _signature(config, PRETRAIN_FIELDS),
    },
  )
  arrays = _load_arrays(path, signature)
  if arrays is not None:
    return Crafted(*(arrays[f] for f in Crafted._fields))
  if config.attack == "poison_frogs":
    crafted = _craft_frogs(ctx, config, params, target_idx_T, q)
  elif config.attack == "witches_brew":
    crafted = _craft_brew(ctx, config, params, target_idx_T, q, seed)
  else:
    raise ValueError(f"attack must be one of {ATTACKS}, got {config.attack!r}")
  _save_arrays(path, {**crafted._asdict(), "signature": np.asarray(signature)})
  return crafted


def _features(ctx: Context, params, x_N: np.ndarray, chunk: int = 2000) -> np.ndarray:
  fn = jax.jit(lambda p, x: models.features(ctx.model, p, x))
  return np.concatenate(
    [np.asarray(fn(params, jnp.asarray(x_N[i : i + chunk]))) for i in range(0, x_N.shape[0], chunk)]
  )


def _craft_frogs(ctx: Context, config, params, target_idx_T: np.ndarray, q: int) -> Crafted:
  """Feature collision from the K test points of the base class nearest each target
  (penultimate space), all targets' candidates in one vmapped loop; keeps the q accepted
  poisons (feature distance <= bound) nearest the target."""
  pool_N = np.flatnonzero(ctx.y_test == config.base_class)
  k = min(config.candidates, pool_N.size)
  f_pool_NF = _features(ctx, params, ctx.x_test[pool_N])
  x_target_T = ctx.x_test[target_idx_T]
  f_target_TF = _features(ctx, params, x_target_T)
  dist_TN = np.linalg.norm(f_pool_NF[None] - f_target_TF[:, None], axis=-1)
  near_TK = np.argsort(dist_TN, axis=1, kind="stable")[:, :k]
  x_base_TK = ctx.x_test[pool_N[near_TK]]
  if config.watermark > 0:
    x_base_TK = np.clip(
      (1 - config.watermark) * x_base_TK + config.watermark * x_target_T[:, None], 0.0, 1.0
    )
  dim_f = f_pool_NF.shape[-1]
  beta = config.beta0 * (dim_f / float(np.prod(ctx.x.shape[1:]))) ** 2  # Shafahi et al.

  @jax.jit
  def collide_T(x_t, x_b):
    run = lambda xt, xb: poisons.collide(
      ctx.model, params, xt, xb, config.craft_lr, beta, config.craft_iters
    )
    return jax.vmap(run)(x_t, x_b)

  t = target_idx_T.size
  x_TK, dist_TK = np.zeros_like(x_base_TK), np.zeros((t, k), np.float32)
  chunk = max(1, 2000 // k)  # bound the memory of one vmapped loop
  for i in range(0, t, chunk):
    col = collide_T(jnp.asarray(x_target_T[i : i + chunk]), jnp.asarray(x_base_TK[i : i + chunk]))
    x_TK[i : i + chunk] = np.asarray(col.x_K)
    dist_TK[i : i + chunk] = np.asarray(col.distance_K)
  x_TQ = np.zeros((t, q, *ctx.x.shape[1:]), np.float32)
  score_TQ = np.full((t, q), np.nan, np.float32)
  count_T = np.zeros(t, np.int32)
  for i in range(t):
    order = np.argsort(dist_TK[i], kind="stable")
    order = order[dist_TK[i][order] <= config.max_feature_distance][:q]
    count_T[i] = order.size
    x_TQ[i, : order.size] = x_TK[i, order]
    score_TQ[i, : order.size] = dist_TK[i, order]
  return Crafted(target_idx_T, x_TQ, np.full((t, q), -1, np.int32), score_TQ, count_T)


def _craft_brew(
  ctx: Context, config, params, target_idx_T: np.ndarray, q: int, seed: int
) -> Crafted:
  """Gradient matching with bases from the clean training subset (they *replace* their clean
  copies when active). One-shot: q independent single-poison brews per target (attempts);
  multi-poison: one brew of budget q, of which the first k are used."""
  t = target_idx_T.size
  x_TQ = np.zeros((t, q, *ctx.x.shape[1:]), np.float32)
  base_TQ = np.full((t, q), -1, np.int32)
  score_TQ = np.full((t, q), np.nan, np.float32)
  augment = bool(config.wb_augment) and ctx.x.ndim == 4
  key = jax.random.fold_in(jax.random.key(seed), 7)
  for i, target in enumerate(target_idx_T):
    runs = [(a, 1) for a in range(q)] if config.mode == "oneshot" else [(0, q)]
    for a, budget in runs:
      ps = poisons.witches_brew(
        jax.random.fold_in(jax.random.fold_in(key, int(target)), a),
        ctx.model,
        params,
        ctx.x_test[target],
        config.base_class,
        ctx.x,
        ctx.y,
        budget=budget,
        epsilon=config.wb_epsilon,
        steps=config.wb_steps,
        restarts=config.wb_restarts,
        augment=augment,
        target_idx=int(target),
        num_classes=ctx.num_classes,
      )
      loss = float(np.min(np.asarray(ps.info["loss_R"])))
      x_TQ[i, a : a + budget] = np.asarray(ps.x)
      base_TQ[i, a : a + budget] = np.asarray(ps.base_idx)
      score_TQ[i, a : a + budget] = loss
  return Crafted(target_idx_T, x_TQ, base_TQ, score_TQ, np.full(t, q, np.int32))


# --- Re-training --------------------------------------------------------------------------------


def build_program(ctx: Context, config, attacker_class: int):
  """`build(defense_kind)` for `sweep.run`: re-train pre-trained model `values["model"]` on
  clean + the first `n_poisons` poisons of variant `values["variant"]`, recording the test
  accuracy, every target's prediction and its margin (logit of the target class minus logit
  of `attacker_class`; below 0 the attacker's class beats the true one) after each epoch."""

  def build(kind: str):
    spec = make_spec(ctx, kind, config.retrain_epochs)

    def program(values, key, shared):
      m = values["model"].astype(jnp.int32)
      v = values["variant"].astype(jnp.int32)
      params = jax.tree.map(lambda p: p[m], shared["params_M"])
      px_P, base_P = shared["px_V"][v], shared["base_V"][v]
      n, p = shared["x"].shape[0], px_P.shape[0]
      active_P = (jnp.arange(p) < values["n_poisons"]).astype(jnp.float32)
      # Witches' Brew poisons replace their clean copies; each Poison Frogs poison (base -1)
      # takes the place of one fixed random clean point of a third class (`displace_P`), so
      # every re-training set holds exactly N examples (see `displaced_points`).
      drop_P = jnp.where(active_P > 0, jnp.where(base_P >= 0, base_P, shared["displace_P"]), n)
      clean_N = jnp.ones([n], jnp.float32).at[drop_P].set(0.0, mode="drop")
      fit_data = {
        "x": jnp.concatenate([shared["x"], px_P]),
        "y": jnp.concatenate([shared["y"], jnp.full([p], attacker_class, jnp.int32)]),
        "mask": jnp.concatenate([clean_N, active_P]),
      }
      xt_T = shared["xt_MT"][m]

      def eval_fn(params):
        logits_TC = ctx.model.apply({"params": params}, xt_T)
        return {
          "test_acc": train.accuracy(ctx.model, params, shared["x_eval"], shared["y_eval"]),
          "pred_T": jnp.argmax(logits_TC, axis=-1).astype(jnp.int32),
          "margin_T": logits_TC[:, config.target_class] - logits_TC[:, attacker_class],
        }

      hp = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      records = train.fit(spec, hp, key, fit_data, init_params=params, eval_fn=eval_fn).records
      return {k: records[k] for k in ("test_acc", "pred_T", "margin_T")}

    return program

  return build


def displaced_points(y_N: np.ndarray, count: int, avoid: Sequence[int]) -> np.ndarray:
  """The clean training points that poisons 1..count take the place of (int32 `[count]`).

  Added poisons would make the re-training set N + k examples long, and with N a multiple
  of the batch size the last batch of every epoch would hold only the k poisons.
  `train.train_step` averages over the real examples of a batch, so that batch's update is
  the mean gradient of k examples at the full learning rate: 100x an ordinary example's
  weight for one poison at batch 100, and with DP noise 100x the noise (sigma C / 1 instead
  of sigma C / 100). The no-poison control (N examples) has no such batch. That artifact,
  not the attack, cost the Adam-trained LR about 0.2 in RAD (issue 5). So each poison
  instead displaces one clean point, chosen in a fixed random order among classes other
  than `avoid` (the base and target classes, whose removal could help the attack): the
  set keeps N examples and the batches stay full. One point of 10,000 changes nothing
  else measurably.
  """
  y_N = np.asarray(y_N)
  pool = np.flatnonzero(~np.isin(y_N, np.asarray(avoid)))
  if pool.size < count:
    raise ValueError(f"only {pool.size} clean points outside classes {avoid} to displace")
  return pool[np.random.default_rng(3).permutation(pool.size)[:count]].astype(np.int32)


def retrain_seed(seed: int, attempt: int) -> int:
  """The PRNG seed of a re-training: attempt a of model seed s (controls: attempt a of the
  paired control). Attempt 0 keeps the earlier `10_000 + seed`; later attempts get their
  own shuffling (and noise), as separate re-trainings in the paper would."""
  if not 0 <= seed < 100_000 or attempt < 0:
    raise ValueError(f"need 0 <= seed < 100000 and attempt >= 0, got {seed}, {attempt}")
  return 10_000 + seed + 100_000 * attempt


@dataclasses.dataclass
class Plan:
  """Everything the re-training sweep of one setup needs, indexed by model m and variant v."""

  arms: list[Arm]
  seeds: list[int]
  models: list[tuple[Defense, int]]  # m -> (pre-training defense, seed)
  clean_acc_M: list[float]
  crafted_M: list[Crafted]
  variants: list[tuple[int, int, int]]  # v -> (m, target position, attempt)
  shared: dict

  def model_index(self, arm: Arm, seed: int) -> int:
    return self.models.index((arm.pre, seed))


def make_plan(ctx: Context, config, arms, seeds, params_by_model, crafted_by_model) -> Plan:
  models_m = list(params_by_model)
  crafted_M = [crafted_by_model[m] for m in models_m]
  q = crafted_M[0].x_TQ.shape[1]
  t = max(c.target_idx_T.size for c in crafted_M)
  variants, px, base = [], [], []
  for m, c in enumerate(crafted_M):
    for i in range(c.target_idx_T.size):
      if config.mode == "oneshot":
        for a in range(q):
          variants.append((m, i, a))
          px.append(c.x_TQ[i, a : a + 1])
          base.append(c.base_TQ[i, a : a + 1])
      else:
        variants.append((m, i, 0))
        px.append(c.x_TQ[i])
        base.append(c.base_TQ[i])
  p = max(a.shape[0] for a in px)
  xt_MT = np.zeros((len(models_m), t, *ctx.x.shape[1:]), np.float32)
  for m, c in enumerate(crafted_M):
    xt_MT[m, : c.target_idx_T.size] = ctx.x_test[c.target_idx_T]
  params_M = jax.tree.map(lambda *a: np.stack(a), *[params_by_model[m] for m in models_m])
  shared = {
    "x": ctx.x,
    "y": ctx.y,
    "x_eval": ctx.x_eval,
    "y_eval": ctx.y_eval,
    "params_M": params_M,
    "xt_MT": xt_MT,
    "px_V": np.stack(px).astype(np.float32),
    "base_V": np.stack(base).astype(np.int32),
    "displace_P": displaced_points(ctx.y, p, (config.base_class, config.target_class)),
  }
  clean_acc_M = [accuracy(ctx, params_by_model[m]) for m in models_m]
  return Plan(list(arms), list(seeds), models_m, clean_acc_M, crafted_M, variants, shared)


def _job(
  plan: Plan,
  ctx: Context,
  arm: Arm,
  seed: int,
  *,
  variant: int,
  n_poisons: int,
  target_index: int | None = None,
  attempt: int | None = None,
) -> sweep.Job:
  m = plan.model_index(arm, seed)
  values = {
    "model": m,
    "variant": variant,
    "n_poisons": n_poisons,
    "learning_rate": ctx.learning_rate,
    "l2_norm_clip": arm.re.clip_norm,
    "noise_multiplier": arm.re.noise_multiplier,
  }
  key = {**arm.key.fields(), "seed": seed, "n_poisons": n_poisons}
  if target_index is not None:
    key.update(target_index=target_index, attempt=attempt)
  elif attempt is not None:
    key.update(attempt=attempt)
  # Re-training keys differ from the pre-training ones (which are key(seed)).
  # Control run c (attempt -1 - c) shuffles like attempt c; multi-poison runs are attempt 0.
  if attempt is None:
    shuffle = 0
  elif attempt < 0:
    shuffle = -1 - attempt
  else:
    shuffle = attempt
  return sweep.Job(arm.re.kind, values, retrain_seed(seed, shuffle), key)


def control_jobs(plan: Plan, ctx: Context, runs: int = 1) -> list[sweep.Job]:
  """`runs` clean re-trainings per (arm, seed): the no-poison baseline of the success rule.

  Control run c (`attempt` -1 - c in attempts.csv) shuffles like attempt c. A target counts
  as a control success if any of its `runs` clean re-trainings flips it with RAD < 0.05:
  the same any-of-N rule the attack gets, so chance flips are counted alike.
  """
  return [
    _job(plan, ctx, arm, seed, variant=0, n_poisons=0, attempt=-1 - c)
    for arm in plan.arms
    for seed in plan.seeds
    for c in range(runs)
  ]


def oneshot_jobs(plan: Plan, ctx: Context) -> list[sweep.Job]:
  jobs = []
  for arm in plan.arms:
    for seed in plan.seeds:
      m = plan.model_index(arm, seed)
      c = plan.crafted_M[m]
      for v, (vm, i, a) in enumerate(plan.variants):
        if vm == m and a < c.count_T[i]:
          jobs.append(
            _job(
              plan,
              ctx,
              arm,
              seed,
              variant=v,
              n_poisons=1,
              target_index=int(c.target_idx_T[i]),
              attempt=a,
            )
          )
  return jobs


def multipoison_jobs(plan: Plan, ctx: Context, k: int, done: set) -> list[sweep.Job]:
  """Jobs adding poisons 1..k for every (arm, seed, target) not yet in `done` that has k."""
  jobs = []
  for arm in plan.arms:
    for seed in plan.seeds:
      m = plan.model_index(arm, seed)
      c = plan.crafted_M[m]
      for v, (vm, i, _) in enumerate(plan.variants):
        target = int(c.target_idx_T[i])
        if vm == m and k <= c.count_T[i] and (arm.key, seed, target) not in done:
          jobs.append(
            _job(plan, ctx, arm, seed, variant=v, n_poisons=k, target_index=target, attempt=0)
          )
  return jobs


def make_to_rows(plan: Plan, attacker_class: int):
  def to_rows(job: sweep.Job, outputs) -> list[dict]:
    m = int(job.values["model"])
    c = plan.crafted_M[m]
    clean_acc = plan.clean_acc_M[m]
    acc_E = np.asarray(outputs["test_acc"], np.float64)
    if job.values["n_poisons"] == 0:
      control = int(job.key.get("attempt", -1))
      positions = [(i, control) for i in range(c.target_idx_T.size)]
    else:
      _, i, a = plan.variants[int(job.values["variant"])]
      positions = [(i, a)]
    rows = []
    for i, a in positions:
      pred_E = np.asarray(outputs["pred_T"])[:, i]
      margin_E = np.asarray(outputs["margin_T"], np.float64)[:, i]
      success, epoch = decide_success(pred_E, acc_E, attacker_class, clean_acc)
      rows.append(
        {
          "target_index": int(c.target_idx_T[i]),
          "attempt": a,
          "success": success,
          "success_epoch": epoch,
          "flip_epoch": first_flip(pred_E, attacker_class),
          "clean_acc": clean_acc,
          "acc_final": float(acc_E[-1]),
          "acc_min": float(acc_E.min()),
          "rad": (clean_acc - float(acc_E[-1])) / clean_acc,
          "margin_final": float(margin_E[-1]),
          "margin_min": float(margin_E.min()),
        }
      )
    return rows

  return to_rows


# --- Aggregation --------------------------------------------------------------------------------


def _ident(d: Defense, seed: int, target: int) -> tuple:
  return (
    d.kind,
    results.canonical(d.clip_norm),
    results.canonical(d.noise_multiplier),
    int(seed),
    int(target),
  )


def _merge_controls(rows: list[dict]) -> dict:
  """One control row per target from its clean re-trainings: success if any succeeded
  (earliest epoch); accuracy and RAD of control run 0 (`attempt` -1); `control_runs`."""
  first = max(rows, key=lambda r: int(r["attempt"]))
  wins = [r for r in rows if r["success"] is True]
  return {
    **first,
    "success": bool(wins),
    "success_epoch": min((r["success_epoch"] for r in wins), default=None),
    "flip_epoch": min((r["flip_epoch"] for r in rows if r["flip_epoch"] is not None), default=None),
    "control_runs": len(rows),
    "margin_min": min(
      (r["margin_min"] for r in rows if r.get("margin_min") is not None), default=None
    ),
  }


def aggregate(plan: Plan, attempt_rows: list[dict], mode: str) -> tuple[list[dict], list[dict]]:
  """targeted.csv rows (one per arm x seed x target) and the control rows, from attempts.csv.

  One-shot: success if any attempt succeeds; the reported run is the successful attempt with
  the earliest success epoch, else attempt 0. Multi-poison: `n_poisons_used` is the smallest
  number of poisons that succeeded, else the largest tried; the reported run is that one.
  A target with no usable poison (none within the feature-distance bound) fails with
  `n_poisons_used` 0 and no re-training (acc_final and rad empty).
  """
  by_ident: dict[tuple, list[dict]] = {}
  controls: dict[tuple, dict] = {}
  for row in attempt_rows:
    d = Defense(row["defense"], float(row["clip_norm"]), float(row["noise_multiplier"]))
    ident = _ident(d, row["seed"], row["target_index"])
    if int(row["n_poisons"]) == 0:
      controls.setdefault(ident, []).append(row)
    else:
      by_ident.setdefault(ident, []).append(row)
  targeted, control_rows = [], []

  def shift(runs, ctrl):
    """Mean over the runs of margin_final minus that of the paired control run (same
    shuffling: attempt a with control -1 - a; multi-poison runs with control -1)."""
    paired = {int(r["attempt"]): r.get("margin_final") for r in ctrl}
    diffs = [
      r["margin_final"] - paired[-1 - max(int(r["attempt"]), 0)]
      for r in runs
      if r.get("margin_final") is not None
      and paired.get(-1 - max(int(r["attempt"]), 0)) is not None
    ]
    return float(np.mean(diffs)) if diffs else None

  for arm in plan.arms:
    for seed in plan.seeds:
      m = plan.model_index(arm, seed)
      for target in plan.crafted_M[m].target_idx_T:
        ident = _ident(arm.key, seed, int(target))
        base = {"target_index": int(target), **arm.key.fields(), "seed": seed}
        if ident in controls:
          control_rows.append(_merge_controls(controls[ident]))
        runs = by_ident.get(ident, [])
        margin_shift = shift(runs, controls.get(ident, []))
        wins = [r for r in runs if r["success"] is True]
        if mode == "oneshot":
          pick = (
            min(wins, key=lambda r: (r["success_epoch"], r["attempt"]))
            if wins
            else min(runs, key=lambda r: r["attempt"], default=None)
          )
        else:
          pick = (
            min(wins, key=lambda r: r["n_poisons"])
            if wins
            else max(runs, key=lambda r: r["n_poisons"], default=None)
          )
        if pick is None:
          targeted.append(
            {
              **base,
              "success": False,
              "success_epoch": None,
              "n_poisons_used": 0,
              "clean_acc": plan.clean_acc_M[m],
              "acc_final": None,
              "rad": None,
            }
          )
          continue
        targeted.append(
          {
            **base,
            "success": bool(wins),
            "success_epoch": pick["success_epoch"],
            "n_poisons_used": int(pick["n_poisons"]),
            "clean_acc": pick["clean_acc"],
            "acc_final": pick["acc_final"],
            "rad": pick["rad"],
            "_flip": any(r["flip_epoch"] is not None for r in runs),
            "_margin_shift": margin_shift,
          }
        )
  return targeted, control_rows


def summarize(plan: Plan, targeted: list[dict], control_rows: list[dict]) -> list[dict]:
  """One row per defense: success rate with a 95% Wilson interval, poisons needed, RAD,
  the no-poison control's rate, and the defense's clean utility cost (control accuracy
  vs the vanilla arm's control accuracy, per seed)."""

  def same(row, d):
    return (
      row["defense"] == d.kind
      and results.canonical(row["clip_norm"]) == results.canonical(d.clip_norm)
      and results.canonical(row["noise_multiplier"]) == results.canonical(d.noise_multiplier)
    )

  def control_acc(d, seed):
    accs = [r["acc_final"] for r in control_rows if same(r, d) and r["seed"] == seed]
    return accs[0] if accs else math.nan

  vanilla_arm = next((a for a in plan.arms if a.key == VANILLA), None)
  out = []
  for arm in plan.arms:
    d = arm.key
    rows = [r for r in targeted if same(r, d)]
    ctrl = [r for r in control_rows if same(r, d)]
    n, wins = len(rows), sum(bool(r["success"]) for r in rows)
    low, high = results.wilson_interval(wins, n)
    needed = np.asarray([r["n_poisons_used"] for r in rows if r["success"]], np.float64)
    rads = np.asarray([r["rad"] for r in rows if r["rad"] is not None], np.float64)
    shifts = [r.get("_margin_shift") for r in rows]
    shifts = np.asarray([v for v in shifts if v is not None], np.float64)
    c_margins = [r.get("margin_min") for r in ctrl]
    c_margins = np.asarray([v for v in c_margins if v is not None], np.float64)
    c_wins = sum(bool(r["success"]) for r in ctrl)
    c_accs = np.asarray([control_acc(d, s) for s in plan.seeds], np.float64)
    if vanilla_arm is not None:
      v_accs = np.asarray([control_acc(VANILLA, s) for s in plan.seeds], np.float64)
      utility = float(np.mean((v_accs - c_accs) / v_accs))
    else:
      utility = math.nan
    out.append(
      {
        "label": d.label,
        **d.fields(),
        "n": n,
        "successes": wins,
        "success_rate": wins / n if n else math.nan,
        "ci_low": low,
        "ci_high": high,
        "mean_poisons": float(needed.mean()) if needed.size else math.nan,
        "std_poisons": float(needed.std(ddof=1)) if needed.size > 1 else math.nan,
        "mean_rad": float(rads.mean()) if rads.size else math.nan,
        "margin_shift": float(shifts.mean()) if shifts.size else math.nan,
        "control_margin": float(c_margins.mean()) if c_margins.size else math.nan,
        "flip_rate": sum(bool(r.get("_flip")) for r in rows) / n if n else math.nan,
        "control_successes": c_wins,
        "control_n": len(ctrl),
        "control_runs": max((int(r.get("control_runs", 1)) for r in ctrl), default=0),
        "control_rate": c_wins / len(ctrl) if ctrl else math.nan,
        "clean_acc": float(
          np.mean([plan.clean_acc_M[plan.model_index(arm, s)] for s in plan.seeds])
        ),
        "control_acc": float(np.mean(c_accs)),
        "utility_rad": utility,
      }
    )
  return out


# --- Plots --------------------------------------------------------------------------------------


def plot_summary(path: str, panels: Sequence[tuple[str, list[dict]]], multipoison: bool) -> None:
  """Success rate per defense with Wilson 95% error bars (and the no-poison control rate);
  for multi-poison also the mean number of poisons needed (+- std)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rows_n = 2 if multipoison else 1
  width = max(5.0, 0.9 * max(len(s) for _, s in panels) + 2.0)
  fig = Figure(figsize=(width * len(panels), 3.6 * rows_n + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows_n, len(panels), squeeze=False)
  for j, (title, summary) in enumerate(panels):
    x_D = np.arange(len(summary))
    labels = [s["label"] for s in summary]
    rate_D = np.asarray([s["success_rate"] for s in summary], np.float64)
    err_2D = np.stack(
      [
        rate_D - np.asarray([s["ci_low"] for s in summary]),
        np.asarray([s["ci_high"] for s in summary]) - rate_D,
      ]
    )
    ax = axes[0, j]
    ax.bar(x_D, rate_D, color="tab:red", alpha=0.75, label="attack success (RAD < 0.05)")
    ax.errorbar(
      x_D, rate_D, yerr=err_2D, fmt="none", ecolor="k", capsize=4, label="95% Wilson interval"
    )
    ax.plot(
      x_D,
      [s["control_rate"] for s in summary],
      "o",
      mfc="none",
      mec="tab:blue",
      label="no-poison control",
    )
    ax.plot(
      x_D, [s["flip_rate"] for s in summary], "x", color="tab:gray", label="flipped at any RAD"
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate")
    ax.set_title(title)
    ax.set_xticks(x_D, labels, rotation=30, ha="right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if multipoison:
      ax = axes[1, j]
      mean_D = np.asarray([s["mean_poisons"] for s in summary], np.float64)
      std_D = np.nan_to_num(np.asarray([s["std_poisons"] for s in summary], np.float64))
      ax.errorbar(x_D, mean_D, yerr=std_D, fmt="s", color="tab:purple", capsize=4)
      ax.set_ylabel("poisons needed (successful targets)")
      ax.set_xticks(x_D, labels, rotation=30, ha="right")
      ax.grid(True, axis="y", alpha=0.3)
  results.save_figure(fig, path, dpi=120)
