"""Poison detection from per-example gradients, baselines from the literature, and metrics.

Shapes: N training examples; F features; `*_N` one value per example.

The paper's §3 finds that poisons' gradients differ from clean ones in
magnitude and orientation; §7 asks for defenses that use both. A detector can
read them directly: every example is scored by its gradient's norm and its
cosine with its class's robust clean direction (the mean of the class's
per-example gradients clipped at the class's median norm, so no example moves
it by more than that median over the class size), computed by the fast
per-example engine (`jaxshape.per_example`) at one or more checkpoints.

  gradient_scores           norms and class cosines of every example (one checkpoint)
  GradientScores.suspicion  "norm", "cosine" or "combined" (higher = more suspicious)
  mean_rank                 combine scores of several checkpoints (mean rank fraction)
  spectral_signature_scores Tran, Li, Madry 2018
  activation_clustering_scores  Chen et al. 2018
  loss_scores               per-example loss (loss ranking)
  roc_auc, precision_at_k   detection quality against the true poison mask
  filter_top, filter_then_retrain   remove the top-scored examples, retrain

References:
  Hong et al. 2020, §3 (gradient magnitudes and orientations), §7.
  Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018, §3.
  Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
  Activation Clustering", 2018, §3.
"""

from __future__ import annotations

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape import _validate
from jaxshape import per_example
from jaxshape import train as train_lib
from jaxshape._typing import Params

SUSPICIONS = ("norm", "cosine", "combined")


def _chunks(x_N, y_N, chunk: int):
  """Yield (start, batch) with `x`, `y`, `mask`; the last chunk is padded to `chunk` rows."""
  n = x_N.shape[0]
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    pad = chunk - (stop - start)
    x = np.asarray(x_N[start:stop])
    y = np.asarray(y_N[start:stop])
    if pad:
      x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
      y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    mask = (np.arange(chunk) < stop - start).astype(np.float32)
    yield start, stop, {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)}


class GradientScores(NamedTuple):
  """Per-example gradient statistics at one checkpoint (NumPy, float64)."""

  norms_N: np.ndarray  # [N] l2 norm of each example's gradient
  cosines_N: np.ndarray  # [N] cosine with its class's robust clean direction (0 if undefined)

  def suspicion(self, kind: str = "combined") -> np.ndarray:
    """Scores, higher = more suspicious, `[N]`.

    "norm": ||g_i||; "cosine": -cos(g_i, r_{y_i}); "combined": ||g_i|| (1 -
    cos(g_i, r_{y_i})), the part of the gradient that does not follow its
    class (large for a large gradient pointing away from the class).
    """
    if kind == "norm":
      return self.norms_N
    if kind == "cosine":
      return -self.cosines_N
    if kind == "combined":
      return self.norms_N * (1.0 - self.cosines_N)
    raise ValueError(f"kind must be one of {SUSPICIONS}, got {kind!r}")


def _check_xy(x_N, y_N, num_classes):
  x_N = np.asarray(x_N)
  y_N = np.asarray(y_N)
  if x_N.ndim < 2 or y_N.ndim != 1 or x_N.shape[0] != y_N.shape[0] or x_N.shape[0] == 0:
    raise ValueError(
      f"x must be [N, ...] and y [N] with N >= 1, got shapes {x_N.shape} and {y_N.shape}"
    )
  _validate.check_int("num_classes", num_classes, 1)
  if y_N.min() < 0 or y_N.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{y_N.min()}, {y_N.max()}]")
  return x_N, y_N.astype(np.int32)


def gradient_scores(
  loss_fn: Any, params: Params, x_N, y_N, num_classes: int, *, chunk: int = 1000
) -> GradientScores:
  """Each example's gradient norm and cosine with its class's robust clean direction.

  Three passes of the per-example engine over the data (chunks of `chunk`):
  the norms; per class c, the direction

    r_c = (1 / N_c) sum_{i: y_i = c} min(1, m_c / ||g_i||) g_i,   m_c = median_{y_i = c} ||g_i||,

  and every example's cosine with r_{y_i}. A class holding a minority of
  poisons keeps its direction: each example moves r_c by at most m_c / N_c.

  Args:
    loss_fn: a `PerExampleLoss` (e.g. `models.ClassifierLoss`); others take the
      vmap path.
    params: the checkpoint to score at.
    x_N, y_N: the training set (poisons included), labels in [0, num_classes).
    num_classes: C >= 1.
    chunk: examples per engine call (memory), an int >= 1.

  References:
    Hong et al. 2020, §3 (poisons' gradients differ in norm and orientation).
  """
  x_N, y_N = _check_xy(x_N, y_N, num_classes)
  _validate.check_int("chunk", chunk, 1)
  chunk = min(chunk, x_N.shape[0])
  n = x_N.shape[0]
  norms_N = np.zeros(n)
  for start, stop, batch in _chunks(x_N, y_N, chunk):
    norms_N[start:stop] = np.asarray(_clipped_sum(loss_fn, params, batch, np.inf).norms_B)[
      : stop - start
    ]
  directions = []
  for c in range(num_classes):
    in_c = y_N == c
    finite = in_c & np.isfinite(norms_N)
    median = float(np.median(norms_N[finite])) if finite.any() else 1.0
    total = jax.tree.map(jnp.zeros_like, params)
    for _, _, batch in _chunks(x_N, y_N, chunk):
      batch = dict(batch, mask=batch["mask"] * (batch["y"] == c))
      cs = _clipped_sum(loss_fn, params, batch, max(median, 1e-30))
      total = jax.tree.map(jnp.add, total, cs.sum)
    count = max(int(in_c.sum()), 1)
    directions.append(jax.tree.map(lambda t, count=count: t / count, total))
  cosines_N = np.zeros(n)
  for start, stop, batch in _chunks(x_N, y_N, chunk):
    y = y_N[start:stop]
    for c in range(num_classes):
      if not (y == c).any():
        continue
      cos = np.asarray(_norms_and_cosines(loss_fn, params, batch, directions[c]).cosines_B)
      cosines_N[start:stop] = np.where(y == c, cos[: stop - start], cosines_N[start:stop])
  cosines_N = np.where(np.isfinite(cosines_N), cosines_N, 0.0)
  return GradientScores(norms_N, cosines_N)


_clipped_sum = jax.jit(per_example.clipped_sum_and_norms, static_argnums=0)
_norms_and_cosines = jax.jit(per_example.per_example_norms_and_cosines, static_argnums=0)


def mean_rank(*scores_N: np.ndarray) -> np.ndarray:
  """Mean over score vectors of each example's rank fraction in [0, 1] (ties averaged), `[N]`.

  Combines one detector's scores at several checkpoints (or several
  detectors) without mixing their scales.
  """
  if not scores_N:
    raise ValueError("mean_rank needs at least one score vector")
  return np.mean([_ranks(np.asarray(s, np.float64)) / max(len(s) - 1, 1) for s in scores_N], 0)


# ------------------------------------------------------------------ baselines


def spectral_signature_scores(features_NF, y_N, num_classes: int) -> np.ndarray:
  """Squared projection on the class's top singular direction of centered features, `[N]`.

  For class c with representations R_c (rows, mean mu_c) and v_c the top
  right singular vector of R_c - mu_c, the score of i is <R_i - mu_c, v_c>^2.

  References:
    Tran, Li, Madry 2018, §3, Algorithm 1.
  """
  features_NF, y_N = _check_xy(features_NF, y_N, num_classes)
  feats = features_NF.reshape(len(y_N), -1).astype(np.float64)
  out = np.zeros(len(y_N))
  for c in range(num_classes):
    idx = np.flatnonzero(y_N == c)
    if len(idx) < 2:
      continue
    centered = feats[idx] - feats[idx].mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    out[idx] = (centered @ vt[0]) ** 2
  return out


def activation_clustering_scores(
  features_NF, y_N, num_classes: int, *, num_components: int = 10, seed: int = 0
) -> np.ndarray:
  """Per class: PCA to `num_components`, 2-means; how much closer to the smaller cluster, `[N]`.

  Chen et al. reduce each class's activations (ICA to 10 components) and split
  them by 2-means, flagging the smaller cluster; PCA stands in for ICA here
  (both keep the top-variance subspace the split needs). The score of i is
  ||z_i - mu_large|| - ||z_i - mu_small|| (positive: in the small cluster).

  References:
    Chen et al. 2018, §3 (activation clustering, relative size).
  """
  features_NF, y_N = _check_xy(features_NF, y_N, num_classes)
  _validate.check_int("num_components", num_components, 1)
  feats = features_NF.reshape(len(y_N), -1).astype(np.float64)
  rng = np.random.default_rng(seed)
  out = np.zeros(len(y_N))
  for c in range(num_classes):
    idx = np.flatnonzero(y_N == c)
    if len(idx) < 3:
      continue
    centered = feats[idx] - feats[idx].mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    z = centered @ vt[:num_components].T
    labels, centers = _two_means(z, rng)
    small = int(np.sum(labels == 1) < np.sum(labels == 0))
    dist = np.linalg.norm(z[:, None, :] - centers[None], axis=2)
    out[idx] = dist[:, 1 - small] - dist[:, small]
  return out


def _two_means(z, rng, iters: int = 50):
  """Lloyd's 2-means from a k-means++ start; (labels [n] in {0, 1}, centers [2, d])."""
  first = z[rng.integers(len(z))]
  d2 = np.sum((z - first) ** 2, 1)
  second = z[rng.choice(len(z), p=d2 / d2.sum())] if d2.sum() > 0 else first
  centers = np.stack([first, second])
  labels = np.zeros(len(z), np.int64)
  for _ in range(iters):
    labels_new = np.argmin(np.linalg.norm(z[:, None, :] - centers[None], axis=2), 1)
    for k in range(2):
      if np.any(labels_new == k):
        centers[k] = z[labels_new == k].mean(0)
    if np.array_equal(labels_new, labels):
      break
    labels = labels_new
  return labels, centers


def loss_scores(loss_fn: Any, params: Params, x_N, y_N, *, chunk: int = 1000) -> np.ndarray:
  """Each example's loss (high loss = suspicious: a flipped label fits badly), `[N]`."""
  x_N = np.asarray(x_N)
  y_N = np.asarray(y_N).astype(np.int32)
  chunk = min(chunk, len(y_N))
  out = np.zeros(len(y_N))
  for start, stop, batch in _chunks(x_N, y_N, chunk):
    out[start:stop] = np.asarray(_per_example_losses(loss_fn, params, batch))[: stop - start]
  return out


def _per_example_losses_impl(loss_fn, params, batch):
  one = lambda x, y: loss_fn(params, {"x": x[None], "y": y[None]})
  return jax.vmap(one)(batch["x"], batch["y"])


_per_example_losses = jax.jit(_per_example_losses_impl, static_argnums=0)


# ------------------------------------------------------------------ metrics


def _ranks(s: np.ndarray) -> np.ndarray:
  """0-based ranks with ties given their average rank."""
  order = np.argsort(s, kind="mergesort")
  ranks = np.empty(len(s))
  sorted_s = s[order]
  i = 0
  while i < len(s):
    j = i
    while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
      j += 1
    ranks[order[i : j + 1]] = (i + j) / 2.0
    i = j + 1
  return ranks


def _check_scores(scores_N, is_poison_N):
  scores_N = np.asarray(scores_N, np.float64)
  is_poison_N = np.asarray(is_poison_N).astype(bool)
  if scores_N.ndim != 1 or scores_N.shape != is_poison_N.shape:
    raise ValueError(f"scores and is_poison must be [N], got {scores_N.shape}, {is_poison_N.shape}")
  if not np.all(np.isfinite(scores_N)):
    raise ValueError("scores must be finite")
  return scores_N, is_poison_N


def roc_auc(scores_N, is_poison_N) -> float:
  """Area under the ROC curve: P(score of a poison > score of a clean example), ties 1/2.

  The Mann-Whitney statistic U / (P x Q) from average ranks. NaN if there are
  no poisons or no clean examples.
  """
  scores_N, pos = _check_scores(scores_N, is_poison_N)
  p, q = int(pos.sum()), int((~pos).sum())
  if p == 0 or q == 0:
    return math.nan
  ranks = _ranks(scores_N) + 1.0
  return float((ranks[pos].sum() - p * (p + 1) / 2.0) / (p * q))


def precision_at_k(scores_N, is_poison_N, k: int | None = None) -> float:
  """Fraction of poisons among the k top-scored examples (k = the true poison count if None)."""
  scores_N, pos = _check_scores(scores_N, is_poison_N)
  k = int(pos.sum()) if k is None else _validate.check_int("k", k, 0, len(scores_N))
  if k == 0:
    return math.nan
  top = np.argsort(-scores_N, kind="mergesort")[:k]
  return float(pos[top].mean())


# ------------------------------------------------------------------ filter, then retrain


class Filtered(NamedTuple):
  """What `filter_top` removed."""

  keep_N: np.ndarray  # [N] bool: examples kept
  num_removed: int
  num_poison_removed: int  # -1 when the poison mask is unknown
  num_clean_removed: int  # -1 when the poison mask is unknown


def filter_top(scores_N, num_remove: int, is_poison_N=None) -> Filtered:
  """Remove the `num_remove` top-scored examples (ties broken by index)."""
  scores_N = np.asarray(scores_N, np.float64)
  num_remove = _validate.check_int("num_remove", num_remove, 0, len(scores_N))
  keep = np.ones(len(scores_N), bool)
  keep[np.argsort(-scores_N, kind="mergesort")[:num_remove]] = False
  if is_poison_N is None:
    return Filtered(keep, num_remove, -1, -1)
  pos = np.asarray(is_poison_N).astype(bool)
  removed_poison = int(np.sum(pos & ~keep))
  return Filtered(keep, num_remove, removed_poison, num_remove - removed_poison)


def filter_then_retrain(
  spec: train_lib.TrainSpec,
  hparams: train_lib.HParams,
  key: jax.Array,
  data: dict,
  scores_N,
  num_remove: int,
  is_poison_N=None,
) -> tuple[train_lib.FitResult, Filtered]:
  """`train.fit` on `data` without its `num_remove` top-scored examples; (result, what was cut).

  The defense a detector gives: score, remove the top, retrain from scratch
  (the caller evaluates the result with its attack's metric).
  """
  filtered = filter_top(scores_N, num_remove, is_poison_N)
  kept = {k: jnp.asarray(np.asarray(v)[filtered.keep_N]) for k, v in data.items()}
  result = jax.jit(train_lib.fit, static_argnums=0)(spec, hparams, key, kept)
  return result, filtered
