"""The bench's shaping steps: each `jaxshape.shaping` mechanism's training step vs clip-only.

A shaping step is the clip-only step of `experiments.bench` ("clip_fast":
`clipped_sum_and_norms` -> mean -> `optax.sgd`) with the clipped sum replaced
by the mechanism: its input computed as `train` computes it
(`shaping.step_input`: the per-example engine's `reweighted_sum` for
centered clipping and cosine gating, `clipped_sum_and_norms` at the state's
C for quantile clipping, materialised per-example gradients for the robust
aggregators), then the shaping transform (its reference or clip-norm
update included), the mean over the batch and `optax.sgd`. No noise on
either side, so the ratio to clip_fast is the mechanism's own cost.

  centered  centered clipping, radius C, reference decay 0.9
  cosine    cosine gating, threshold 0, clip C
  quantile  quantile-adaptive clip norm, target quantile 0.5, initial C
  trimmed   coordinate-wise trimmed mean, trim fraction 0.1 (materialised)
  median    coordinate-wise median (materialised)

Command (every model, batch 64 and 256, clip_fast and the three fast-path
mechanisms):

  python -m experiments.bench --shaping

References:
  Karimireddy, He, Jaggi 2021, §4 (centered clipping); Andrew et al. 2021,
  §2 (quantile clip norm); Yin et al. 2018, §3 (trimmed mean, median);
  Hong et al. 2020, §7.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from experiments.bench_models import L2_NORM_CLIP
from experiments.bench_models import LEARNING_RATE
from jaxshape import shaping

# method: (`shaping.DEFENSES` name, shaping_param)
MECHANISMS = {
  "centered": ("centered", 0.9),
  "cosine": ("cosine", 0.0),
  "quantile": ("quantile", 0.5),
  "trimmed": ("trimmed", 0.1),
  "median": ("median", 0.0),
}
# Timed by `--shaping`: the mechanisms with a fast path (the robust aggregators
# materialise per-example gradients and sort them: seconds per step).
FAST_MECHANISMS = ("centered", "cosine", "quantile")


def _mean_over_batch() -> optax.GradientTransformation:
  """`ClippedSum` -> its sum divided by the batch size (clip_fast's mean, as a transform)."""

  def update_fn(updates, state, params=None):
    del params
    size = updates.norms_B.shape[0]
    return jax.tree.map(lambda g: g / size, updates.sum), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def steps(loss_fn, methods) -> tuple[dict[str, Callable], dict[str, Callable]]:
  """({method: step(params, opt_state, batch) -> (params, opt_state)}, {method: init})."""
  out, inits = {}, {}
  for method in methods:
    defense, param = MECHANISMS[method]
    tx = optax.chain(
      shaping.for_defense(defense, L2_NORM_CLIP, param),
      _mean_over_batch(),
      optax.sgd(LEARNING_RATE),
    )

    def step(params, opt_state, batch, tx=tx, defense=defense, param=param):
      inputs, _ = shaping.step_input(
        defense, loss_fn, params, batch, opt_state[0], L2_NORM_CLIP, param
      )
      updates, opt_state = tx.update(inputs, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    out[method], inits[method] = step, tx.init
  return out, inits


def table(rows) -> str:
  """Markdown: per model and batch, clip_fast's ms and each mechanism's ms with its ratio to it."""
  by = {(r["model"], r["batch"], r["method"]): r["ms_per_step"] for r in rows}
  keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
  methods = [m for m in MECHANISMS if any(r["method"] == m for r in rows)]
  lines = [
    "| model | batch | clip_fast ms | " + " | ".join(methods) + " |",
    "|---|---:|---:|" + "---:|" * len(methods),
  ]
  for key in keys:
    clip = by.get((*key, "clip_fast"))
    cells = [key[0], str(key[1]), f"{clip:.2f}" if clip else ""]
    for method in methods:
      ms = by.get((*key, method))
      ratio = f" (x{ms / clip:.2f})" if ms is not None and clip else ""
      cells.append(f"{ms:.2f}{ratio}" if ms is not None else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
