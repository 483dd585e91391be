"""The vmapped training program: one compiled program per defense kind serves every
(ratio, seed, defense) job, each naming its training set by row index into one shared pool.

References:
  Hong et al. 2020, §6.2 (Adam / DP-Adam from scratch), Appendix E (Fig. 11's accuracies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.indiscriminate.config import Config
from jaxshape import models
from jaxshape import train


def _map_rows(fn, rows, chunk: int = 1024):
  """`fn(rows)` evaluated on chunks of `rows` (bounds the gathered rows held at once)."""
  pad = -rows.shape[0] % chunk
  padded = jnp.concatenate([rows, jnp.repeat(rows[:1], pad)]).reshape(-1, chunk)
  return jax.lax.map(fn, padded).reshape(-1)[: rows.shape[0]]


def build_program(config: Config, num_classes: int, n_clean: int, p_max: int):
  """`build(defense)` -> the program `sweep.run` vmaps over jobs (LR, Adam / DP-Adam)."""
  model = models.LR(num_classes)
  loss_fn = models.ClassifierLoss(model)

  def build(defense: str):
    spec = train.TrainSpec(
      loss_fn,
      optimizer="adam",
      defense=defense,
      batch_size=config.batch_size,
      epochs=config.epochs,
    )

    def program(values, key, shared):
      # The pool holds the clean points once, then every variant's poisons
      # (`crafting.craft`); a job's training set is clean + its variant's first
      # n_poisons poisons, named by row index, so the vmapped grid shares one
      # copy of the data (`train.num_examples`).
      v = values["variant"].astype(jnp.int32)
      rows_P = n_clean + v * p_max + jnp.arange(p_max)
      active_P = (jnp.arange(p_max) < values["n_poisons"]).astype(jnp.float32)
      fit_data = {
        "x": shared["pool_x"],
        "y": shared["pool_y"],
        "index": jnp.concatenate([jnp.arange(n_clean), rows_P]),
        "mask": jnp.concatenate([jnp.ones([n_clean]), active_P]),
      }
      x_clean, y_clean = shared["pool_x"][:n_clean], shared["pool_y"][:n_clean]

      def eval_fn(params):
        # Training accuracy on clean and on poison points (Appendix E, Fig. 11).
        correct_P = _map_rows(
          lambda r: models.predict(model, params, shared["pool_x"][r]) == shared["pool_y"][r],
          rows_P,
        )
        return {
          "test_acc": train.accuracy(model, params, shared["x_test"], shared["y_test"]),
          "train_acc_clean": train.accuracy(model, params, x_clean, y_clean),
          "train_acc_poison": jnp.sum(correct_P * active_P) / jnp.maximum(jnp.sum(active_P), 1),
        }

      hparams = train.HParams.create(
        values["learning_rate"], values["l2_norm_clip"], values["noise_multiplier"]
      )
      return train.fit(spec, hparams, key, fit_data, eval_fn=eval_fn).records

    return program

  return build
