"""Fast exact per-example gradient norms and clipped sums for Flax linen models.

Shapes: B batch; `*_B` one value per example.

For a loss object (`PerExampleLoss(model, fn)`, or `jaxshape.models.ClassifierLoss`
of any Flax linen model) the engine computes each example's gradient norm,
the sum of the per-example gradients clipped to C, the ordinary gradient and
per-example cosines with a reference direction, from one forward and one
ordinary backward pass, without materialising a per-example copy of any
large weight (Li et al. 2022 ghost clipping; Bu et al. 2023 book-keeping):

- `nn.Dense`, `nn.DenseGeneral`: ghost norm |a_i| |delta_i|, or with extra
  input axes (attention) the Gram form or the materialised gradient,
  whichever is cheaper; clipped sum = one ordinary weight gradient.
- `nn.Conv` (any kernel, stride, padding, dilation; no feature groups):
  per-example kernels from strided slices of the padded input, or the Gram
  form where cheaper.
- `nn.Embed`: sum over equal ids of delta products; clipped sum by scatter.
- `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`: tiny per-example scale/bias
  gradients, materialised.
- Any other parameter (unknown layers, layers called more than once) gets
  exact per-example gradients by `vmap(grad)` for those parameters only;
  `fallback_layers` names them and a log line says so once.
- BatchNorm in training mode mixes examples: a ValueError names it.

Results equal the reference `jaxshape.grads` path (a `vmap` of `jax.grad`
over single examples) up to float rounding, norms included for gradients
whose entries would overflow when squared.

Example:
  >>> loss_fn = ClassifierLoss(MyFlaxModel())
  >>> cs = clipped_sum_and_norms(loss_fn, params, batch, l2_norm_clip=1.0)
  >>> updates, opt_state = dp_sgd(0.1, 1.0, 1.1, key).update(cs, opt_state, params)

References:
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2022, §4 (ghost clipping).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping, mixed ghost clipping).
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015.
  Hong et al. 2020, §3 (gradient analysis), §5.1 and Appendix B (clipping).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxshape import grads as grads_lib
from jaxshape._typing import Batch
from jaxshape._typing import Params
from jaxshape.per_example import _capture
from jaxshape.per_example import _engine
from jaxshape.per_example._loss import PerExampleLoss

METHODS = ("auto", "vmap", "fast")

__all__ = [
  "METHODS",
  "NormsAndCosines",
  "PerExampleLoss",
  "ReweightedSum",
  "clipped_sum_and_norms",
  "fallback_layers",
  "fast_grad",
  "per_example_norms_and_cosines",
  "reweighted_sum",
  "supports",
]


class NormsAndCosines(NamedTuple):
  """Per-example gradient norms and cosines with a reference direction."""

  norms_B: jax.Array  # [B] float32: l2 norm of each example's gradient (over the chosen layers)
  cosines_B: jax.Array  # [B] float32: cosine with the reference; NaN if either is zero


def supports(loss_fn: Any, batch: Any) -> bool:
  """Whether the engine serves `loss_fn` (a `PerExampleLoss`) on a dict batch."""
  return isinstance(loss_fn, PerExampleLoss) and isinstance(batch, dict)


def _check_method(method: str, loss_fn: Any, batch: Any) -> bool:
  """True to take the engine, False for the vmap path; ValueError if impossible."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "vmap":
    return False
  if supports(loss_fn, batch):
    return True
  if method == "fast":
    raise ValueError(
      "method='fast' needs loss_fn to be a jaxshape.per_example.PerExampleLoss (e.g. "
      f"jaxshape.models.ClassifierLoss) and batch a dict, got {type(loss_fn).__name__} and "
      f"{type(batch).__name__}; use method='vmap'"
    )
  return False


def fallback_layers(loss_fn: PerExampleLoss, params: Params, batch: Batch) -> tuple[str, ...]:
  """Parameter leaves ("layer/name") whose per-example gradients go through `vmap(grad)`.

  Empty when every parameterised layer of the model has a fast rule.

  Example:
    >>> fallback_layers(ClassifierLoss(model), params, batch)
    ('Block_0/alpha',)
  """
  if not supports(loss_fn, batch):
    raise ValueError("loss_fn must be a PerExampleLoss and batch a dict")
  return tuple("/".join(p) for p in _capture.plan(loss_fn, params, batch).fallback)


_fast_clipped_sum = jax.jit(_engine.clipped_sum, static_argnums=0)


def clipped_sum_and_norms(
  loss_fn: Any,
  params: Params,
  batch: Batch,
  l2_norm_clip: jax.typing.ArrayLike,
  *,
  method: str = "auto",
) -> grads_lib.ClippedSum:
  """Sum of per-example gradients clipped to `l2_norm_clip`, with each example's norm.

  Examples whose `batch["mask"]` is 0 (padding) or whose gradient is not
  finite are left out of the sum and have mask 0 in the result.

  Args:
    loss_fn: mean loss `loss_fn(params, batch)`; a `PerExampleLoss` (e.g.
      `jaxshape.models.ClassifierLoss`) takes the fast engine, any other
      (hashable) loss function the reference `vmap(grad)` path.
    params: parameters.
    batch: a pytree of arrays with a leading axis B (a dict; `mask` optional).
    l2_norm_clip: C > 0, may be traced (e.g. `vmap` over a vector of C).
    method: "auto" (engine when supported, else vmap), "fast" (raise if
      unsupported) or "vmap" (always the reference path).

  Returns:
    A `ClippedSum` (sum, norms before clipping, mask of examples kept, C).

  Example:
    >>> cs = clipped_sum_and_norms(ClassifierLoss(model), params, batch, 1.0)
    >>> mean_clipped = jax.tree.map(lambda g: g / batch["x"].shape[0], cs.sum)

  References:
    Hong et al. 2020, Appendix B, Algorithm 1 (clip, then sum).
    Li et al. 2022, §4 and Bu et al. 2023, §3 (the fast engine).
  """
  if _check_method(method, loss_fn, batch):
    return _fast_clipped_sum(loss_fn, params, batch, l2_norm_clip)
  mask_B = batch.get("mask") if isinstance(batch, dict) else None
  grads_B = grads_lib.per_example_grads(loss_fn, params, batch)
  return grads_lib.clipped_sum_from_grads(grads_B, l2_norm_clip, mask_B)


@functools.partial(jax.jit, static_argnums=0)
def fast_grad(loss_fn: PerExampleLoss, params: Params, batch: Batch) -> Params:
  """`jax.grad(loss_fn)(params, batch)` through the engine's passes.

  The ordinary gradient of the mean loss with the forward pass, backward pass
  and weight-gradient formulation of `clipped_sum_and_norms` minus the norms
  and clipping: the honest baseline for the cost of a DP step.

  Example:
    >>> grads = fast_grad(ClassifierLoss(model), params, batch)
  """
  _check_method("fast", loss_fn, batch)
  return _engine.mean_grad(loss_fn, params, batch)


def _cosines(dots_B, norms_B, reference_norm):
  """dot / (|g| |r|), NaN where either norm is 0 (as `jaxshape.analysis.ratio_and_cosine`)."""
  denom_B = norms_B * reference_norm
  return dots_B / jnp.where(denom_B > 0, denom_B, jnp.nan)


def _selected_leaves(tree: Params, layer: str | None) -> list[jax.Array]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
  return [
    leaf
    for name, (_, leaf) in zip(names, flat, strict=True)
    if layer is None or name == layer or name.startswith(layer + "/")
  ]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _fast_norms_and_cosines(loss_fn, params, batch, reference, layer):
  norms_B, dots_B = _engine.norms_and_dots(loss_fn, params, batch, reference, layer)
  ref = _selected_leaves(reference, layer)
  reference_norm = jnp.sqrt(sum(jnp.sum(jnp.square(r)) for r in ref))
  return NormsAndCosines(norms_B, _cosines(dots_B, norms_B, reference_norm))


def _vmap_norms_and_cosines(loss_fn, params, batch, reference, layer):
  g_leaves = _selected_leaves(grads_lib.per_example_grads(loss_fn, params, batch), layer)
  r_leaves = _selected_leaves(reference, layer)
  norms_B = grads_lib.per_example_norms(g_leaves)
  dots_B = sum(
    jnp.einsum("bk,k->b", g.reshape(g.shape[0], -1), r.reshape(-1))
    for g, r in zip(g_leaves, r_leaves, strict=True)
  )
  reference_norm = jnp.sqrt(sum(jnp.sum(jnp.square(r)) for r in r_leaves))
  return NormsAndCosines(norms_B, _cosines(dots_B, norms_B, reference_norm))


def per_example_norms_and_cosines(
  loss_fn: Any,
  params: Params,
  batch: Batch,
  reference: Params,
  *,
  layer: str | None = None,
  method: str = "auto",
) -> NormsAndCosines:
  """Each example's gradient norm and its cosine with a reference direction.

  The gradient of example i is `jax.grad(loss_fn)` on example i alone (as in
  `jaxshape.per_example_grads`).

  Args:
    loss_fn: mean loss `loss_fn(params, batch)` (a `PerExampleLoss` for the
      fast engine).
    params: parameters.
    batch: dict with the model input, labels, optional `mask` and `weight`.
    reference: a direction shaped like `params` (e.g. the mean clean gradient
      or a poison's gradient); only the chosen parameters are read.
    layer: None for the whole gradient; a parameter path ("head" for a
      layer's kernel and bias, "head/kernel" for one leaf), e.g. the last
      layer's kernel view of the paper's §3.
    method: "auto", "fast" or "vmap" (as in `clipped_sum_and_norms`).

  Returns:
    `NormsAndCosines(norms_B, cosines_B)`; a cosine is NaN where the
    example's gradient or the reference is zero or not finite.

  Example:
    >>> mean_g = jax.grad(loss_fn)(params, clean_batch)
    >>> nc = per_example_norms_and_cosines(loss_fn, params, batch, mean_g, layer="head")

  References:
    Hong et al. 2020, §3 (gradient magnitudes and orientations of poisons).
  """
  if not _selected_leaves(params, layer):
    raise ValueError(f"layer must be None or a parameter path such as 'head/kernel', got {layer!r}")
  if _check_method(method, loss_fn, batch):
    return _fast_norms_and_cosines(loss_fn, params, batch, reference, layer)
  return _vmap_norms_and_cosines(loss_fn, params, batch, reference, layer)


class ReweightedSum(NamedTuple):
  """sum_i w_i g_i with each example's norm, dot product with a reference and weight."""

  sum: Params  # like params: sum over kept examples of w_i g_i
  norms_B: jax.Array  # [B] float32: l2 norm of each example's gradient
  dots_B: jax.Array  # [B] float32: <g_i, reference>
  mask_B: jax.Array  # [B] float32: 1 for real examples with finite gradients, else 0
  weights_B: jax.Array  # [B] float32: w_i (0 where mask_B is 0)


def _vmap_reweighted_sum(loss_fn, params, batch, reference, weights_fn):
  grads_B = grads_lib.per_example_grads(loss_fn, params, batch)
  norms_B = grads_lib.per_example_norms(grads_B)
  dots_B = sum(
    jnp.einsum("bk,k->b", g.reshape(g.shape[0], -1), r.reshape(-1))
    for g, r in zip(jax.tree.leaves(grads_B), jax.tree.leaves(reference), strict=True)
  )
  keep_B = grads_lib.finite_mask(grads_B) * jnp.isfinite(dots_B)
  if isinstance(batch, dict) and "mask" in batch:
    keep_B = keep_B * batch["mask"]
  ok_B = keep_B > 0
  w_B = jnp.where(
    ok_B, weights_fn(jnp.where(ok_B, norms_B, 0.0), jnp.where(ok_B, dots_B, 0.0)), 0.0
  )
  w_B = w_B * keep_B
  total = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads_lib.scale_per_example(grads_B, w_B))
  return ReweightedSum(total, norms_B, dots_B, keep_B.astype(jnp.float32), w_B)


def reweighted_sum(
  loss_fn: Any,
  params: Params,
  batch: Batch,
  reference: Params,
  weights_fn: Any,
  *,
  method: str = "auto",
) -> ReweightedSum:
  """sum_i w_i g_i where w_i = weights_fn(||g_i||, <g_i, reference>), in one pass.

  The fast path of shaping mechanisms that see each gradient only through its
  norm and its dot product with a reference (`jaxshape.shaping`: centered
  clipping, cosine gating): with the engine it costs a clipped sum plus the
  dot products, and no per-example gradient is materialised. `weights_fn`
  maps `(norms_B, dots_B)` to `[B]` weights elementwise (it is traced, not
  jitted separately: call this inside a jitted step). Examples with mask 0 or
  a non-finite gradient get weight 0 and mask 0.

  Example:
    >>> rs = reweighted_sum(loss_fn, params, batch, ref, lambda n, d: jnp.minimum(1, 1 / n))

  References:
    Bu et al. 2023, §3 (book-keeping); Karimireddy, He, Jaggi 2021 (centered
    clipping as a reweighted sum).
  """
  if _check_method(method, loss_fn, batch):
    return ReweightedSum(*_engine.reweighted_sum(loss_fn, params, batch, reference, weights_fn))
  return _vmap_reweighted_sum(loss_fn, params, batch, reference, weights_fn)
