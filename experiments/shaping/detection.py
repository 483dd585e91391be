"""The poison detector and its baselines on one training set, and the filter's threshold.

Every example of a training set (clean + poisons) is scored at a checkpoint by
`jaxshape.detect`: its gradient norm, its cosine with its class's robust
direction, their combination, its loss, and the representation baselines
(spectral signatures, activation clustering, on the model's features). The
filter-then-retrain defense removes the top `fraction` of the set by one of the
scores (`Config.filter_score`) and trains vanilla on the rest; a threshold on the
score does that inside a vmapped program (`threshold`).

References:
  Hong et al. 2020, §3, §7; Tran, Li, Madry 2018; Chen et al. 2018.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.shaping.config import DETECTORS
from jaxshape import detect
from jaxshape import models


def scores(model, params, x_N, y_N, num_classes: int) -> dict[str, np.ndarray]:
  """Every detector's suspicion score (higher = more suspicious) of every example, `[N]` each."""
  loss_fn = models.ClassifierLoss(model)
  grad = detect.gradient_scores(loss_fn, params, x_N, y_N, num_classes)
  feats = np.concatenate(
    [
      np.asarray(models.features(model, params, jnp.asarray(x_N[i : i + 2000])))
      for i in range(0, len(x_N), 2000)
    ]
  )
  out = {k: grad.suspicion(k) for k in ("norm", "cosine", "combined")}
  out["loss"] = detect.loss_scores(loss_fn, params, x_N, y_N)
  out["spectral"] = detect.spectral_signature_scores(feats, y_N, num_classes)
  out["activation"] = detect.activation_clustering_scores(feats, y_N, num_classes)
  return {k: np.nan_to_num(np.asarray(v, np.float64), nan=0.0) for k, v in out.items()}


def cached_scores(cache: common.ParamsCache, name: str, key: dict, compute) -> dict:
  """`compute()`'s score dict, through `cache` (a rerun does not score again)."""
  template = {k: 0 for k in DETECTORS}
  got = cache.get(name, key, template, compute)
  return {k: np.asarray(v, np.float64) for k, v in got.items()}


def aucs(scores_by_name: dict, is_poison_N) -> dict[str, float]:
  """`auc_<detector>` for every detector (NaN without poisons)."""
  return {f"auc_{k}": detect.roc_auc(scores_by_name[k], is_poison_N) for k in DETECTORS}


def threshold(scores_N, fraction: float) -> float:
  """The score t such that keeping the examples with score <= t removes the top
  round(fraction N) (more only on exact ties); inf when nothing is removed."""
  s = np.sort(np.asarray(scores_N, np.float64))[::-1]
  k = int(round(fraction * s.size))
  if k <= 0:
    return math.inf
  if k >= s.size:
    return -math.inf
  return float(s[k])
