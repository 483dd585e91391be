"""Tests jaxshape/accounting.py against an independent float64 reference and Opacus.

The reference below is written from the papers, not from the code under test:
the Renyi DP of the Poisson-subsampled Gaussian at integer orders (Mironov,
Talwar, Zhang 2019, §3.3), of the Gaussian (Mironov 2017, Prop. 7), and the
RDP -> (epsilon, delta) conversion of Balle et al. 2020, Prop. 12.
"""

import math

import numpy as np
import pytest

from jaxshape import accounting

ORDERS = list(range(2, 257)) + [320, 384, 512, 768, 1024]


def _logsumexp(terms):
  top = max(terms)
  return top + math.log(sum(math.exp(t - top) for t in terms))


def rdp_sampled_gaussian(q: float, sigma: float, order: int) -> float:
  """RDP at an integer order: log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)) / (a-1)."""
  if q == 1.0:
    return order / (2 * sigma**2)
  terms = [
    math.lgamma(order + 1)
    - math.lgamma(k + 1)
    - math.lgamma(order - k + 1)
    + (order - k) * math.log1p(-q)
    + k * math.log(q)
    + (k * k - k) / (2 * sigma**2)
    for k in range(order + 1)
  ]
  return _logsumexp(terms) / (order - 1)


def epsilon_from_rdp(rdp_by_order: dict[int, float], delta: float) -> float:
  """Balle et al. 2020, Prop. 12: eps = rdp + log((a-1)/a) - (log delta + log a) / (a-1)."""
  return max(
    0.0,
    min(
      r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
      for a, r in rdp_by_order.items()
    ),
  )


def reference_poisson(sigma, q, steps, delta):
  return epsilon_from_rdp({a: steps * rdp_sampled_gaussian(q, sigma, a) for a in ORDERS}, delta)


def reference_shuffle(sigma, q, steps, delta):
  epochs = math.ceil(steps * q - 1e-9)
  return epsilon_from_rdp({a: epochs * a / (2 * sigma**2) for a in ORDERS}, delta)


CASES = [  # (sigma, q, steps, delta): MNIST-like, large q, small sigma, tiny eps
  (1.1, 256 / 60_000, 15 * 60_000 // 256, 1e-5),
  (1.0, 0.1, 100, 1e-5),
  (0.5, 0.1, 50, 1e-5),
  (0.3, 0.1, 1000, 1e-5),
  (2.0, 0.01, 1000, 1e-6),
  (0.8, 1.0, 10, 1e-5),
  (8.0, 0.004, 2000, 1e-5),
]


@pytest.mark.parametrize("sigma, q, steps, delta", CASES)
def test_rdp_poisson_matches_independent_reference(sigma, q, steps, delta):
  got = accounting.epsilon(sigma, q, steps, delta)
  assert got == pytest.approx(reference_poisson(sigma, q, steps, delta), rel=1e-9)


@pytest.mark.parametrize("sigma, q, steps, delta", CASES)
def test_rdp_shuffle_matches_independent_reference(sigma, q, steps, delta):
  got = accounting.epsilon(sigma, q, steps, delta, sampling="shuffle")
  assert got == pytest.approx(reference_shuffle(sigma, q, steps, delta), rel=1e-9)


def test_shuffle_bound_far_above_poisson_in_the_usual_regime():
  # MNIST-like DP-SGD: the Poisson number under-states a shuffled run's bound many times.
  args = (1.1, 256 / 60_000, 15 * 60_000 // 256, 1e-5)
  assert accounting.epsilon(*args, sampling="shuffle") > 10 * accounting.epsilon(*args)


def test_shuffle_counts_epochs_not_steps():
  # 15 epochs of floor(N / B) steps at q = B / N touch 15 epochs, not 16.
  n, b = 10_800, 256
  assert accounting.epochs_taken_part(b / n, 15 * (n // b)) == 15
  assert accounting.epochs_taken_part(0.5, 3) == 2  # a partial epoch counts
  assert accounting.epsilon(1.0, b / n, 15 * (n // b), sampling="shuffle") == pytest.approx(
    reference_shuffle(1.0, 1.0, 15, 1e-5), rel=1e-9
  )


def test_pld_is_tighter_than_rdp_and_close_to_it():
  args = (1.1, 256 / 60_000, 15 * 60_000 // 256, 1e-5)
  pld, rdp = accounting.epsilon(*args, method="pld"), accounting.epsilon(*args)
  assert 0.8 * rdp < pld < rdp


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.1, 100), (2.0, 0.01, 1000)])
def test_agrees_with_opacus(sigma, q, steps):
  """Opacus' RDP accountant on the same integer orders, and its PRV accountant vs PLD."""
  pytest.importorskip("opacus")
  from opacus.accountants import PRVAccountant
  from opacus.accountants import RDPAccountant

  rdp = RDPAccountant()
  rdp.history = [(sigma, q, steps)]
  assert accounting.epsilon(sigma, q, steps) == pytest.approx(
    rdp.get_epsilon(1e-5, alphas=ORDERS), rel=1e-9
  )
  prv = PRVAccountant()
  prv.history = [(sigma, q, steps)]
  assert accounting.epsilon(sigma, q, steps, method="pld") == pytest.approx(
    prv.get_epsilon(1e-5), rel=0.02
  )


def test_more_noise_less_epsilon_more_steps_more_epsilon():
  e1 = accounting.epsilon(1.0, 0.01, 1000)
  assert accounting.epsilon(2.0, 0.01, 1000) < e1 < accounting.epsilon(1.0, 0.01, 4000)


def test_zero_noise_is_infinite_and_zero_steps_is_zero():
  assert accounting.epsilon(0.0, 0.01, 10) == math.inf
  assert accounting.epsilon(1.0, 0.01, 0) == 0.0
  assert accounting.epsilon(0.0, 0.01, 10, sampling="shuffle") == math.inf


def test_assumption_names_sampling_and_method():
  assert accounting.assumption().startswith("poisson sampling, RDP")
  label = accounting.assumption(sampling="shuffle", method="pld")
  assert "shuffled fixed batches" in label and "upper bound" in label and "PLD" in label


@pytest.mark.parametrize(
  "args, kwargs, name",
  [
    ((-1.0, 0.1, 10), {}, "noise_multiplier"),
    ((math.inf, 0.1, 10), {}, "noise_multiplier"),
    ((math.nan, 0.1, 10), {}, "noise_multiplier"),
    ((1.0, 0.0, 10), {}, "sample_rate"),
    ((1.0, 1.5, 10), {}, "sample_rate"),
    ((1.0, math.nan, 10), {}, "sample_rate"),
    ((1.0, 0.1, -1), {}, "steps"),
    ((1.0, 0.1, 1.5), {}, "steps"),
    ((1.0, 0.1, math.inf), {}, "steps"),
    ((1.0, 0.1, "10"), {}, "steps"),
    ((1.0, 0.1, 10, 0.0), {}, "delta"),
    ((1.0, 0.1, 10, 1.0), {}, "delta"),
    ((1.0, 0.1, 10), {"method": "moments"}, "method"),
    ((1.0, 0.1, 10), {"sampling": "uniform"}, "sampling"),
  ],
)
def test_invalid_arguments(args, kwargs, name):
  with pytest.raises(ValueError, match=name):
    accounting.epsilon(*args, **kwargs)


def test_reference_is_the_sampled_gaussian():
  # Sanity of the reference itself: q = 1 is the plain Gaussian, a / (2 sigma^2).
  np.testing.assert_allclose(rdp_sampled_gaussian(1 - 1e-12, 2.0, 5), 5 / 8, rtol=1e-6)
