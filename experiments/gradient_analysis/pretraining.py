"""The clean pre-trained MLPs of the re-training scenarios, one per seed, cached on disk."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.gradient_analysis.config import Config
from jaxshape import models
from jaxshape import train

# Salt folded into a seed's key, so pre-training draws bits independent of the training run.
_PRETRAIN_SALT = 2


def pretrain(config: Config, d: dict[str, Any]) -> tuple[Any, np.ndarray]:
  """MLPs trained on the clean (10-class) set, one per seed: (params `[S, ...]`, test acc `[S]`).

  Plain SGD (no momentum), batch `pretrain_batch_size`, `pretrain_learning_rate`,
  `pretrain_epochs`; the seeds run as one vmapped program. The result is cached in
  `<out>/cache/` (`common.ParamsCache`, keyed by these settings) and re-used by a rerun.
  """
  model = models.MLP(d["num_classes"], hidden=tuple(config.hidden))
  template = models.init_params(model, jax.random.key(0), d["x"].shape[1:])
  key = {
    "hidden": tuple(config.hidden),
    "epochs": config.pretrain_epochs,
    "learning_rate": config.pretrain_learning_rate,
    "batch_size": config.pretrain_batch_size,
    "n": int(d["x"].shape[0]),
    "max_train": config.max_train,
    "seeds": config.seeds,
  }
  spec = train.TrainSpec(
    models.ClassifierLoss(model),
    optimizer="sgd",
    defense="vanilla",
    batch_size=config.pretrain_batch_size,
    epochs=config.pretrain_epochs,
  )
  hparams = train.HParams.create(config.pretrain_learning_rate)

  def one(key, train_data, x_test, y_test):
    params = train.fit(spec, hparams, key, train_data).params
    return params, train.accuracy(model, params, x_test, y_test)

  def train_all():
    keys_S = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), _PRETRAIN_SALT))(
      jnp.arange(config.seeds)
    )
    with common.Timer() as timer:
      params_S, acc_S = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))(
        keys_S, {"x": d["x"], "y": d["y"]}, d["x_test"], d["y_test"]
      )
      acc_S = np.asarray(acc_S)
    print(
      f"pre-trained {config.seeds} MLP(s) {tuple(config.hidden)} for {config.pretrain_epochs} "
      f"epochs in {timer.seconds:.1f} s; clean test accuracy {np.round(acc_S, 4).tolist()}"
    )
    return params_S, acc_S

  cache = common.ParamsCache(os.path.join(config.out, "cache"))
  params_S, acc_S = cache.get("pretrained_mlp", key, (template, 0), train_all)
  return params_S, np.asarray(acc_S)


# --- The measured training run ------------------------------------------------------------------
