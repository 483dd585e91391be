"""Privacy accounting: epsilon of DP-SGD for (noise multiplier, sampling rate, steps, delta).

The paper ignores the accountant (§6.1 uses DP optimizers as a defense only);
a DP user still expects the epsilon beside every DP result, so experiments
report it. Each step is a Poisson-subsampled Gaussian mechanism; the
composition is computed with Google's dp-accounting library by Renyi DP
(default) or privacy loss distributions (`method="pld"`, tighter).

References:
  Hong et al. 2020, Appendix B; Abadi et al. 2016 (moments accountant);
  Mironov 2017 (Renyi DP).
"""

from __future__ import annotations

import math


def epsilon(
  noise_multiplier: float,
  sample_rate: float,
  steps: int,
  delta: float = 1e-5,
  *,
  method: str = "rdp",
) -> float:
  """Epsilon after `steps` Poisson-subsampled Gaussian steps at `delta`.

  Args:
    noise_multiplier: sigma >= 0 (noise std on the sum / clip norm). 0 gives inf.
    sample_rate: batch size / dataset size, in (0, 1].
    steps: number of DP steps, >= 0 (0 gives 0).
    delta: target delta in (0, 1).
    method: "rdp" (Renyi DP) or "pld" (privacy loss distributions).

  Returns:
    Epsilon as a Python float (`math.inf` when sigma = 0).

  Example:
    >>> epsilon(1.1, 256 / 60_000, 15 * 60_000 // 256, 1e-5)  # about 1.2
  """
  for name, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
    if isinstance(value, float | int) and math.isnan(value):
      raise ValueError(f"{name} must not be NaN")
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if not 0 < sample_rate <= 1:
    raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
  if steps < 0 or int(steps) != steps:
    raise ValueError(f"steps must be a whole number >= 0, got {steps}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if method not in ("rdp", "pld"):
    raise ValueError(f"method must be 'rdp' or 'pld', got {method!r}")
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  import dp_accounting  # imported here: it takes seconds and most users never call this

  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(
      float(sample_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
    ),
    int(steps),
  )
  if method == "rdp":
    accountant = dp_accounting.rdp.RdpAccountant()
  else:
    accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(event)
  return float(accountant.get_epsilon(delta))
