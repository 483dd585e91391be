"""`run(config)`: triggers, poisoned sets, victims (poisoned and control), rows.

Shapes: N clean training points, P poisons, M test points.

1. Triggers (attacker seed 0): Blend (random-noise pattern, lam 0.2) and
   Patch (white square) as in `poisons.blend` / `poisons.patch_backdoor`;
   Narcissus (`poisons.narcissus`): a surrogate (the victims' architecture,
   cached in `<out>/cache`) trained on the POOD stand-in -- FashionMNIST
   points of the other classes outside the victims' subset -- plus the
   subset's target-class points, then the trigger optimised against it.
2. Per (defense, seed): a control victim trained the same way (same key:
   initialisation, batches, DP noise) on the clean subset, and one victim per
   (attack, ratio) on the poisoned set: Blend/Patch add P relabelled copies,
   Narcissus replaces P target-class points by their triggered versions.
   `direct`: from scratch; `finetune`: from the vanilla clean pre-trained
   parameters of that seed, fine-tuned with the defense (limitations paper §3).
3. Metrics: ASR = triggered test points not of the target class classified
   as it (Narcissus: trigger x `magnification`); `control_asr` the same
   trigger on the control; clean and target-class test accuracy; clean
   training loss (mean cross-entropy on the clean subset); DP epsilon.

Victims from scratch are stepped from the host (`witches_brew.victims`: XLA:CPU
runs convolutions in scan bodies ~9x slower); fine-tuning uses `train.fit`.
Rows go to `<out>/results.csv` after every victim (atomic); a re-run skips
rows already there and reuses cached control/pre-trained parameters.

References:
  "Limitations of gradient shaping" (papers/limitations-of-gradient-shaping.md),
  §3 and Tables 1-2; Zeng et al. 2022 (Narcissus); Chen et al. 2017 (Blend).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from experiments import common
from experiments.backdoor import config as config_lib
from experiments.backdoor import report
from experiments.witches_brew import victims
from jaxshape import models
from jaxshape import poisons
from jaxshape import results
from jaxshape import train

ATTACKER_SEED = 0
VICTIM_SEED = 1  # victim s trains with jax.random.key(VICTIM_SEED + s)
NUM_CLASSES = 10

COLUMNS = (
  "attack",
  "protocol",
  "poison_ratio",
  "n_poisons",
  "defense",
  "clip_norm",
  "noise_multiplier",
  "seed",
  "asr",
  "control_asr",
  "clean_acc",
  "target_class_acc",
  "clean_train_loss",
  "epsilon",
  "n_triggered",
  "control_clean_acc",
  "seconds",
)


@dataclasses.dataclass(frozen=True)
class Setup:
  model: object
  x_N: np.ndarray  # clean training subset
  y_N: np.ndarray
  x_M: np.ndarray  # test subset
  y_M: np.ndarray
  x_pub: np.ndarray  # Narcissus POOD stand-in (other classes, outside the subset)
  y_pub: np.ndarray


def make_model(name: str):
  if name == "cnn":
    return models.CNN(NUM_CLASSES)  # Hong et al. Table 4
  if name == "small_cnn":  # limitations paper's SmallCNN: 2 conv + 2 dense, SAME padding
    return models.CNN(NUM_CLASSES, hidden=128, padding="SAME")
  return models.ResNet18(NUM_CLASSES)


def setup(config) -> Setup:
  ds = common.load_data(config, config.dataset)
  x_all, y_all = np.asarray(ds.x_train, np.float32), np.asarray(ds.y_train, np.int32)
  order = np.random.default_rng(0).permutation(len(y_all))
  keep = np.sort(order[: config.max_train])
  rest = order[config.max_train :]
  rest = rest[y_all[rest] != config.target_class][: config.max_public]
  x_M, y_M = common.subsample(ds.x_test, ds.y_test, config.max_test, rng_seed=1)
  return Setup(make_model(config.model), x_all[keep], y_all[keep], x_M, y_M,
               x_all[np.sort(rest)], y_all[np.sort(rest)])  # fmt: skip


def _spec(config, s: Setup, defense: common.Defense, epochs: int) -> train.TrainSpec:
  kind = "vanilla" if defense.kind == "vanilla" else "dp"
  return victims.make_spec(s.model, kind, config.batch_size, epochs, config.momentum)


def _hparams(config, defense: common.Defense) -> train.HParams:
  lr = config.learning_rate if defense.kind == "vanilla" else config.dp_learning_rate
  return train.HParams.create(lr, defense.clip_norm, defense.noise_multiplier)


# --- Attacks ----------------------------------------------------------------------------------


class Attack:
  """One (attack, ratio): the poisoned training set and the test-time trigger."""

  def __init__(self, name, ratio, x_train, y_train, n_poisons, trigger_fn):
    self.name, self.ratio, self.n_poisons = name, ratio, n_poisons
    self.x_train, self.y_train, self.trigger_fn = x_train, y_train, trigger_fn


def narcissus_trigger(config, s: Setup, cache: common.ParamsCache) -> jax.Array:
  """The Narcissus trigger against a surrogate on POOD + target-class points (cached)."""
  x_T = s.x_N[s.y_N == config.target_class]
  data = poisons.surrogate_set(s.x_pub, s.y_pub, x_T, config.target_class)
  key = jax.random.key(ATTACKER_SEED)
  spec = _spec(config, s, common.VANILLA, config.surrogate_epochs)
  hparams = _hparams(config, common.VANILLA)
  fields = ("dataset", "model", "max_train", "max_public", "surrogate_epochs", "batch_size",
            "learning_rate", "momentum", "target_class", "epsilon", "warmup_steps", "warmup_lr",
            "trigger_optimizer", "trigger_steps", "trigger_lr")  # fmt: skip
  ckey = {f: getattr(config, f) for f in fields}
  template = {"delta": jnp.zeros(s.x_N.shape[1:], jnp.float32)}

  def craft():
    x, y = np.asarray(data["x"]), np.asarray(data["y"])
    params = victims.train_victim(spec, hparams, jax.random.fold_in(key, 1), x, y)
    if config.warmup_steps:
      params, _ = poisons.warm_up_surrogate(
        jax.random.fold_in(key, 3), s.model, params, x_T, config.target_class,
        steps=config.warmup_steps, learning_rate=config.warmup_lr)  # fmt: skip
    fit = poisons.optimise_trigger(
      jax.random.fold_in(key, 2), s.model, params, x_T, config.target_class,
      epsilon=config.epsilon, steps=config.trigger_steps, step_size=config.trigger_lr,
      optimizer=config.trigger_optimizer)  # fmt: skip
    print(f"narcissus trigger: objective {float(fit.loss_S[:10].mean()):.3f} -> "
          f"{float(fit.loss_S[-10:].mean()):.3f}")  # fmt: skip
    return {"delta": fit.delta}

  return jnp.asarray(cache.get("narcissus_trigger", ckey, template, craft)["delta"])


def attacks(config, s: Setup, cache: common.ParamsCache) -> list[Attack]:
  key = jax.random.key(ATTACKER_SEED)
  out = []
  delta = narcissus_trigger(config, s, cache) if "narcissus" in config.attacks else None
  for a, attack in enumerate(config.attacks):
    for r, ratio in enumerate(config_lib.ratios(config, attack)):
      k = jax.random.fold_in(jax.random.fold_in(key, a), r)
      if attack == "narcissus":
        ps = poisons.narcissus(k, s.x_N, s.y_N, ratio, config.target_class, delta,
                               epsilon=config.epsilon,
                               magnification=config.magnification)  # fmt: skip
        merged = poisons.merge((s.x_N, s.y_N), ps, replace=True)
        fn = lambda x, d=delta: poisons.apply_narcissus(x, d, config.magnification)
      else:
        if attack == "blend":
          ps = poisons.blend(k, s.x_N, s.y_N, ratio, config.target_class, lam=config.blend_lam,
                             num_classes=NUM_CLASSES, exclude_target_class=True)  # fmt: skip
        else:
          ps = poisons.patch_backdoor(k, s.x_N, s.y_N, ratio, config.target_class,
                                      size=config.patch_size, num_classes=NUM_CLASSES,
                                      exclude_target_class=True)  # fmt: skip
        merged = poisons.merge((s.x_N, s.y_N), ps)
        fn = lambda x, t=ps.trigger: poisons.apply_trigger(x, t)
      out.append(Attack(attack, ratio, np.asarray(merged["x"]), np.asarray(merged["y"]),
                        len(ps), fn))  # fmt: skip
  return out


# --- Victims and metrics ----------------------------------------------------------------------


@jax.jit
def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def metrics(config, s: Setup, params, trigger_fn) -> dict:
  model = s.model
  keep = s.y_M != config.target_class
  x_trig = trigger_fn(jnp.asarray(s.x_M[keep]))
  y_adv = jnp.full([int(keep.sum())], config.target_class, jnp.int32)
  is_t = ~keep
  pred_M = np.asarray(train.predictions(model, params, jnp.asarray(s.x_M)))
  losses = [
    _ce(model.apply({"params": params}, jnp.asarray(s.x_N[i : i + 1000])), s.y_N[i : i + 1000])
    for i in range(0, len(s.y_N), 1000)
  ]
  return {
    "asr": float(train.accuracy(model, params, x_trig, y_adv)),
    "n_triggered": int(keep.sum()),
    "clean_acc": float(np.mean(pred_M == s.y_M)),
    "target_class_acc": float(np.mean(pred_M[is_t] == s.y_M[is_t])),
    "clean_train_loss": float(jnp.mean(jnp.concatenate(losses))),
  }


def train_model(config, s: Setup, defense, key, x, y, init_params=None):
  spec = _spec(config, s, defense, config.epochs)
  if init_params is None:
    return victims.train_victim(spec, _hparams(config, defense), key, x, y)
  data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  return train.fit(spec, _hparams(config, defense), key, data, init_params=init_params).params


def pretrained(config, s: Setup, seed: int, cache: common.ParamsCache):
  """finetune: vanilla clean pre-training of seed `seed` (cached); None for direct."""
  if config.protocol == "direct":
    return None
  spec = _spec(config, s, common.VANILLA, config.pretrain_epochs)
  key = jax.random.fold_in(jax.random.key(VICTIM_SEED + seed), 7)
  ckey = {**_cache_fields(config), "pretrain_epochs": config.pretrain_epochs, "seed": seed}
  template = models.init_params(s.model, key, s.x_N.shape[1:])
  return cache.get("pretrained", ckey, template, lambda: victims.train_victim(
    spec, _hparams(config, common.VANILLA), key, s.x_N, s.y_N))  # fmt: skip


def _cache_fields(config) -> dict:
  fields = ("dataset", "model", "max_train", "batch_size", "learning_rate", "momentum",
            "dp_learning_rate", "epochs", "protocol")  # fmt: skip
  return {f: getattr(config, f) for f in fields}


def dp_epsilon(config, defense: common.Defense, n_rows: int) -> float:
  """Epsilon (delta 1e-5) of the training on the poisoned set, for its shuffled batches."""
  return common.defense_epsilon(defense, n_rows, config.batch_size, config.epochs)


def run(config) -> dict:
  """Runs (or resumes) the experiment; returns {"rows", "summary"}."""
  config = config_lib.validate(config)
  common.prepare_out(config)
  s = setup(config)
  cache = common.ParamsCache(os.path.join(config.out, "cache"))
  plan_attacks = attacks(config, s, cache)
  rows_path = os.path.join(config.out, "results.csv")
  rows = results.read_csv(rows_path) if os.path.exists(rows_path) else []
  plan = [(d, seed) for d in config_lib.defenses(config) for seed in range(config.seeds)]
  bar = tqdm.tqdm(total=len(plan) * len(plan_attacks), desc="victims", unit="victim",
                  disable=not config.progress)  # fmt: skip
  with bar:
    for defense, seed in plan:
      ids = {"protocol": config.protocol, **defense.fields(), "seed": seed}
      todo = [a for a in plan_attacks
              if not common.has_row(rows, attack=a.name, poison_ratio=a.ratio, **ids)]  # fmt: skip
      bar.update(len(plan_attacks) - len(todo))
      if not todo:
        continue
      key = jax.random.key(VICTIM_SEED + seed)
      init = pretrained(config, s, seed, cache)
      template = models.init_params(s.model, key, s.x_N.shape[1:])
      ckey = {**_cache_fields(config), **defense._asdict(), "seed": seed, "control": True,
              "pretrain_epochs": config.pretrain_epochs}  # fmt: skip
      clean_fn = functools.partial(train_model, config, s, defense, key, s.x_N, s.y_N, init)
      control = cache.get(f"control_{defense.slug}_s{seed}", ckey, template, clean_fn)
      for a in todo:
        with common.Timer() as timer:
          params = train_model(config, s, defense, key, a.x_train, a.y_train, init)
          m = metrics(config, s, params, a.trigger_fn)
          c = metrics(config, s, control, a.trigger_fn)
        rows.append({
          "attack": a.name, "poison_ratio": a.ratio, "n_poisons": a.n_poisons, **ids, **m,
          "control_asr": c["asr"], "control_clean_acc": c["clean_acc"],
          "epsilon": dp_epsilon(config, defense, len(a.y_train)), "seconds": timer.seconds,
        })  # fmt: skip
        results.write_csv(rows_path, rows, COLUMNS)
        bar.update(1)
  rows = results.parse(results.read_csv(rows_path))
  return {"rows": rows, "summary": report.write(config, rows)}
