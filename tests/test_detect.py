"""Tests jaxshape/detect.py: the metrics against hand-computed values, the gradient detector on
a synthetic label flip with a known answer (flipped examples point against their class: AUC 1),
the baselines on planted structure, filter-then-retrain, and invalid inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import detect
from jaxshape import grads
from jaxshape import models
from jaxshape import train

D, N_CLEAN, N_POISON = 8, 60, 6
LOSS = models.ClassifierLoss(models.LR(num_classes=2))


@pytest.fixture(scope="module")
def flip():
  """Two Gaussian classes at -mu, +mu; the last N_POISON are class-0 inputs labelled 1.

  The model separates the clean classes (head = +-mu / 4, p(correct) ~ 0.9), so a flipped example's gradient
  (p - e_1) x with x ~ -mu points against every clean class-1 gradient: cosine near -1.
  """
  rng = np.random.default_rng(0)
  mu = np.zeros(D)
  mu[0] = 2.0
  y_clean = rng.integers(0, 2, N_CLEAN)
  x_clean = (2 * y_clean[:, None] - 1) * mu + 0.5 * rng.normal(size=(N_CLEAN, D))
  x_poison = -mu + 0.5 * rng.normal(size=(N_POISON, D))
  x = np.concatenate([x_clean, x_poison]).astype(np.float32)
  y = np.concatenate([y_clean, np.ones(N_POISON, int)]).astype(np.int32)
  is_poison = np.arange(len(y)) >= N_CLEAN
  params = {
    "head": {
      "kernel": jnp.asarray(0.25 * np.stack([-mu, mu], 1), jnp.float32),
      "bias": jnp.zeros(2),
    }
  }
  scores = detect.gradient_scores(LOSS, params, x, y, 2, chunk=32)
  return x, y, is_poison, params, scores


def test_gradient_scores_separate_a_label_flip(flip):
  _, _, is_poison, _, scores = flip
  assert detect.roc_auc(scores.suspicion("cosine"), is_poison) == 1.0
  assert detect.roc_auc(scores.suspicion("combined"), is_poison) == 1.0
  assert detect.precision_at_k(scores.suspicion("combined"), is_poison) == 1.0
  assert np.all(scores.cosines_N[is_poison] < 0) and np.all(scores.cosines_N[~is_poison] > 0)


def test_gradient_scores_match_numpy(flip):
  """Norms, the clipped-at-median class directions and cosines from single-example gradients."""
  x, y, _, params, scores = flip
  g_N = grads.per_example_grads(LOSS, params, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
  rows = np.concatenate(
    [np.asarray(v, np.float64).reshape(len(y), -1) for v in jax.tree.leaves(g_N)], 1
  )
  norms = np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(scores.norms_N, norms, rtol=1e-4)
  for c in (0, 1):
    idx = y == c
    m = np.median(norms[idx])
    r = np.mean(rows[idx] * np.minimum(1.0, m / norms[idx])[:, None], 0)
    want = rows[idx] @ r / (norms[idx] * np.linalg.norm(r))
    np.testing.assert_allclose(scores.cosines_N[idx], want, rtol=1e-3, atol=1e-4)


def test_loss_ranking_and_filter_then_retrain(flip):
  x, y, is_poison, params, _ = flip
  losses = detect.loss_scores(LOSS, params, x, y, chunk=32)
  one = float(LOSS(params, {"x": x[:1], "y": y[:1]}))
  np.testing.assert_allclose(losses[0], one, rtol=1e-5)
  assert detect.roc_auc(losses, is_poison) == 1.0
  spec = train.TrainSpec(LOSS, optimizer="sgd", batch_size=16, epochs=1)
  result, cut = detect.filter_then_retrain(
    spec, train.HParams.create(0.1), jax.random.key(0), {"x": x, "y": y}, losses, 8, is_poison
  )
  assert (cut.num_removed, cut.num_poison_removed, cut.num_clean_removed) == (8, 6, 2)
  assert int(cut.keep_N.sum()) == len(y) - 8
  assert np.all(np.isfinite(result.records["train_loss"]))


def test_roc_auc_and_precision_by_hand():
  s, p = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
  assert detect.roc_auc(s, p) == 0.75  # poison pairs won: (0.35>0.1), (0.8>both): 3 of 4
  assert detect.roc_auc([1.0, 1.0, 1.0], [0, 1, 0]) == 0.5  # ties count 1/2
  assert math.isnan(detect.roc_auc([1.0, 2.0], [0, 0]))
  assert detect.precision_at_k(s, p) == 0.5  # top 2: 0.8 (poison), 0.4 (clean)
  assert detect.precision_at_k(s, p, k=1) == 1.0
  np.testing.assert_allclose(detect.mean_rank([3.0, 1.0, 2.0], [1.0, 2.0, 3.0]), [0.5, 0.25, 0.75])


def _planted(seed=0, n=80, k=8, f=20):
  """Features of one class with k rows shifted along a hidden direction (the signature)."""
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, f))
  direction = rng.normal(size=f)
  feats[:k] += 4.0 * direction / np.linalg.norm(direction) * np.sqrt(f) / 2
  return feats, np.zeros(n, np.int32), np.arange(n) < k


def test_spectral_signature_and_activation_clustering_find_a_planted_shift():
  feats, y, is_poison = _planted()
  assert detect.roc_auc(detect.spectral_signature_scores(feats, y, 1), is_poison) > 0.99
  ac = detect.activation_clustering_scores(feats, y, 1, num_components=5)
  assert detect.roc_auc(ac, is_poison) > 0.99
  assert np.all(ac[is_poison] > 0) and np.mean(ac[~is_poison] > 0) < 0.1


def test_filter_top_ties_and_unknown_mask():
  cut = detect.filter_top([1.0, 3.0, 3.0, 0.0], 2)
  np.testing.assert_array_equal(cut.keep_N, [True, False, False, True])
  assert cut.num_poison_removed == -1


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: detect.roc_auc([1.0, 2.0], [1]), "scores"),
    (lambda: detect.roc_auc([1.0, np.nan], [1, 0]), "finite"),
    (lambda: detect.precision_at_k([1.0, 2.0], [1, 0], k=3), "k"),
    (lambda: detect.filter_top([1.0], 2), "num_remove"),
    (lambda: detect.spectral_signature_scores(np.zeros((3, 2)), [0, 1, 2], 2), "labels"),
    (lambda: detect.gradient_scores(LOSS, {}, np.zeros((2, 8)), [0], 2), "shapes"),
    (lambda: detect.GradientScores(np.zeros(1), np.zeros(1)).suspicion("x"), "kind"),
    (lambda: detect.mean_rank(), "at least one"),
  ],
)
def test_invalid_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
