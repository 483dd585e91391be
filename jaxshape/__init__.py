"""jaxshape: gradient shaping against data poisoning, in JAX.

Per-example gradients, optax transforms that clip and noise them (and the
paper's proposed adaptive noise), the paper's models, a pure training loop,
poisoning attacks and the experiments of Hong et al. 2020, "On the
Effectiveness of Mitigating Data Poisoning Attacks with Gradient Shaping".
"""

from jaxshape import accounting
from jaxshape import analysis
from jaxshape import models
from jaxshape import per_example
from jaxshape import report
from jaxshape import results
from jaxshape import sweep
from jaxshape import train
from jaxshape.grads import ClippedSum
from jaxshape.grads import per_example_grads
from jaxshape.grads import per_example_norms
from jaxshape.per_example import NormsAndCosines
from jaxshape.per_example import PerExampleLoss
from jaxshape.per_example import clipped_sum_and_norms
from jaxshape.per_example import fallback_layers
from jaxshape.per_example import fast_grad
from jaxshape.per_example import per_example_norms_and_cosines
from jaxshape.transforms import AddAdaptiveNoiseState
from jaxshape.transforms import AddGaussianNoiseState
from jaxshape.transforms import ClipPerExampleState
from jaxshape.transforms import add_adaptive_noise
from jaxshape.transforms import add_gaussian_noise
from jaxshape.transforms import clip_per_example
from jaxshape.transforms import dp_adam
from jaxshape.transforms import dp_sgd

__version__ = "0.1.0"

__all__ = [
  "AddAdaptiveNoiseState",
  "AddGaussianNoiseState",
  "ClipPerExampleState",
  "ClippedSum",
  "NormsAndCosines",
  "PerExampleLoss",
  "accounting",
  "analysis",
  "add_adaptive_noise",
  "add_gaussian_noise",
  "clip_per_example",
  "clipped_sum_and_norms",
  "dp_adam",
  "dp_sgd",
  "fallback_layers",
  "fast_grad",
  "models",
  "per_example",
  "per_example_grads",
  "per_example_norms",
  "per_example_norms_and_cosines",
  "report",
  "results",
  "sweep",
  "train",
]
