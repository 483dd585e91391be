"""Rules for dense layers (`nn.Dense`, `nn.DenseGeneral`) and embeddings (`nn.Embed`).

Shapes: B batch, T positions of an input with extra axes (flattened), D input
features, O output features, V vocabulary size, F embedding features.

Dense. Example i's kernel gradient is sum_t a_it delta_itᵀ. Without extra
axes it is one outer product, so its norm is |a_i| |delta_i| ("ghost norm",
Goodfellow 2015). With T positions it is either the Gram form
sum_{t,s} (a_it·a_is)(delta_it·delta_is), costing T²(D+O) per example, or
the materialised D x O gradient, costing T·D·O; the cheaper is taken (Li et
al. 2022, §4; Bu et al. 2023, "mixed ghost clipping"). The clipped sum is
the ordinary kernel gradient with each example's rows of delta scaled by its
clip factor: one matrix product (book-keeping, Bu et al. 2023, §3).

Embed. Example i's gradient adds delta_it to row id_it, so its squared norm is
sum_{t,s} [id_it = id_is] delta_it·delta_is and the clipped sum is one
scatter-add of the scaled deltas.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015.
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2022, §4 (ghost clipping, the Gram form).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping, mixed ghost clipping).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxshape.per_example import _norms


def _outer_sum(a_BD: jax.Array, d_BO: jax.Array) -> jax.Array:
  """sum_b a_b d_bᵀ, `[D, O]`.

  For a narrow output (O <= D / 8, e.g. 784 x 2 or 4608 x 64) it is formed
  as `[O, D]` and transposed (the barrier stops XLA folding the transpose
  back): 2-3x faster on the CPU than contracting `a` over its leading axis,
  and slower for 784 x 256, which keeps the direct form (measured).
  """
  if 8 * d_BO.shape[-1] > a_BD.shape[-1]:
    return jnp.einsum("bd,bo->do", a_BD, d_BO)
  return jax.lax.optimization_barrier(jnp.einsum("bo,bd->od", d_BO, a_BD)).T


def sums_from_rows(a_BTD, d_BTO, kernel_shape, bias_shape) -> dict[str, jax.Array]:
  """A dense layer's kernel (and bias) gradient from inputs and output gradients of B rows."""
  if a_BTD.shape[1] == 1:
    kernel = _outer_sum(a_BTD[:, 0], d_BTO[:, 0])
  else:
    kernel = jnp.einsum("btd,bto->do", a_BTD, d_BTO)
  out = {"kernel": kernel.reshape(kernel_shape)}
  if bias_shape is not None:
    out["bias"] = jnp.sum(d_BTO, axis=(0, 1)).reshape(bias_shape)
  return out


class Dense:
  """Rule for `nn.Dense` and `nn.DenseGeneral` (contracting trailing input axes)."""

  def __init__(self, module: nn.Module, params: dict, a_B: jax.Array, delta_B: jax.Array):
    kernel = params["kernel"]
    features = module.features
    out_ndim = len(features) if isinstance(features, tuple | list) else 1
    self.kernel_shape = kernel.shape
    self.bias_shape = params["bias"].shape if "bias" in params else None
    out_features = math.prod(kernel.shape[kernel.ndim - out_ndim :])
    in_features = math.prod(kernel.shape[: kernel.ndim - out_ndim])
    b = a_B.shape[0]
    self.a = a_B.reshape(b, -1, in_features)  # [B, T, D]
    self.d = delta_B.reshape(b, -1, out_features)  # [B, T, O]
    self.positions = self.a.shape[1]

  def _materialise(self) -> bool:
    t, d, o = self.positions, self.a.shape[2], self.d.shape[2]
    return t > 1 and t * d * o < t * t * (d + o)

  def norms(self) -> dict[str, jax.Array]:
    out = {}
    if self.positions == 1:
      d_norm_B = _norms.safe_norms(self.d)
      out["kernel"] = _norms.safe_norms(self.a) * d_norm_B
    elif self._materialise():
      out["kernel"] = _norms.safe_norms(jnp.einsum("btd,bto->bdo", self.a, self.d))
    else:
      out["kernel"] = _norms.gram_norms(self.a, self.d)
    if self.bias_shape is not None:
      out["bias"] = _norms.safe_norms(jnp.sum(self.d, axis=1))
    return out

  def scaled_rows(self, w_B: jax.Array, ok_B: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(inputs, deltas scaled by w_i), rows with `ok_B` False zeroed: `[B, T, D]`, `[B, T, O]`.

    Their `sums_from_rows` is `weighted_sum`; the engine stacks the rows of
    every chunk and forms the products once with all B rows.
    """
    a, d = self.a, self.d
    if ok_B is not None:
      a, d = _norms.rows_where(ok_B, a), _norms.rows_where(ok_B, d)
    return a, d * w_B.astype(d.dtype)[:, None, None]

  def sums_from_rows(self, a: jax.Array, d: jax.Array) -> dict[str, jax.Array]:
    """Kernel (and bias) sums from `scaled_rows` (of any number of examples)."""
    return sums_from_rows(a, d, self.kernel_shape, self.bias_shape)

  def weighted_sum(self, w_B: jax.Array, ok_B: jax.Array | None) -> dict[str, jax.Array]:
    return self.sums_from_rows(*self.scaled_rows(w_B, ok_B))

  def dots(self, reference: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    if "kernel" in reference:
      # a_i R first, then against delta_i: as one three-operand einsum XLA first copied
      # the inputs transposed, and the dots cost about twice this (MLP, B = 256; measured).
      r_DO = reference["kernel"].reshape(self.a.shape[2], self.d.shape[2])
      ar_BTO = jnp.einsum("btd,do->bto", self.a, r_DO.astype(self.a.dtype))
      out["kernel"] = jnp.einsum("bto,bto->b", ar_BTO, self.d)
    if "bias" in reference:
      out["bias"] = jnp.einsum("bto,o->b", self.d, reference["bias"].reshape(-1))
    return out


class Embed:
  """Rule for `nn.Embed` called on integer ids."""

  def __init__(self, module: nn.Module, params: dict, ids_B: jax.Array, delta_B: jax.Array):
    del module
    self.table_shape = params["embedding"].shape
    b = ids_B.shape[0]
    self.ids = ids_B.reshape(b, -1)  # [B, T]
    self.d = delta_B.reshape(b, -1, self.table_shape[1])  # [B, T, F]

  def norms(self) -> dict[str, jax.Array]:
    if self.ids.shape[1] == 1:
      return {"embedding": _norms.safe_norms(self.d)}
    same_BTT = self.ids[:, :, None] == self.ids[:, None, :]
    return {"embedding": _norms.gram_norms(self.d, self.d, same_BTT)}

  def weighted_sum(self, w_B: jax.Array, ok_B: jax.Array | None) -> dict[str, jax.Array]:
    d = self.d if ok_B is None else _norms.rows_where(ok_B, self.d)
    d = d * w_B.astype(d.dtype)[:, None, None]
    table = jnp.zeros(self.table_shape, d.dtype)
    return {"embedding": table.at[self.ids.reshape(-1)].add(d.reshape(-1, d.shape[-1]))}

  def dots(self, reference: dict[str, jax.Array]) -> dict[str, jax.Array]:
    rows_BTF = jnp.take(reference["embedding"], self.ids, axis=0)
    return {"embedding": jnp.einsum("btf,btf->b", rows_BTF, self.d)}
