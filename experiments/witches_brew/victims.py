"""Training a model from scratch with a Python loop around one jitted step.

Shapes: N training examples, B batch, S steps per epoch, T targets.

`train.fit` runs an epoch as a `lax.scan`; XLA:CPU runs convolutions inside
loop bodies about 9x slower than the same step jitted alone (measured here on
the paper's CNN, batch 100: 0.92 s against 0.11 s; jax-ml/jax#12868), and
`vmap` over victims turns their convolutions into grouped ones (3x slower
per victim). A victim here is therefore trained by `fit`'s own recipe --
the same key split into (init, shuffle, noise), the same `epoch_batches`, the
same `train_step` -- but stepped from the host. Vanilla training uses the
"dp" step with C = inf and sigma = 0 (`track_norms`: the same update), whose
per-example engine computes the CNN's weight gradients faster than XLA's
convolution backward (0.06 s against 0.11 s per step here).

References:
  Geiping et al. 2021, §4 (victims trained from scratch on the poisoned set);
  Hong et al. 2020, Appendix B (DP-SGD).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import batching
from jaxshape import models
from jaxshape import poisons
from jaxshape import train


def make_spec(model, defense: str, batch_size: int, epochs: int, momentum: float | None):
  """The `TrainSpec` of a victim: "vanilla" (with `track_norms`, the faster step) or "dp"."""
  return train.TrainSpec(
    models.ClassifierLoss(model),
    "sgd",
    defense=defense,
    batch_size=batch_size,
    epochs=epochs,
    momentum=momentum,
    track_norms=defense == "vanilla",
  )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(spec, hparams, state, x_B, y_B, mask_B):
  # The noise key lives in the optimizer state (set by `init`); the key given here is unused.
  optimizer = train.make_optimizer(spec, hparams, jax.random.key(0), 1)
  return train.train_step(spec, hparams, optimizer, state, {"x": x_B, "y": y_B, "mask": mask_B})


@functools.partial(jax.jit, static_argnums=2)
def _augment(key, x_BHWC, max_shift):
  return poisons.augment_images(key, x_BHWC, max_shift, True)


def train_victim(
  spec: train.TrainSpec,
  hparams: train.HParams,
  key: jax.Array,
  x_N: np.ndarray,
  y_N: np.ndarray,
  *,
  keep_epochs: tuple[int, ...] = (),
  max_shift: int | None = None,
):
  """Parameters after `spec.epochs` epochs from scratch, and those after each of `keep_epochs`.

  The same randomness as `train.fit(spec, hparams, key, {"x": x_N, "y": y_N})`:
  two calls with one key and data that differ in a few rows see the same
  initialisation, batches (by row index) and DP noise. With `max_shift` (an
  int), every batch is augmented as Geiping et al.'s victims are: random
  left-right flips and shifts up to `max_shift` pixels (`poisons.augment_images`,
  keyed by `fold_in(key, 3)` and the step, so the same rows see the same draws).

  Returns:
    The final parameters, or with `keep_epochs` (1-based epochs) a pair
    (final parameters, list of the parameters after each kept epoch).
  """
  n = x_N.shape[0]
  key_init, key_shuffle, key_noise = jax.random.split(key, 3)
  params = models.init_params(spec.model, key_init, x_N.shape[1:])
  steps = batching.steps_per_epoch({"x": x_N}, spec.batch_size)
  state = train.init_state(train.make_optimizer(spec, hparams, key_noise, steps), params)
  x_N, y_N = jnp.asarray(x_N), jnp.asarray(y_N)
  key_augment = jax.random.fold_in(key, 3)
  kept, step = [], 0
  for epoch, epoch_key in enumerate(jax.random.split(key_shuffle, spec.epochs), start=1):
    idx_SB, mask_SB = batching.epoch_batches(epoch_key, n, spec.batch_size)
    for idx_B, mask_B in zip(idx_SB, mask_SB, strict=True):
      x_B = x_N[idx_B]
      if max_shift is not None:
        x_B = _augment(jax.random.fold_in(key_augment, step), x_B, max_shift)
      state, _ = _step(spec, hparams, state, x_B, y_N[idx_B], mask_B)
      step += 1
    if epoch in keep_epochs:
      kept.append(jax.tree.map(jnp.copy, state.params))
  return (state.params, kept) if keep_epochs else state.params
