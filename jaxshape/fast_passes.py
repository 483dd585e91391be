"""The forward and backward passes behind `jaxshape.fast_grads`.

Shapes: B batch (b in one chunk), N chunks, D input features of a dense layer,
O outputs of a layer, H/W padded input and P/Q output height/width of a 3x3
convolution, C its input channels, K = 9·C im2col features.

A *plan* lists a supported model's layers in forward order as (name, kind)
with kind "dense" or "conv". `inputs_and_deltas` runs the model's forward pass
from its parameter dict, recording each layer's input (for a convolution: its
padded input, or its im2col patches when `fast_conv.use_patches`), and one
ordinary backward pass of `sum_i scale_i loss_i` with respect to zero offsets
added to every pre-activation. Rows are independent, so row i of a layer's
output gradient is example i's own; per-example gradients of the weights are
then products of these two (Goodfellow 2015), never formed for dense layers.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015.
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping: everything from one backward pass).
  Hong et al. 2020, Appendix C, Table 4 (the models).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxshape import fast_conv
from jaxshape import models

Params = Any
Batch = dict[str, jax.Array]
Plan = tuple[tuple[str, str], ...]

# Examples per chunk of the `lax.scan` for convolutional models. Chunking
# bounds the temporary memory of a step, and on the CPU large fresh buffers
# cost page faults on every call: for the 32x32x3 CNN at batch 100, unchunked
# 86 MB of temporaries, 22k faults and 39 ms of kernel time per step; chunks of
# 20: 18 MB, 250 faults, 2 ms. It also keeps activations in cache. Measured on
# the 2-core CPU at batch 100: chunks of 5-25 within noise of each other, 50
# about 1.5x and 100 (no chunking) 2-3x slower.
CONV_CHUNK_SIZE = 20


def layer_plan(model: Any) -> Plan | None:
  """((layer name, "dense" | "conv"), ...) in forward order, or None if unsupported."""
  kind = type(model)
  if kind is models.LR:
    return (("head", "dense"),)
  if kind is models.MLP:
    hidden = tuple((f"hidden_{i}", "dense") for i in range(len(model.hidden)))
    return hidden + (("head", "dense"),)
  if kind is models.CNN:
    if model.padding not in ("VALID", "SAME") or model.dropout_rate != 0.0:
      return None
    return (("conv_0", "conv"), ("conv_1", "conv"), ("dense_0", "dense"), ("head", "dense"))
  return None


def unsupported_reason(loss_fn: Any, params: Params, batch: Any) -> str | None:
  """Why the fast path cannot serve this call, or None if it can."""
  if type(loss_fn) is not models.ClassifierLoss:
    return f"loss_fn is a {type(loss_fn).__name__}, not a jaxshape.models.ClassifierLoss"
  plan = layer_plan(loss_fn.model)
  if plan is None:
    return f"model {loss_fn.model!r} is not an LR, MLP or CNN (VALID/SAME, no dropout)"
  if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
    return "batch is not a dict with 'x' and 'y'"
  names = [name for name, _ in plan]
  if not isinstance(params, dict) or set(params) != set(names):
    return f"params do not have exactly the layers {names}"
  for name, kind in plan:
    layer = params[name]
    if not isinstance(layer, dict) or set(layer) != {"kernel", "bias"}:
      return f"params[{name!r}] is not {{'kernel', 'bias'}}"
    if jnp.ndim(layer["kernel"]) != (4 if kind == "conv" else 2):
      return f"params[{name!r}]['kernel'] has rank {jnp.ndim(layer['kernel'])}"
  if plan[0][1] == "conv" and jnp.ndim(batch["x"]) != 4:
    return f"a CNN needs inputs [B, H, W, C], got shape {jnp.shape(batch['x'])}"
  return None


def _patched(params: Params, name: str) -> bool:
  return fast_conv.use_patches(params[name]["kernel"].shape[2])


def forward(model, plan, params, x_B, offsets):
  """Logits, each layer's input (padded input or patches for convs), each pre-activation.

  `offsets` (dict of zeros for some layers, or None) is added to those
  layers' pre-activations.
  """
  dtype = jnp.result_type(x_B, *(params[name]["kernel"] for name, _ in plan))
  h = x_B.astype(dtype)
  inputs, pre = {}, {}
  for index, (name, kind) in enumerate(plan):
    kernel, bias = params[name]["kernel"], params[name]["bias"]
    if kind == "conv":
      xpad = fast_conv.pad_same(h, model.padding)
      if _patched(params, name):
        h = fast_conv.patches_3x3(xpad)
        z = fast_conv.conv3x3_from_patches(h, kernel, bias)
      else:
        z = fast_conv.conv3x3(h, kernel, bias, model.padding)
        h = xpad
    else:
      if h.ndim != 2:
        if index > 0:  # after the convolutions: pool, then flatten
          h = fast_conv.max_pool_2x2(h)
        h = h.reshape((h.shape[0], -1))
      z = h @ kernel + bias[None, :]
    inputs[name] = h
    if offsets is not None and name in offsets:
      z = z + offsets[name]
    pre[name] = z
    h = z if index == len(plan) - 1 else jax.nn.relu(z)
  return h, inputs, pre


def inputs_and_deltas(loss_fn, params, x_B, y_B, scale_B, names=None):
  """(plan, each layer's input, gradient of `sum_i scale_i loss_i` w.r.t. its output).

  Only the layers in `names` (default: all) get output gradients, so the
  backward pass stops at the earliest of them.
  """
  model = loss_fn.model
  plan = layer_plan(model)
  shapes = jax.eval_shape(lambda: forward(model, plan, params, x_B, None)[2])
  names = tuple(shapes) if names is None else names
  zeros = {name: jnp.zeros(shapes[name].shape, shapes[name].dtype) for name in names}

  def summed_loss(offsets):
    logits_BC, inputs, _ = forward(model, plan, params, x_B, offsets)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, y_B)
    return jnp.sum(scale_B.astype(loss_B.dtype) * loss_B), inputs

  loss, pullback, inputs = jax.vjp(summed_loss, zeros, has_aux=True)
  (deltas,) = pullback(jnp.ones_like(loss))
  return plan, inputs, deltas


# ------------------------------------------------------------------ per-layer rules


def dense_sq_norms(a_BD, delta_BO, *, kernel=True, bias=True):
  """|grad of kernel and/or bias|² of each example: |delta_i|² (|a_i|² + 1)."""
  a_sq_B = jnp.sum(jnp.square(a_BD), axis=1) if kernel else 0.0
  return jnp.sum(jnp.square(delta_BO), axis=1) * (a_sq_B + (1.0 if bias else 0.0))


def conv_per_example_grads(params, name, input_B, delta_BPQO):
  """(kernel `[B, 3, 3, C, O]`, bias `[B, O]`) gradients of each example for a conv layer."""
  if _patched(params, name):
    channels = params[name]["kernel"].shape[2]
    kernel_B = fast_conv.per_example_kernel_grads_from_patches(input_B, delta_BPQO, channels)
  else:
    kernel_B = fast_conv.per_example_kernel_grads(input_B, delta_BPQO)
  return kernel_B, jnp.sum(delta_BPQO, axis=(1, 2))


def conv_grads(params, name, input_B, delta_BPQO):
  """(kernel `[3, 3, C, O]`, bias `[O]`) gradients summed over the batch for a conv layer."""
  if _patched(params, name):
    channels = params[name]["kernel"].shape[2]
    kernel = fast_conv.kernel_grad_from_patches(input_B, delta_BPQO, channels)
  else:
    kernel = fast_conv.kernel_grad(input_B, delta_BPQO)
  return kernel, jnp.sum(delta_BPQO, axis=(0, 1, 2))


def sq_norms(kernel_B, bias_BO, *, kernel=True, bias=True):
  """|materialised per-example gradient|² of each example, `[B]`."""
  sq_B = jnp.sum(jnp.square(kernel_B.reshape(kernel_B.shape[0], -1)), axis=1) if kernel else 0.0
  return sq_B + (jnp.sum(jnp.square(bias_BO), axis=1) if bias else 0.0)


def rows_where(ok_B, values):
  """`values` with the rows of examples where `ok_B` is False set to 0 (NaN-safe)."""
  ok = ok_B.reshape((-1,) + (1,) * (values.ndim - 1))
  return jnp.where(ok, values, jnp.zeros((), values.dtype))


# ------------------------------------------------------------------ batches and chunks


def per_example_weights(batch: Batch, batch_size: int):
  """(loss scale of example i alone `[B]`, keep weight `[B]`) as the vmap path defines them.

  `jax.grad(loss_fn)` on the batch of example i alone is weight_i mask_i /
  max(mask_i, 1) times the gradient of its cross-entropy; the vmap path then
  weights the clipped gradient by mask_i.
  """
  scale_B = jnp.ones((batch_size,), jnp.float32)
  keep_B = jnp.ones((batch_size,), jnp.float32)
  if "weight" in batch:
    scale_B = scale_B * batch["weight"]
  if "mask" in batch:
    mask_B = jnp.asarray(batch["mask"], jnp.float32)
    scale_B = scale_B * mask_B / jnp.maximum(mask_B, 1.0)
    keep_B = keep_B * mask_B
  return scale_B, keep_B


def chunk_size_for(loss_fn, batch_size: int, chunk_size: int | None) -> int:
  """Examples per chunk: `chunk_size`, or `CONV_CHUNK_SIZE` for CNNs and B otherwise."""
  if chunk_size is not None:
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(chunk_size, batch_size)
  if layer_plan(loss_fn.model)[0][1] == "conv":
    return min(CONV_CHUNK_SIZE, batch_size)
  return batch_size


def scan_chunks(body, carry, arrays_B, chunk: int):
  """`lax.scan` of `body(carry, arrays_b)` over chunks; outputs re-joined to `[B, ...]`.

  The batch is padded with zeros to a multiple of `chunk`; padded rows must
  contribute nothing to the carry (give them scale and keep weight 0).
  """
  batch = jax.tree.leaves(arrays_B)[0].shape[0]
  if chunk >= batch:
    return body(carry, arrays_B)
  num = -(-batch // chunk)
  pad = num * chunk - batch

  def split(a):
    a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) if pad else a
    return a.reshape((num, chunk) + a.shape[1:])

  carry, out_N = jax.lax.scan(body, carry, jax.tree.map(split, arrays_B))
  return carry, jax.tree.map(lambda o: o.reshape((num * chunk,) + o.shape[2:])[:batch], out_N)
