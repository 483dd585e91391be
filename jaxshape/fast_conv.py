"""Convolution and pooling pieces of the fast exact per-example gradient paths.

Shapes: B batch, H/W input height/width, P/Q output height/width, C input
channels, O output channels, K = 9·C im2col features; kernels are 3x3
(`33`), stride 1.

Per-example kernel gradients. The gradient of a 3x3 kernel is small (9·C·O
numbers, e.g. 4,608 for the paper's 16->32 layer), so each example's is
materialised: for each of the 9 kernel offsets one batched contraction
`einsum('bpqo,bpqc->boc')` of the output gradient with a shifted slice of the
padded input, the same multiply-adds as the summed kernel gradient. The
Gram-matrix ("ghost") norm would cost 2·(P·Q)²·(K+O) per example instead of
2·P·Q·K·O: 22x more for the 16->32 layer on 26x26 inputs, 30x on 30x30.
Layers with few input channels (the first, C = 1 or 3) work from im2col
patches instead, which serve both the forward pass and the per-example
gradients (`use_patches`).

Convolutions on the CPU. `conv3x3` has its own VJP: JAX's transpose rule for
the input gradient runs about 40x slower inside a `lax.scan` on XLA's CPU
backend, and `jax.grad` of a kernel through XLA's backward-filter convolution
is as slow there, so both are written as the explicit forms measured fast.

Max pooling (`max_pool_2x2`) has a custom backward pass: XLA's
`select_and_scatter`, which `jax.grad` of `flax.linen.max_pool` uses, was the
slowest op of the whole CNN step on the CPU (about 35 of 80 ms). The gradient
of each 2x2 window goes to its *first* maximal element in row-major order, as
`select_and_scatter` with `>=` does, so results match Flax exactly even when
a window holds ties (common after ReLU and on constant backgrounds).

References:
  Hong et al. 2020, Appendix C, Table 4 (the CNN).
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping; per-layer choice between ghost norms and
  materialised per-example gradients by cost).
  Li et al., "Large Language Models Can Be Strong Differentially Private
  Learners", 2022, §4 (ghost clipping; the Gram-matrix norm for convolutions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def pad_same(x_BHWC: jax.Array, padding: str) -> jax.Array:
  """Zero-pads H and W by 1 for a 3x3 "SAME" convolution; "VALID" returns the input."""
  if padding == "VALID":
    return x_BHWC
  if padding == "SAME":
    return jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")


def conv3x3(
  x_BHWC: jax.Array, kernel_33CO: jax.Array, bias_O: jax.Array, padding: str
) -> jax.Array:
  """3x3 stride-1 convolution plus bias, like `flax.linen.Conv`, `[B, P, Q, O]`.

  `padding` is "SAME" (P, Q = H, W) or "VALID" (P, Q = H-2, W-2).
  """
  return _conv(x_BHWC, kernel_33CO, padding) + bias_O[None, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x_BHWC: jax.Array, kernel_33CO: jax.Array, padding: str) -> jax.Array:
  # A "VALID" convolution is computed padded by 1 and cropped: XLA's CPU backend
  # (its YNNPACK path) measured about 1.15x faster on whole steps that way.
  z_BPQO = jax.lax.conv_general_dilated(
    x_BHWC, kernel_33CO, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSION_NUMBERS
  )
  return z_BPQO if padding == "SAME" else z_BPQO[:, 1:-1, 1:-1, :]


def _conv_fwd(x_BHWC, kernel_33CO, padding):
  return _conv(x_BHWC, kernel_33CO, padding), (x_BHWC, kernel_33CO)


def _conv_bwd(padding, residuals, delta_BPQO):
  """Input gradient as a convolution with the flipped kernel, kernel gradient by slices.

  JAX's own transpose rule expresses the input gradient with swapped kernel
  dimension numbers, which XLA's CPU backend runs about 40x slower inside a
  `lax.scan` (as in the chunked fast path); this explicit form is fast both
  inside and outside loops.
  """
  x_BHWC, kernel_33CO = residuals
  flipped_33OC = jnp.flip(kernel_33CO, (0, 1)).transpose(0, 1, 3, 2)
  edge = 1 if padding == "SAME" else 2
  dx_BHWC = jax.lax.conv_general_dilated(
    delta_BPQO,
    flipped_33OC,
    (1, 1),
    ((edge, edge), (edge, edge)),
    dimension_numbers=_DIMENSION_NUMBERS,
  )
  return dx_BHWC, kernel_grad(pad_same(x_BHWC, padding), delta_BPQO)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _shifted(xpad_BHWC: jax.Array, i: int, j: int, p: int, q: int) -> jax.Array:
  return xpad_BHWC[:, i : i + p, j : j + q, :]


def per_example_kernel_grads(xpad_BHWC: jax.Array, delta_BPQO: jax.Array) -> jax.Array:
  """Each example's gradient of a 3x3 VALID convolution's kernel, `[B, 3, 3, C, O]`.

  One batched contraction per kernel offset (i, j) over the output positions.

  Args:
    xpad_BHWC: the layer's (padded) input.
    delta_BPQO: gradient of each example's loss w.r.t. the layer's output.

  Returns:
    `G[b, i, j] = sum_{p,q} xpad[b, p+i, q+j, :] (outer) delta[b, p, q, :]`.
  """
  _, p, q, _ = delta_BPQO.shape
  # Contracting with delta as the left operand measured ~1.3x faster on the CPU.
  g_9BOC = jnp.stack(
    [
      jnp.einsum("bpqo,bpqc->boc", delta_BPQO, _shifted(xpad_BHWC, i, j, p, q))
      for i in range(3)
      for j in range(3)
    ]
  )
  b, o, c = g_9BOC.shape[1:]
  return g_9BOC.transpose(1, 0, 3, 2).reshape(b, 3, 3, c, o)


def kernel_grad(xpad_BHWC: jax.Array, delta_BPQO: jax.Array) -> jax.Array:
  """Gradient of a 3x3 VALID convolution's kernel summed over the batch, `[3, 3, C, O]`."""
  _, p, q, _ = delta_BPQO.shape
  g_9OC = jnp.stack(
    [
      jnp.einsum("bpqo,bpqc->oc", delta_BPQO, _shifted(xpad_BHWC, i, j, p, q))
      for i in range(3)
      for j in range(3)
    ]
  )
  o, c = g_9OC.shape[1:]
  return g_9OC.transpose(0, 2, 1).reshape(3, 3, c, o)


# Layers with at most this many input channels are computed from im2col patches
# (9·C features per position): for C = 1 or 3 that measured 2-4x faster than
# XLA's convolution plus nine slice contractions, and the patches serve both the
# forward pass and the per-example kernel gradients. For C = 16 XLA's
# convolution and the slices are faster.
PATCHES_MAX_CHANNELS = 4


def use_patches(channels: int) -> bool:
  """Whether a layer with `channels` input channels is computed from im2col patches."""
  return channels <= PATCHES_MAX_CHANNELS


def patches_3x3(xpad_BHWC: jax.Array) -> jax.Array:
  """im2col patches of a 3x3 VALID convolution, `[B, P, Q, 9·C]` ordered (i, j, c)."""
  _, h, w, _ = xpad_BHWC.shape
  p, q = h - 2, w - 2
  return jnp.concatenate([_shifted(xpad_BHWC, i, j, p, q) for i in range(3) for j in range(3)], -1)


def conv3x3_from_patches(
  patches_BPQK: jax.Array, kernel_33CO: jax.Array, bias_O: jax.Array
) -> jax.Array:
  """The convolution of `conv3x3` computed from `patches_3x3` of its input, `[B, P, Q, O]`."""
  kernel_KO = kernel_33CO.reshape(-1, kernel_33CO.shape[-1])
  return jnp.einsum("bpqk,ko->bpqo", patches_BPQK, kernel_KO) + bias_O[None, None, None, :]


def per_example_kernel_grads_from_patches(
  patches_BPQK: jax.Array, delta_BPQO: jax.Array, channels: int
) -> jax.Array:
  """`per_example_kernel_grads` from `patches_3x3` of the input, `[B, 3, 3, C, O]`."""
  b, _, _, o = delta_BPQO.shape
  g_BKO = jnp.einsum("bpqk,bpqo->bko", patches_BPQK, delta_BPQO)
  return g_BKO.reshape(b, 3, 3, channels, o)


def kernel_grad_from_patches(
  patches_BPQK: jax.Array, delta_BPQO: jax.Array, channels: int
) -> jax.Array:
  """`kernel_grad` from `patches_3x3` of the input, `[3, 3, C, O]`."""
  g_KO = jnp.einsum("bpqk,bpqo->ko", patches_BPQK, delta_BPQO)
  return g_KO.reshape(3, 3, channels, delta_BPQO.shape[-1])


def _window_view(a_BHWC: jax.Array) -> jax.Array:
  """`[B, H/2, 2, W/2, 2, C]` view of the 2x2 windows (odd trailing rows/columns dropped)."""
  b, h, w, c = a_BHWC.shape
  a_BHWC = a_BHWC[:, : h // 2 * 2, : w // 2 * 2, :]
  return a_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)


def _first_max_selector(a_BHWC: jax.Array, out_BPQC: jax.Array) -> jax.Array:
  """1 at the first maximal element (row-major) of each 2x2 window, else 0; like `_window_view`."""
  eq = _window_view(a_BHWC) == out_BPQC[:, :, None, :, None, :]
  e00, e01 = eq[:, :, 0, :, 0, :], eq[:, :, 0, :, 1, :]
  e10, e11 = eq[:, :, 1, :, 0, :], eq[:, :, 1, :, 1, :]
  s01 = e01 & ~e00
  s10 = e10 & ~(e00 | e01)
  s11 = e11 & ~(e00 | e01 | e10)
  top = jnp.stack([e00, s01], axis=3)
  bottom = jnp.stack([s10, s11], axis=3)
  return jnp.stack([top, bottom], axis=2)


@jax.custom_vjp
def max_pool_2x2(a_BHWC: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 and VALID padding, `[B, H/2, W/2, C]`.

  The same values and gradients as `flax.linen.max_pool(a, (2, 2), (2, 2))`
  (the gradient of a window goes to its first maximal element), with a
  backward pass that is one fused elementwise op instead of XLA's slow
  `select_and_scatter` on the CPU.
  """
  return _reduce_max_2x2(a_BHWC)


def _reduce_max_2x2(a_BHWC: jax.Array) -> jax.Array:
  # lax.reduce_window measured ~5x faster than a max over the 6-d window view.
  init = jnp.array(-jnp.inf, a_BHWC.dtype)
  return jax.lax.reduce_window(a_BHWC, init, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _max_pool_fwd(a_BHWC):
  out_BPQC = _reduce_max_2x2(a_BHWC)
  return out_BPQC, (a_BHWC, out_BPQC)


def _max_pool_bwd(residuals, g_BPQC):
  a_BHWC, out_BPQC = residuals
  sel = _first_max_selector(a_BHWC, out_BPQC)
  g6 = jnp.where(sel, g_BPQC[:, :, None, :, None, :], jnp.zeros((), g_BPQC.dtype))
  b, h, w, c = a_BHWC.shape
  g_even = g6.reshape(b, h // 2 * 2, w // 2 * 2, c)
  if (h % 2, w % 2) != (0, 0):
    g_even = jnp.pad(g_even, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  return (g_even,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
