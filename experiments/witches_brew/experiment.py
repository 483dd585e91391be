"""`run(config)`: surrogate, targets, brews, victims from scratch (poisoned and control), rows.

Shapes: N training examples, P poisons, T targets.

1. The attacker's surrogates: `surrogate_seeds` CNNs trained like the victims
   on the clean subset from keys no victim uses, cached in `<out>/cache`
   (`common.ParamsCache`); crafting averages over them (an ensemble).
2. Targets: test points of `target_class` every surrogate classifies
   correctly, with mean surrogate margin inside `target_margin` when given
   (confusable targets), the first `targets` of a fixed random order.
3. One brew per target (`poisons.witches_brew`: P = budget x N training points
   of `adversarial_class`, the nearest to the target in the surrogates'
   penultimate features or random, clean labels, l-inf `epsilon`), saved in
   `<out>/poisons/` and reused by a re-run with the same crafting settings.
4. Per (defense, seed): a control victim trained from scratch on the clean
   subset, and one victim per target trained from scratch with the same key on
   the subset where the P bases are replaced by their poisons. The key fixes
   initialisation, batches (by row) and DP noise, so a poisoned victim differs
   from its control only in the perturbation of P rows. Success: the target is
   classified as `adversarial_class` after the last epoch.

Rows go to `<out>/results.csv` (one per target x seed x defense) and
`<out>/controls.csv` (one per control x target) after every victim, rewritten
atomically; a re-run skips the victims already there.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from experiments import common
from experiments.witches_brew import config as config_lib
from experiments.witches_brew import report
from experiments.witches_brew import victims
from jaxshape import models
from jaxshape import poisons
from jaxshape import results
from jaxshape import train

SURROGATE_SEED = 0
VICTIM_SEED = 1  # victim s trains with jax.random.key(VICTIM_SEED + s)
NUM_CLASSES = 10

COLUMNS = (
  "target_index",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "n_poisons",
  "surrogate_margin",
  "alignment",
  "alignment_victim",
  "base_alignment_victim",
  "success",
  "control_success",
  "adv_margin",
  "control_adv_margin",
  "clean_acc",
  "control_clean_acc",
  "epsilon",
  "seconds",
)
CONTROL_COLUMNS = (
  "target_index",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "control_success",
  "control_adv_margin",
  "control_clean_acc",
  "seconds",
)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The data and model every victim shares."""

  model: models.CNN
  x_N: np.ndarray  # [N, 28, 28, 1] float32 clean training subset
  y_N: np.ndarray  # [N] int32
  x_test: np.ndarray  # [M, 28, 28, 1] float32 the whole test split (targets come from it)
  y_test: np.ndarray  # [M] int32
  acc_idx: np.ndarray  # [max_test] int32 rows of the test split clean accuracy is measured on


def setup(config) -> Setup:
  ds = common.load_data(config, "fashion_mnist")
  x_N, y_N = common.subsample(ds.x_train, ds.y_train, config.max_train, rng_seed=0)
  x_test, y_test = np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test, np.int32)
  acc_idx = np.sort(np.random.default_rng(1).permutation(len(y_test))[: config.max_test])
  return Setup(models.CNN(NUM_CLASSES), x_N, y_N, x_test, y_test, acc_idx.astype(np.int32))


def _spec(config, s: Setup, defense: common.Defense, epochs: int) -> train.TrainSpec:
  kind = "vanilla" if defense.kind == "vanilla" else "dp"
  return victims.make_spec(s.model, kind, config.batch_size, epochs, config.momentum)


def _victim_shift(config) -> int | None:
  return config.max_shift if config.victim_augment else None


def _hparams(config, defense: common.Defense) -> train.HParams:
  return train.HParams.create(config.learning_rate, defense.clip_norm, defense.noise_multiplier)


def surrogate_key(k: int) -> jax.Array:
  """The key of surrogate k: `key(SURROGATE_SEED)`, folded with k for k >= 1 (never a victim's)."""
  key = jax.random.key(SURROGATE_SEED)
  return key if k == 0 else jax.random.fold_in(key, k)


def surrogates(config, s: Setup, cache: common.ParamsCache) -> list:
  """The attacker's pre-trained CNNs (`surrogate_seeds` keys, clean subset, the victims'
  recipe) after each epoch of `surrogate_checkpoints` or after the last; cached. A flat list,
  seed-major: the ensemble crafting averages over."""
  kept = tuple(config.surrogate_checkpoints) or (config.surrogate_epochs,)
  one = models.init_params(s.model, jax.random.key(0), s.x_N.shape[1:])
  spec = _spec(config, s, common.VANILLA, config.surrogate_epochs)
  out = []
  for k in range(config.surrogate_seeds):
    key = {
      "data": "fashion_mnist",
      "max_train": config.max_train,
      "epochs": config.surrogate_epochs,
      "batch_size": config.batch_size,
      "learning_rate": config.learning_rate,
      "momentum": config.momentum,
      **({"augment": config.max_shift} if config.victim_augment else {}),
      "seed": SURROGATE_SEED,
      "kept": kept,
      **({"member": k} if k else {}),
    }

    def train_fn(k=k):
      _, params_K = victims.train_victim(
        spec,
        _hparams(config, common.VANILLA),
        surrogate_key(k),
        s.x_N,
        s.y_N,
        keep_epochs=kept,
        max_shift=_victim_shift(config),
      )
      return params_K

    out += list(cache.get("surrogates", key, [one] * len(kept), train_fn))
  return out


def final_surrogates(config, params_K: list) -> list:
  """The last checkpoint of every surrogate seed in `surrogates`' flat list."""
  per_seed = len(params_K) // config.surrogate_seeds
  return params_K[per_seed - 1 :: per_seed]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, x):
  return model.apply({"params": params}, x)


def logits(model, params, x: np.ndarray, chunk: int = 1000) -> np.ndarray:
  return np.concatenate(
    [
      np.asarray(_logits(model, params, jnp.asarray(x[i : i + chunk])))
      for i in range(0, len(x), chunk)
    ]
  )


def surrogate_margins(config, s: Setup, finals: list, idx: np.ndarray) -> tuple:
  """Per test point of `idx`: the mean over `finals` of logit(adversarial) - logit(true), and
  whether every surrogate classifies it correctly."""
  margin_K, correct_K = [], []
  for params in finals:
    logits_TC = logits(s.model, params, s.x_test[idx])
    margin_K.append(logits_TC[:, config.adversarial_class] - logits_TC[:, config.target_class])
    correct_K.append(logits_TC.argmax(axis=1) == s.y_test[idx])
  return np.mean(margin_K, axis=0), np.all(correct_K, axis=0)


def choose_targets(config, s: Setup, finals: list) -> np.ndarray:
  """The first `targets` test points of `target_class`, in a fixed random order, that every
  surrogate classifies correctly, with mean surrogate margin inside `target_margin` if given
  (confusable targets: the attacker sees its own models' margins, not the victims')."""
  order = np.random.default_rng(2).permutation(len(s.y_test))
  cand = order[s.y_test[order] == config.target_class]
  margin, correct = surrogate_margins(config, s, finals, cand)
  keep = correct
  if config.target_margin:
    lo, hi = config.target_margin
    keep = keep & (margin > lo) & (margin < hi)
  chosen = cand[keep][: config.targets]
  if chosen.size < config.targets:
    raise ValueError(
      f"only {chosen.size} targets fit (correct on every surrogate, margin in "
      f"{config.target_margin or 'any'}), asked {config.targets}"
    )
  return chosen.astype(np.int32)


CRAFT_FIELDS = (
  "max_train", "surrogate_epochs", "surrogate_seeds", "surrogate_checkpoints", "batch_size",
  "learning_rate", "momentum", "victim_augment", "adversarial_class", "budget",
  "base_selection", "epsilon", "steps", "restarts", "augment", "max_shift",
)  # fmt: skip
BREW_FIELDS = ("x_P", "base_P", "alignment", "alignment_start", "seconds")


@functools.partial(jax.jit, static_argnums=0)
def _features(model, params, x):
  return models.features(model, params, x)


def nearest_bases(config, s: Setup, finals: list, target: int) -> np.ndarray:
  """The `n_poisons` training points of `adversarial_class` nearest the target: smallest mean
  (over the final surrogates) Euclidean distance in penultimate-feature space."""
  eligible = np.flatnonzero(s.y_N == config.adversarial_class)
  dist = np.zeros(eligible.size)
  for params in finals:
    f_t = np.asarray(_features(s.model, params, jnp.asarray(s.x_test[target][None])))
    f_E = np.asarray(_features(s.model, params, jnp.asarray(s.x_N[eligible])))
    dist += np.linalg.norm(f_E - f_t, axis=1) / len(finals)
  return np.sort(eligible[np.argsort(dist, kind="stable")[: config_lib.n_poisons(config)]])


def brew_target(config, s: Setup, params_K: list, target: int) -> dict:
  """The poisons of one target, cached in <out>/poisons: x_P, base_P, the final alignment
  (mean cosine over the surrogates, no augmentation), the first step's, and seconds."""
  text = json.dumps({**{f: getattr(config, f) for f in CRAFT_FIELDS}, "target": int(target)},
                    sort_keys=True)  # fmt: skip
  digest = hashlib.sha256(text.encode()).hexdigest()[:10]
  path = os.path.join(config.out, "poisons", f"target{target}_{digest}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      if str(f["key"]) == text:
        return {k: f[k] for k in BREW_FIELDS}
  with common.Timer() as timer:
    ps = poisons.witches_brew(
      jax.random.fold_in(jax.random.key(3), target),
      s.model,
      params_K,
      s.x_test[target],
      config.adversarial_class,
      s.x_N,
      s.y_N,
      **(
        {"base_idx": nearest_bases(config, s, final_surrogates(config, params_K), target)}
        if config.base_selection == "nearest"
        else {"budget": config_lib.n_poisons(config)}
      ),
      epsilon=config.epsilon,
      steps=config.steps,
      restarts=config.restarts,
      augment=config.augment,
      max_shift=config.max_shift,
      target_idx=int(target),
      num_classes=NUM_CLASSES,
    )
    best = int(ps.info["best_restart"])
    out = {
      "x_P": np.asarray(ps.x),
      "base_P": np.asarray(ps.base_idx),
      "alignment": np.float32(1.0 - float(ps.info["loss_R"][best])),
      "alignment_start": np.float32(np.asarray(ps.info["alignment_RS"])[best, 0]),
    }
  out["seconds"] = np.float32(timer.seconds)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with results.atomic_open(path, "wb") as f:
    np.savez(f, key=np.asarray(text), **out)
  return out


def poisoned_set(s: Setup, brewed: dict) -> np.ndarray:
  """The training inputs with the P bases replaced by their poisons (labels unchanged)."""
  x_N = s.x_N.copy()
  x_N[brewed["base_P"]] = brewed["x_P"]
  return x_N


def _outcome(config, s: Setup, params, targets_T: np.ndarray) -> dict:
  """Per target: predicted class == adversarial_class, and the margin logit_adv - logit_true."""
  logits_TC = logits(s.model, params, s.x_test[targets_T])
  margin_T = logits_TC[:, config.adversarial_class] - logits_TC[:, config.target_class]
  acc_logits = logits(s.model, params, s.x_test[s.acc_idx])
  return {
    "success_T": logits_TC.argmax(axis=1) == config.adversarial_class,
    "margin_T": margin_T,
    "clean_acc": float(np.mean(acc_logits.argmax(axis=1) == s.y_test[s.acc_idx])),
  }


@functools.partial(jax.jit, static_argnums=0)
def _alignments(model, params, x_target, adversarial_class, x_P, x_base_P, y_P):
  """Cosine of the target's adversarial gradient with the poisons' gradient and with their
  unperturbed bases' (how much of the alignment the perturbation adds), at `params`."""
  grad_target = poisons.target_gradient(model, params, x_target, adversarial_class)
  cos = lambda x: 1.0 - poisons.alignment_loss(model, params, grad_target, x, y_P)
  return cos(x_P), cos(x_base_P)


def dp_epsilon(config, defense: common.Defense) -> float:
  """Epsilon (delta 1e-5) of a victim's training, for the shuffled batches it used."""
  return common.defense_epsilon(defense, config.max_train, config.batch_size, config.epochs)


def run(config) -> dict:
  """Runs (or resumes) the experiment; returns {"rows", "controls", "summary"}."""
  config = config_lib.validate(config)
  common.prepare_out(config)
  s = setup(config)
  params_K = surrogates(config, s, common.ParamsCache(os.path.join(config.out, "cache")))
  finals = final_surrogates(config, params_K)
  targets_T = choose_targets(config, s, finals)
  surrogate_margin_T = surrogate_margins(config, s, finals, targets_T)[0]
  brews = {}
  for t in tqdm.tqdm(targets_T, desc="brew", unit="target", disable=not config.progress):
    brews[int(t)] = brew_target(config, s, params_K, int(t))

  rows_path = os.path.join(config.out, "results.csv")
  controls_path = os.path.join(config.out, "controls.csv")
  rows = results.read_csv(rows_path) if os.path.exists(rows_path) else []
  controls = results.read_csv(controls_path) if os.path.exists(controls_path) else []
  plan = [(d, seed) for d in config_lib.defenses(config) for seed in range(config.seeds)]
  bar = tqdm.tqdm(total=len(plan) * (1 + len(targets_T)), desc="victims", unit="victim",
                  disable=not config.progress)  # fmt: skip
  with bar:
    for defense, seed in plan:
      spec = _spec(config, s, defense, config.epochs)
      hparams, key = _hparams(config, defense), jax.random.key(VICTIM_SEED + seed)
      eps = dp_epsilon(config, defense)
      ids = {**defense.fields(), "seed": seed}
      if not all(common.has_row(controls, **ids, target_index=int(t)) for t in targets_T):
        with common.Timer() as timer:
          params = victims.train_victim(
            spec, hparams, key, s.x_N, s.y_N, max_shift=_victim_shift(config)
          )
          out = _outcome(config, s, params, targets_T)
        controls = [r for r in controls if not common.has_row([r], **ids)]
        controls += [
          {**ids, "target_index": int(t), "control_success": int(out["success_T"][i]),
           "control_adv_margin": float(out["margin_T"][i]),
           "control_clean_acc": out["clean_acc"], "seconds": timer.seconds}
          for i, t in enumerate(targets_T)
        ]  # fmt: skip
        results.write_csv(controls_path, controls, CONTROL_COLUMNS)
      bar.update(1)
      control = {int(r["target_index"]): r for r in controls if common.has_row([r], **ids)}
      for i, t in enumerate(targets_T):
        t = int(t)
        if not common.has_row(rows, **ids, target_index=t):
          brewed = brews[t]
          with common.Timer() as timer:
            params = victims.train_victim(
              spec, hparams, key, poisoned_set(s, brewed), s.y_N, max_shift=_victim_shift(config)
            )
            out = _outcome(config, s, params, targets_T)
            y_P = s.y_N[brewed["base_P"]]
            align_victim, align_base = _alignments(
              s.model, params, s.x_test[t], config.adversarial_class, brewed["x_P"],
              s.x_N[brewed["base_P"]], y_P)  # fmt: skip
          rows.append({
            "target_index": t, **ids, "n_poisons": int(brewed["base_P"].size),
            "surrogate_margin": float(surrogate_margin_T[i]),
            "alignment": float(brewed["alignment"]), "alignment_victim": float(align_victim),
            "base_alignment_victim": float(align_base),
            "success": int(out["success_T"][i]),
            "control_success": int(control[t]["control_success"]),
            "adv_margin": float(out["margin_T"][i]),
            "control_adv_margin": float(control[t]["control_adv_margin"]),
            "clean_acc": out["clean_acc"],
            "control_clean_acc": float(control[t]["control_clean_acc"]),
            "epsilon": eps, "seconds": timer.seconds,
          })  # fmt: skip
          results.write_csv(rows_path, rows, COLUMNS)
        bar.update(1)
  rows = results.parse(results.read_csv(rows_path))
  summary = report.write(config, rows, brews)
  return {"rows": rows, "controls": results.parse(results.read_csv(controls_path)),
          "summary": summary}  # fmt: skip
