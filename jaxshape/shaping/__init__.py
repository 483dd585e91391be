"""Gradient shaping beyond DP-SGD: mechanisms that bound orientation, not only magnitude.

Shapes: B batch; `grads_B` is a pytree like the parameters with a leading
batch axis; `*_B` one value per example.

The paper's §7 concludes that a defense must "bound gradient magnitudes and
minimize differences in orientation", and that DP-SGD's clipping does only the
first. These optax transforms shape the batch's per-example gradients and
aggregate them into the same `jaxshape.grads.ClippedSum` the clipping
transforms produce, so they chain with `add_gaussian_noise` (which divides by
the batch size B) and a base optimizer exactly like `clip_per_example`:

  centered_clip       clip each example's deviation from a reference
                      (Karimireddy, He, Jaggi 2021);
  cosine_gate         drop examples whose cosine with a reference is below a
                      threshold, clip the rest;
  trimmed_mean,       coordinate-wise trimmed mean / median of the batch
  coordinate_median   (Yin et al. 2018);
  quantile_clip       clip norm tracking a target quantile of the norms
                      (Andrew et al. 2021).

The reference of `centered_clip` and `cosine_gate` is a running average of
past aggregated updates (r <- beta r + (1 - beta) mean of the shaped batch),
kept in the state and zero at the first step. Both see each gradient only
through its norm and its dot product with r, so the per-example engine serves
them in one pass (`per_example.reweighted_sum`, given the weights from
`centered_clip_weights` / `cosine_gate_weights`); such a `ReweightedSum` is
taken as already shaped, like a `ClippedSum` by `clip_per_example`.

Inputs: per-example gradients (all examples real), `MaskedGrads` (with a mask
of real examples, e.g. a padded batch) or, for the fast path, a
`ReweightedSum` (`centered_clip`, `cosine_gate`) or a `ClippedSum` clipped at
the state's norm (`quantile_clip`). Numeric hyperparameters may be traced
(`jit`, `vmap` over a grid, `optax.inject_hyperparams`); a non-finite example
is dropped and counted.

References:
  Hong et al. 2020, §7 (the call for better gradient-shaping mechanisms).
  Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
  Optimization", ICML 2021, §4 (centered clipping).
  Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018, §3 (trimmed mean, median).
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021, §2 (quantile-based clip norm).
"""

from jaxshape.shaping._inputs import MaskedGrads
from jaxshape.shaping.adaptive_clip import QuantileClipState
from jaxshape.shaping.adaptive_clip import quantile_clip
from jaxshape.shaping.defenses import DEFENSES
from jaxshape.shaping.defenses import for_defense
from jaxshape.shaping.defenses import step_input
from jaxshape.shaping.orientation import ReferenceShapingState
from jaxshape.shaping.orientation import centered_clip
from jaxshape.shaping.orientation import centered_clip_weights
from jaxshape.shaping.orientation import cosine_gate
from jaxshape.shaping.orientation import cosine_gate_weights
from jaxshape.shaping.robust_mean import RobustAggregateState
from jaxshape.shaping.robust_mean import coordinate_median
from jaxshape.shaping.robust_mean import trimmed_mean

__all__ = [
  "DEFENSES",
  "MaskedGrads",
  "QuantileClipState",
  "ReferenceShapingState",
  "RobustAggregateState",
  "centered_clip",
  "centered_clip_weights",
  "coordinate_median",
  "cosine_gate",
  "cosine_gate_weights",
  "for_defense",
  "quantile_clip",
  "step_input",
  "trimmed_mean",
]
