"""Exact per-example clipping at about the cost of one ordinary gradient.

Shapes: B batch, N chunks of b examples (B = N·b after padding), D input
features of a dense layer, O outputs of a layer, H/W input and P/Q output
height/width of a convolution, C input channels.

For a `jaxshape.models.ClassifierLoss` of the models jaxshape ships (`LR`,
`MLP` with any hidden sizes, `CNN` with "VALID" or "SAME" padding and no
dropout) this module computes per-example gradient norms, the sum of the
clipped per-example gradients, and cosines with a reference direction,
without materialising a per-example copy of any large weight:

- One forward pass records each layer's input `a`; one ordinary backward pass
  of the *summed* loss with respect to zero offsets added to every layer's
  pre-activation gives each example's output gradient `delta` (rows are
  independent, so row i is example i's own gradient).
- Dense layer: example i's kernel gradient is the outer product a_i delta_iᵀ,
  so its squared norm is |delta_i|² (|a_i|² + 1) with the bias ("ghost
  norm"), and the clipped sum is aᵀ (f ⊙ delta) with f_i = min(1, C/|g_i|).
- 3x3 convolution: per-example kernel gradients are small and cheap to
  materialise (`jaxshape.fast_conv.per_example_kernel_grads`); they are
  cheaper than the Gram-matrix ghost norm for every conv layer jaxshape has.
- Large convolutional batches are processed in chunks of b examples inside a
  `lax.scan`, which bounds the temporary memory (and, on the CPU, the time
  spent faulting in fresh buffers) without changing the result.

Anything else falls back to `jax.vmap(jax.grad(...))` (`jaxshape.grads`).
Results equal that reference path up to float rounding (tested to 1e-5
relative). The passes themselves live in `jaxshape.fast_passes` (forward,
backward, per-layer rules) and `jaxshape.fast_conv` (convolution and pooling).

Example (what `jaxshape.clipped_sum_and_norms` does by default):
  >>> loss_fn = ClassifierLoss(CNN(num_classes=10))
  >>> cs = fast_clipped_sum_and_norms(loss_fn, params, batch, l2_norm_clip=1.0)
  >>> updates, opt_state = dp_sgd(0.1, 1.0, 1.1, key).update(cs, opt_state, params)
  >>> nc = per_example_norms_and_cosines(loss_fn, params, batch, mean_grad, layer="head/kernel")

References:
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2022, §4 (ghost clipping).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping: norms and clipped sum from one backward pass).
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015 (the
  dense-layer norm identity).
  Hong et al. 2020, §3 (gradient analysis), §5.1 and Appendix B (clipping).
"""

from __future__ import annotations

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxshape import fast_passes as fp
from jaxshape import grads as grads_lib
from jaxshape import models

Params = Any
Batch = dict[str, jax.Array]
ArrayLike = jax.typing.ArrayLike

METHODS = ("auto", "vmap", "fast")


class NormsAndCosines(NamedTuple):
  """Per-example gradient norms and cosines with a reference direction."""

  norms_B: jax.Array  # [B] float32: l2 norm of each example's gradient (over the chosen layers)
  cosines_B: jax.Array  # [B] float32: cosine with the reference; NaN if either is zero


def supports(loss_fn: Any, params: Params, batch: Any) -> bool:
  """Whether the fast exact path serves `loss_fn` on these params and batch.

  True for a `jaxshape.models.ClassifierLoss` of `LR`, `MLP` or `CNN`
  (padding "VALID" or "SAME", `dropout_rate` 0) with that model's parameter
  dict and a batch dict holding `x` and `y`.
  """
  return fp.unsupported_reason(loss_fn, params, batch) is None


def _check_supported(loss_fn, params, batch, alternative: str) -> None:
  reason = fp.unsupported_reason(loss_fn, params, batch)
  if reason is not None:
    raise ValueError(f"the fast path does not support this call: {reason}; use {alternative}")


def _outer_sum(a_BD, d_BO):
  """sum_b a_b d_b^T, `[D, O]`: a dense kernel's gradient from its inputs and deltas.

  For a narrow output (O <= D / 8: LR's 784 x 2, the CNN's 4608 x 64 and
  64 x 10) it is formed as `[O, D]` and transposed; the barrier stops XLA from
  folding the transpose back. On CPU that ran 2-3x faster than contracting
  `a` over its leading axis directly, and slower for the MLP's 784 x 256
  (batch 100 and 300, measured), which keeps the direct form.
  """
  if 8 * d_BO.shape[-1] > a_BD.shape[-1]:
    return jnp.einsum("bd,bo->do", a_BD, d_BO)
  return jax.lax.optimization_barrier(jnp.einsum("bo,bd->od", d_BO, a_BD)).T


def _dense_products(plan, a_B, d_B):
  """Kernel and bias gradients of the dense layers from stacked inputs and scaled deltas."""
  return {
    name: {"kernel": _outer_sum(a_B[name], d_B[name]), "bias": d_B[name].sum(0)}
    for name, kind in plan
    if kind == "dense"
  }


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def fast_clipped_sum_and_norms(
  loss_fn: models.ClassifierLoss,
  params: Params,
  batch: Batch,
  l2_norm_clip: ArrayLike,
  *,
  chunk_size: int | None = None,
) -> grads_lib.ClippedSum:
  """`jaxshape.grads.clipped_sum_and_norms` for a `ClassifierLoss` of LR, MLP or CNN.

  Same result as the `vmap(grad)` path (up to float rounding) at about the
  cost of one ordinary gradient. An example whose gradient norm is not finite
  (NaN or inf in its input, activations or loss) is dropped with `jnp.where`,
  so it can never poison the sum.

  Args:
    loss_fn: a `ClassifierLoss` of a supported model (see `supports`).
    params: that model's parameters.
    batch: dict with `x`, `y`, optional `mask` (0 = padding) and `weight`.
    l2_norm_clip: C > 0, may be traced.
    chunk_size: examples per chunk of the scan (None:
      `fast_passes.CONV_CHUNK_SIZE` for CNNs, the whole batch otherwise).
      Structural; does not change results.

  Returns:
    A `ClippedSum`.

  Example:
    >>> cs = fast_clipped_sum_and_norms(ClassifierLoss(cnn), params, batch, 1.0)
    >>> updates, opt_state = dp_sgd(...).update(cs, opt_state, params)

  References:
    Li et al. 2022, §4; Bu et al. 2023, §3; Hong et al. 2020, Appendix B.
  """
  _check_supported(loss_fn, params, batch, "method='vmap'")
  batch_size = batch["x"].shape[0]
  scale_B, keepw_B = fp.per_example_weights(batch, batch_size)
  clip = jnp.asarray(l2_norm_clip, jnp.float32)

  def body(conv_total, chunk):
    x_b, y_b, scale_b, keepw_b = chunk
    plan, inputs, deltas = fp.inputs_and_deltas(loss_fn, params, x_b, y_b, scale_b)
    sq_b, conv_b = 0.0, {}
    for name, kind in plan:
      if kind == "dense":
        sq_b = sq_b + fp.dense_sq_norms(inputs[name], deltas[name])
      else:
        conv_b[name] = fp.conv_per_example_grads(params, name, inputs[name], deltas[name])
        sq_b = sq_b + fp.sq_norms(*conv_b[name])
    norms_b = jnp.sqrt(sq_b)
    ok_b = jnp.isfinite(sq_b) & (keepw_b != 0)
    keep_b = jnp.where(ok_b, keepw_b, 0.0)
    coef_b = jnp.where(ok_b, keepw_b * grads_lib.clip_factors(norms_b, clip), 0.0)
    new, dense_a, dense_d = {}, {}, {}
    for name, kind in plan:
      if kind == "dense":  # products formed once after the scan, with all B rows
        dense_a[name] = fp.rows_where(ok_b, inputs[name])
        scaled_bO = deltas[name] * coef_b[:, None].astype(deltas[name].dtype)
        dense_d[name] = fp.rows_where(ok_b, scaled_bO)
      else:
        kernel_b, bias_bO = conv_b[name]
        c_b = coef_b.astype(bias_bO.dtype)
        new[name] = {
          "kernel": jnp.einsum("b,bijco->ijco", c_b, fp.rows_where(ok_b, kernel_b)),
          "bias": jnp.einsum("b,bo->o", c_b, fp.rows_where(ok_b, bias_bO)),
        }
    conv_total = jax.tree.map(jnp.add, conv_total, new)
    return conv_total, (norms_b, keep_b, dense_a, dense_d)

  plan = fp.layer_plan(loss_fn.model)
  conv_zeros = {n: jax.tree.map(jnp.zeros_like, params[n]) for n, k in plan if k == "conv"}
  arrays_B = (batch["x"], batch["y"], scale_B, keepw_B)
  chunk = fp.chunk_size_for(loss_fn, batch_size, chunk_size)
  conv_total, (norms_B, keep_B, a_B, d_B) = fp.scan_chunks(body, conv_zeros, arrays_B, chunk)
  total = {**conv_total, **_dense_products(plan, a_B, d_B)}
  return grads_lib.ClippedSum(total, norms_B.astype(jnp.float32), keep_B, clip)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def fast_grad(
  loss_fn: models.ClassifierLoss,
  params: Params,
  batch: Batch,
  *,
  chunk_size: int | None = None,
) -> Params:
  """`jax.grad(loss_fn)(params, batch)` through the same passes as the fast clipped sum.

  The ordinary (non-private) gradient of the mean loss, computed with the
  forward pass, backward pass and weight-gradient formulation of
  `fast_clipped_sum_and_norms` minus the per-example norms and clipping: the
  honest baseline for the cost of a DP step, and a faster plain gradient for
  the CNN on the CPU (no `select_and_scatter`, chunked convolutions).

  Example:
    >>> grads = fast_grad(ClassifierLoss(cnn), params, batch)

  References:
    Hong et al. 2020, Appendix C (the models).
  """
  _check_supported(loss_fn, params, batch, "jax.grad")
  batch_size = batch["x"].shape[0]
  scale_B = jnp.ones((batch_size,), jnp.float32)
  if "weight" in batch:
    scale_B = scale_B * batch["weight"]
  count = batch_size
  if "mask" in batch:
    scale_B = scale_B * batch["mask"]
    count = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
  scale_B = scale_B / count

  def body(conv_total, chunk):
    x_b, y_b, scale_b = chunk
    plan, inputs, deltas = fp.inputs_and_deltas(loss_fn, params, x_b, y_b, scale_b)
    new, dense_a, dense_d = {}, {}, {}
    for name, kind in plan:
      if kind == "dense":
        dense_a[name], dense_d[name] = inputs[name], deltas[name]
      else:
        kernel, bias = fp.conv_grads(params, name, inputs[name], deltas[name])
        new[name] = {"kernel": kernel, "bias": bias}
    return jax.tree.map(jnp.add, conv_total, new), (dense_a, dense_d)

  plan = fp.layer_plan(loss_fn.model)
  conv_zeros = {n: jax.tree.map(jnp.zeros_like, params[n]) for n, k in plan if k == "conv"}
  chunk = fp.chunk_size_for(loss_fn, batch_size, chunk_size)
  arrays_B = (batch["x"], batch["y"], scale_B)
  conv_total, (a_B, d_B) = fp.scan_chunks(body, conv_zeros, arrays_B, chunk)
  return {**conv_total, **_dense_products(plan, a_B, d_B)}


# ------------------------------------------------------------------ norms and cosines


def _selection(params: Params, layer: str | None) -> dict[str, tuple[bool, bool]]:
  """{layer name: (kernel included, bias included)} for `layer` ("name" or "name/part")."""
  if layer is None:
    return {name: (True, True) for name in params}
  name, _, part = layer.partition("/")
  if name not in params or part not in ("", "kernel", "bias"):
    raise ValueError(
      f"layer must be None, a layer name or 'name/kernel' / 'name/bias' with name in "
      f"{sorted(params)}, got {layer!r}"
    )
  return {name: (part in ("", "kernel"), part in ("", "bias"))}


def _selected_leaves(tree: Params, selection: dict[str, tuple[bool, bool]]) -> list[jax.Array]:
  leaves = []
  for name, (kernel, bias) in selection.items():
    leaves += ([tree[name]["kernel"]] if kernel else []) + ([tree[name]["bias"]] if bias else [])
  return leaves


def _cosines(dots_B, norms_B, reference_norm):
  """dot / (|g| |r|), NaN where either norm is 0 (as `jaxshape.analysis.ratio_and_cosine`)."""
  denom_B = norms_B * reference_norm
  return dots_B / jnp.where(denom_B > 0, denom_B, jnp.nan)


@functools.partial(jax.jit, static_argnames=("loss_fn", "layer", "chunk_size"))
def _fast_norms_and_cosines(loss_fn, params, batch, reference, layer, chunk_size):
  selection = _selection(params, layer)
  batch_size = batch["x"].shape[0]
  scale_B, _ = fp.per_example_weights(batch, batch_size)
  ref_leaves = _selected_leaves(reference, selection)
  reference_norm = jnp.sqrt(sum(jnp.sum(jnp.square(r)) for r in ref_leaves))

  def body(carry, chunk):
    x_b, y_b, scale_b = chunk
    plan, inputs, deltas = fp.inputs_and_deltas(
      loss_fn, params, x_b, y_b, scale_b, names=tuple(selection)
    )
    sq_b, dot_b = 0.0, 0.0
    for name, kind in plan:
      if name not in selection:
        continue
      kernel, bias = selection[name]
      a, delta, ref = inputs[name], deltas[name], reference[name]
      if kind == "dense":
        sq_b = sq_b + fp.dense_sq_norms(a, delta, kernel=kernel, bias=bias)
        if kernel:
          dot_b = dot_b + jnp.einsum("bo,bo->b", a @ ref["kernel"], delta)
      else:
        kernel_b33CO, bias_bO = fp.conv_per_example_grads(params, name, a, delta)
        sq_b = sq_b + fp.sq_norms(kernel_b33CO, bias_bO, kernel=kernel, bias=bias)
        if kernel:
          dot_b = dot_b + jnp.einsum("bijco,ijco->b", kernel_b33CO, ref["kernel"])
        delta = bias_bO
      if bias:
        dot_b = dot_b + delta @ ref["bias"]
    norms_b = jnp.sqrt(sq_b)
    return carry, (norms_b, _cosines(dot_b, norms_b, reference_norm))

  chunk = fp.chunk_size_for(loss_fn, batch_size, chunk_size)
  _, (norms_B, cosines_B) = fp.scan_chunks(body, (), (batch["x"], batch["y"], scale_B), chunk)
  return NormsAndCosines(norms_B, cosines_B)


def _vmap_norms_and_cosines(loss_fn, params, batch, reference, layer):
  selection = _selection(params, layer)
  grads_B = grads_lib.per_example_grads(loss_fn, params, batch)
  g_leaves = _selected_leaves(grads_B, selection)
  r_leaves = _selected_leaves(reference, selection)
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
  chunk_size: int | None = None,
) -> NormsAndCosines:
  """Each example's gradient norm and its cosine with a reference direction.

  The gradient of example i is `jax.grad(loss_fn)` on example i alone (as in
  `per_example_grads`). For a supported `ClassifierLoss` both come from one
  forward and one backward pass, without per-example gradients of any large
  weight; otherwise from `per_example_grads`.

  Args:
    loss_fn: mean loss `loss_fn(params, batch)`.
    params: parameters.
    batch: dict with `x`, `y` (optional `mask`, `weight`).
    reference: a direction shaped like `params` (e.g. the mean clean gradient
      or a poison's gradient); only the chosen layers are read.
    layer: None for the whole gradient; a layer name (e.g. "head", kernel and
      bias); or "name/kernel" / "name/bias" for one parameter, e.g.
      "head/kernel", the last layer's kernel view of the paper's §3.
    method: "auto" (fast when supported, else vmap), "fast" or "vmap".
    chunk_size: as in `fast_clipped_sum_and_norms`.

  Returns:
    `NormsAndCosines(norms_B, cosines_B)`; a cosine is NaN where the
    example's gradient or the reference is zero (as in
    `jaxshape.analysis.ratio_and_cosine`) or not finite.

  Example:
    >>> mean_g = jax.grad(loss_fn)(params, clean_batch)
    >>> nc = per_example_norms_and_cosines(loss_fn, params, batch, mean_g, layer="head")

  References:
    Hong et al. 2020, §3 (gradient magnitudes and orientations of poisons).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  _selection(params, layer)  # validates `layer`
  if method != "vmap":
    reason = fp.unsupported_reason(loss_fn, params, batch)
    if reason is None:
      return _fast_norms_and_cosines(loss_fn, params, batch, reference, layer, chunk_size)
    if method == "fast":
      raise ValueError(f"the fast path does not support this call: {reason}")
  return _vmap_norms_and_cosines(loss_fn, params, batch, reference, layer)
