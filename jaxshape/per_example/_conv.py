"""Rule for convolutions (`nn.Conv`: any kernel size, stride, padding, dilation; bias or not).

Shapes: B batch, P output positions (all spatial axes flattened), C input
channels, O output channels, N kernel offsets (e.g. 9 for 3x3), K = N·C
im2col features.

The output at position p is sum_n x[p·s + n·r] W_n + b, so example i's kernel
gradient is, for each kernel offset n, sum_p xs_n[i, p] ⊗ delta[i, p], where
xs_n is the padded input sliced with the layer's stride starting at n·r.
Each such contraction is one batched einsum on a strided slice of the padded
input, the same multiply-adds as the ordinary kernel gradient; together they
give every example's kernel gradient (N·C·O numbers, small for convolutions)
at about the cost of the weight gradient itself. Layers with few input
channels (the first, C <= 4) use the im2col patches (the slices stacked on the
channel axis) and one contraction instead.

When the per-example gradient is large and the output small (late layers of
a ResNet), the Gram ("ghost") form is cheaper: |g_i|² =
sum_{p,q} (x_ip·x_iq)(delta_ip·delta_iq) over im2col patches x, costing P²(K+O)
per example against P·K·O; the cheaper is taken per layer (Li et al. 2022,
§4; Bu et al. 2023, mixed ghost clipping). Large materialised gradients are
not kept for the clipped sum: it is recomputed from the slices with the
scaled deltas (book-keeping), which bounds the memory of a step.

References:
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2022, §4 (ghost clipping for convolutions).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping, mixed ghost clipping).
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear

from jaxshape.per_example import _norms

# Layers with at most this many input channels work from im2col patches: for
# C = 1 or 3 that measured 2-4x faster than slice-by-slice contractions.
PATCHES_MAX_CHANNELS = 4
# Materialised per-example kernel gradients up to this many numbers (B·N·C·O)
# are kept for the clipped sum; larger ones are recomputed from the slices.
KEEP_MAX_NUMBERS = 1 << 22


def _tuple(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


def supported(module: nn.Conv, in_shape: tuple[int, ...], kernel_ndim: int) -> bool:
  """Whether this rule covers a call of `module` on a batched input of `in_shape`."""
  rank = kernel_ndim - 2
  if len(in_shape) != kernel_ndim or module.feature_group_count != 1 or module.mask is not None:
    return False
  if any(d != 1 for d in _tuple(module.input_dilation, rank)):
    return False
  padding = linear.canonicalize_padding(module.padding, rank)
  return not isinstance(padding, str) or padding in ("SAME", "VALID")


def _slices(a_B, kernel_spatial, strides, dilation, pads) -> list[jax.Array]:
  """For each kernel offset n, the padded input seen by it: `[B, *out_spatial, C]` each."""
  zero = jnp.zeros((), a_B.dtype)
  xpad = jax.lax.pad(a_B, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  out_spatial = [
    (size - ((k - 1) * r + 1)) // s + 1
    for size, k, r, s in zip(xpad.shape[1:-1], kernel_spatial, dilation, strides, strict=True)
  ]
  pieces = []
  for offset in itertools.product(*(range(k) for k in kernel_spatial)):
    start = [0] + [n * r for n, r in zip(offset, dilation, strict=True)] + [0]
    limit = [xpad.shape[0]]
    limit += [
      s0 + (p - 1) * s + 1 for s0, p, s in zip(start[1:-1], out_spatial, strides, strict=True)
    ]
    limit += [xpad.shape[-1]]
    pieces.append(jax.lax.slice(xpad, start, limit, [1, *strides, 1]))
  return pieces


def plain(module: nn.Conv) -> bool:
  """Whether `layer_output` computes exactly what `module` does (default dtype and conv op)."""
  return (
    module.dtype is None
    and module.precision is None
    and module.conv_general_dilated is None
    and module.conv_general_dilated_cls is None
  )


def _pads(module, in_spatial, kernel_spatial, strides, dilation):
  padding = linear.canonicalize_padding(module.padding, len(in_spatial))
  if isinstance(padding, str):
    dilated = [(k - 1) * r + 1 for k, r in zip(kernel_spatial, dilation, strict=True)]
    padding = jax.lax.padtype_to_pads(in_spatial, dilated, strides, padding)
  return [tuple(p) for p in padding]


class Conv:
  """Rule for one `nn.Conv` call (input `a_B`, output gradient `delta_B`)."""

  def __init__(self, module: nn.Conv, params: dict, a_B: jax.Array, delta_B: jax.Array):
    kernel = params["kernel"]
    rank = kernel.ndim - 2
    self.kernel_shape = kernel.shape
    self.has_bias = "bias" in params
    strides = _tuple(module.strides, rank)
    dilation = _tuple(module.kernel_dilation, rank)
    pads = _pads(module, a_B.shape[1:-1], kernel.shape[:rank], strides, dilation)
    b, c, o = a_B.shape[0], a_B.shape[-1], delta_B.shape[-1]
    self.slices = [  # N x [B, P, C]: the input seen by each kernel offset
      x.reshape(b, -1, c) for x in _slices(a_B, kernel.shape[:rank], strides, dilation, pads)
    ]
    self.d = delta_B.reshape(b, -1, o)  # [B, P, O]
    positions, n = self.d.shape[1], len(self.slices)
    self.gram = positions * positions * (n * c + o) < positions * n * c * o
    self.use_patches = self.gram or c <= PATCHES_MAX_CHANNELS
    self.keep = b * n * c * o <= KEEP_MAX_NUMBERS
    self.grads_B = None  # per-example kernel gradients, formed by `norms` unless `gram`

  def _patches(self) -> jax.Array:
    """im2col patches `[B, P, K]`, features ordered (offset, channel) like the kernel."""
    return jnp.concatenate(self.slices, axis=-1)

  def _per_example_kernels(self) -> jax.Array:
    """Each example's kernel gradient, `[B, *kernel_shape]`."""
    b = self.d.shape[0]
    if self.use_patches:
      g_BKO = jnp.einsum("bpk,bpo->bko", self._patches(), self.d)
      return g_BKO.reshape(b, *self.kernel_shape)
    # [B, C, O] per offset, stacked on axis 1: 1.3x faster on the CPU than contracting with
    # delta as the left operand and transposing (measured, 16 -> 32 channels on 26x26).
    g_BNCO = jnp.stack([jnp.einsum("bpc,bpo->bco", x, self.d) for x in self.slices], axis=1)
    return g_BNCO.reshape(b, *self.kernel_shape)

  def norms(self) -> dict[str, jax.Array]:
    if self.gram:
      out = {"kernel": _norms.gram_norms(self._patches(), self.d)}
    else:
      self.grads_B = self._per_example_kernels()
      out = {"kernel": _norms.safe_norms(self.grads_B)}
    if self.has_bias:
      out["bias"] = _norms.safe_norms(jnp.sum(self.d, axis=1))
    return out

  def weighted_sum(self, w_B: jax.Array, ok_B: jax.Array | None) -> dict[str, jax.Array]:
    d = self.d if ok_B is None else _norms.rows_where(ok_B, self.d)
    d = d * w_B.astype(d.dtype)[:, None, None]
    if self.grads_B is not None and self.keep:
      kernel = _norms.weighted_sum(w_B, self.grads_B, ok_B)
    elif self.use_patches:
      x = self._patches()
      x = x if ok_B is None else _norms.rows_where(ok_B, x)
      kernel = jnp.einsum("bpk,bpo->ko", x, d).reshape(self.kernel_shape)
    else:
      parts = []
      for x in self.slices:
        x = x if ok_B is None else _norms.rows_where(ok_B, x)
        parts.append(jnp.einsum("bpo,bpc->oc", d, x))
      kernel = jnp.stack(parts).transpose(0, 2, 1).reshape(self.kernel_shape)
    out = {"kernel": kernel}
    if self.has_bias:
      out["bias"] = jnp.sum(d, axis=(0, 1))
    return out

  def dots(self, reference: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    if "kernel" in reference:
      if not self.gram:
        self.grads_B = self._per_example_kernels() if self.grads_B is None else self.grads_B
        out["kernel"] = _norms.dots(self.grads_B, reference["kernel"])
      else:
        k = math.prod(self.kernel_shape[:-1])
        r_KO = reference["kernel"].reshape(k, self.kernel_shape[-1])
        xr_BPO = jnp.einsum("bpk,ko->bpo", self._patches(), r_KO.astype(self.d.dtype))
        out["kernel"] = jnp.einsum("bpo,bpo->b", xr_BPO, self.d)
    if "bias" in reference:
      out["bias"] = jnp.einsum("bpo,o->b", self.d, reference["bias"])
    return out


# ------------------------------------------------------------------ the layer's own forward


def _dimension_numbers(rank: int) -> jax.lax.ConvDimensionNumbers:
  """Channels-last input/output and [*spatial, in, out] kernels, as Flax's Conv."""
  spatial = tuple(range(1, rank + 1))
  return jax.lax.ConvDimensionNumbers(
    lhs_spec=(0, rank + 1, *spatial),
    rhs_spec=(rank + 1, rank, *range(rank)),
    out_spec=(0, rank + 1, *spatial),
  )


def _geometry(module: nn.Conv, x_B: jax.Array, kernel: jax.Array):
  rank = kernel.ndim - 2
  strides = _tuple(module.strides, rank)
  dilation = _tuple(module.kernel_dilation, rank)
  pads = tuple(_pads(module, x_B.shape[1:-1], kernel.shape[:rank], strides, dilation))
  return strides, dilation, pads


def layer_output(module: nn.Conv, params: dict, x_B: jax.Array) -> jax.Array:
  """What `module(x_B)` computes, with an input gradient that XLA's CPU backend runs fast.

  JAX's transpose rule expresses a convolution's input gradient with swapped
  kernel dimension numbers, which XLA's CPU backend runs about 40x slower
  inside a `lax.scan` (as in the engine's chunks); here it is a plain
  convolution of the output gradient with the flipped, transposed kernel.
  """
  kernel = params["kernel"].astype(jnp.result_type(x_B, params["kernel"]))
  strides, dilation, pads = _geometry(module, x_B, kernel)
  if x_B.shape[-1] <= PATCHES_MAX_CHANNELS:  # im2col: 2-4x faster for C = 1 or 3 (measured)
    pieces = _slices(x_B.astype(kernel.dtype), kernel.shape[:-2], strides, dilation, pads)
    kernel_KO = kernel.reshape(-1, kernel.shape[-1])
    z_B = jnp.einsum("b...k,ko->b...o", jnp.concatenate(pieces, axis=-1), kernel_KO)
  else:
    z_B = _conv(x_B.astype(kernel.dtype), kernel, strides, dilation, pads)
  if "bias" in params:
    z_B = z_B + params["bias"].astype(z_B.dtype).reshape((1,) * (z_B.ndim - 1) + (-1,))
  return z_B


def _plain_conv(x_B, kernel, strides, dilation, pads):
  return jax.lax.conv_general_dilated(
    x_B,
    kernel,
    strides,
    pads,
    rhs_dilation=dilation,
    dimension_numbers=_dimension_numbers(kernel.ndim - 2),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x_B, kernel, strides, dilation, pads):
  return _plain_conv(x_B, kernel, strides, dilation, pads)


def _conv_fwd(x_B, kernel, strides, dilation, pads):
  return _plain_conv(x_B, kernel, strides, dilation, pads), (x_B, kernel)


def _conv_bwd(strides, dilation, pads, residuals, delta_B):
  x_B, kernel = residuals
  rank = kernel.ndim - 2
  grad_pads = []
  for size, k, s, r, (lo, hi) in zip(
    x_B.shape[1:-1], kernel.shape[:rank], strides, dilation, pads, strict=True
  ):
    reach = (k - 1) * r + 1
    unused = (size + lo + hi - reach) % s
    grad_pads.append((reach - 1 - lo, reach - 1 - hi + unused))
  flipped = jnp.flip(kernel, tuple(range(rank))).swapaxes(rank, rank + 1)
  dx_B = jax.lax.conv_general_dilated(
    delta_B,
    flipped,
    (1,) * rank,
    grad_pads,
    lhs_dilation=strides,
    rhs_dilation=dilation,
    dimension_numbers=_dimension_numbers(rank),
  )
  _, kernel_pullback = jax.vjp(lambda k: _plain_conv(x_B, k, strides, dilation, pads), kernel)
  return dx_B, kernel_pullback(delta_B)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)
