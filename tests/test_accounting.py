"""Tests jaxshape/accounting.py against known values and its limits."""

import math

import pytest

from jaxshape import accounting


def test_known_value_abadi_mnist():
  # sigma 1.1, q = 256/60000, 60 epochs: TF-Privacy's tutorial reports about 3.
  steps = 60 * 60_000 // 256
  eps = accounting.epsilon(1.1, 256 / 60_000, steps, 1e-5)
  assert 2.0 < eps < 3.5


def test_pld_is_tighter_than_rdp():
  args = (1.1, 256 / 60_000, 15 * 60_000 // 256, 1e-5)
  assert accounting.epsilon(*args, method="pld") < accounting.epsilon(*args)


def test_more_noise_less_epsilon_more_steps_more_epsilon():
  e1 = accounting.epsilon(1.0, 0.01, 1000)
  assert accounting.epsilon(2.0, 0.01, 1000) < e1 < accounting.epsilon(1.0, 0.01, 4000)


def test_zero_noise_is_infinite_and_zero_steps_is_zero():
  assert accounting.epsilon(0.0, 0.01, 10) == math.inf
  assert accounting.epsilon(1.0, 0.01, 0) == 0.0


@pytest.mark.parametrize(
  "args,name",
  [
    ((-1.0, 0.1, 10), "noise_multiplier"),
    ((1.0, 0.0, 10), "sample_rate"),
    ((1.0, 1.5, 10), "sample_rate"),
    ((1.0, 0.1, -1), "steps"),
    ((1.0, 0.1, 10, 0.0), "delta"),
  ],
)
def test_invalid_arguments(args, name):
  with pytest.raises(ValueError, match=name):
    accounting.epsilon(*args)
