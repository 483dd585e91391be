"""The engine: per-layer rules put together into norms, clipped sums, gradients, cosines.

Shapes: B batch; `*_B` one value per example.

Every leaf of the parameters is served by exactly one part: a fast layer's
rule (`_dense`, `_conv`, `_norms`) or the fallback, whose per-example
gradients `_capture` materialised. Each part reports per-leaf per-example
norms, a weighted sum over examples of its per-example gradients and, for the
analysis of §3, per-example dot products with a reference direction.

References:
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping: clipped sum as a weighted ordinary gradient).
  Hong et al. 2020, Appendix B, Algorithm 1 (clip, then sum).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxshape import grads as grads_lib
from jaxshape._typing import Params
from jaxshape.per_example import _capture
from jaxshape.per_example import _conv
from jaxshape.per_example import _dense
from jaxshape.per_example import _loss
from jaxshape.per_example import _norms

Path = tuple[str, ...]

RULES = {
  "dense": _dense.Dense,
  "conv": _conv.Conv,
  "embed": _dense.Embed,
  "norm": _norms.norm_layer_rule,
}

_logged: set[Any] = set()


def _log_fallback(loss: Any, the_plan: _capture.Plan) -> None:
  """One log line per loss object naming the leaves that take the vmap path."""
  if not the_plan.fallback or loss in _logged:
    return
  _logged.add(loss)
  names = sorted({"/".join(path[:-1]) or path[-1] for path in the_plan.fallback})
  logging.getLogger("jaxshape").warning(
    "jaxshape.per_example: exact per-example gradients through vmap(grad) for the parameters "
    "of %s (no fast rule for these layers); all other layers take the fast path",
    ", ".join(names),
  )


def _selected(path: Path, select: str | None) -> bool:
  name = "/".join(path)
  return select is None or name == select or name.startswith(select + "/")


class Parts:
  """The rules of one batch: per-leaf norms, weighted sums and dots over all parts."""

  def __init__(self, loss, params, batch, scale_B, select: str | None = None):
    the_plan = _capture.plan(loss, params, batch)
    _log_fallback(loss, the_plan)
    layers = tuple(
      layer
      for layer in the_plan.layers
      if any(_selected(layer.path + (leaf,), select) for leaf in _subtree(params, layer.path))
    )
    fallback = tuple(path for path in the_plan.fallback if _selected(path, select))
    captured = _capture.capture(loss, params, batch, _capture.Plan(layers, fallback), scale_B)
    self.select = select
    self.rules = {
      layer.path: RULES[layer.kind](
        layer.module,
        _subtree(params, layer.path),
        captured.inputs[layer.path],
        captured.deltas[layer.path],
      )
      for layer in layers
    }
    self.fallback = _norms.Materialised(captured.fallback_grads)
    self.leaf_names = {path: tuple(_subtree(params, path)) for path in self.rules}

  def _leaves(self, per_rule: Callable[[Any], dict], fallback: dict) -> dict[Path, jax.Array]:
    out = {}
    for path, rule in self.rules.items():
      out.update({path + (leaf,): value for leaf, value in per_rule(rule).items()})
    out.update(fallback)
    return {p: v for p, v in out.items() if _selected(p, self.select)}

  def norms(self) -> jax.Array:
    """Each example's gradient norm over the selected leaves, `[B]`."""
    leaf_norms = self._leaves(lambda rule: rule.norms(), self.fallback.norms())
    return _norms.combine(list(leaf_norms.values()))

  def weighted_sum(self, w_B: jax.Array, ok_B: jax.Array | None) -> dict[Path, jax.Array]:
    """{leaf path: sum_i w_i g_i} (rows with `ok_B` False dropped)."""
    fallback = self.fallback.weighted_sum(w_B, ok_B)
    return self._leaves(lambda rule: rule.weighted_sum(w_B, ok_B), fallback)

  def deferred_sum(self, w_B, ok_B) -> tuple[dict[Path, jax.Array], dict[Path, tuple], dict]:
    """`weighted_sum` with the dense layers' products left for later.

    Returns ({leaf path: sum} of the other parts, {layer path: (inputs, scaled
    deltas)} of the dense layers, {layer path: (kernel shape, bias shape)}):
    inside the engine's chunk loop the dense rows of all chunks are stacked
    and each dense product is formed once with all B rows (`finish_dense`),
    which for the CNN's 4608 x 64 layer measured faster than per-chunk
    products accumulated in the loop.
    """
    dense = {p: r for p, r in self.rules.items() if isinstance(r, _dense.Dense)}
    rows = {p: r.scaled_rows(w_B, ok_B) for p, r in dense.items()}
    shapes = {p: (r.kernel_shape, r.bias_shape) for p, r in dense.items()}
    others = {p: r for p, r in self.rules.items() if p not in dense}
    out = self.fallback.weighted_sum(w_B, ok_B)
    for path, rule in others.items():
      out.update({path + (leaf,): v for leaf, v in rule.weighted_sum(w_B, ok_B).items()})
    return out, rows, shapes

  def dots(self, reference: Params) -> jax.Array:
    """<g_i, reference> over the selected leaves, `[B]`."""
    flat = traverse_util.flatten_dict(reference)
    per_rule = {
      path: rule.dots({leaf: flat[path + (leaf,)] for leaf in self.leaf_names[path]})
      for path, rule in self.rules.items()
    }
    fallback = self.fallback.dots({p: flat[p] for p in self.fallback.grads_B})
    out = {path + (leaf,): v for path, d in per_rule.items() for leaf, v in d.items()}
    out.update(fallback)
    return sum(v for p, v in out.items() if _selected(p, self.select))


def _subtree(params: Params, path: Path) -> dict:
  node = params
  for name in path:
    node = node[name]
  return node


def _unflatten(flat: dict[Path, jax.Array], like: Params) -> Params:
  """A tree shaped like `like` from {leaf path: array}."""
  tree = traverse_util.unflatten_dict(flat)
  return jax.tree.map(lambda _, v: v, like, tree)


# Examples per chunk of a `lax.scan` for models with convolutions. Chunking
# bounds a step's temporary memory, and on the CPU large fresh buffers cost page
# faults on every call: for the 32x32x3 CNN at batch 100, unchunked 86 MB of
# temporaries, 22k faults and 39 ms of kernel time per step; chunks of 20:
# 18 MB, 250 faults, 2 ms (measured; chunks of 5-25 within noise of each other).
CONV_CHUNK_SIZE = 20


def chunk_size_for(loss, params, batch) -> int:
  """`CONV_CHUNK_SIZE` if the model has a fast convolution, else the whole batch."""
  size = _loss.batch_size(batch)
  the_plan = _capture.plan(loss, params, batch)
  if any(layer.kind == "conv" for layer in the_plan.layers):
    return min(CONV_CHUNK_SIZE, size)
  return size


def scan_chunks(body, carry, arrays_B, chunk: int):
  """`lax.scan` of `body(carry, arrays_b)` over chunks of the batch; outputs re-joined `[B, ...]`.

  The batch is padded with zeros to a multiple of `chunk`; padded rows must
  contribute nothing to the carry (give them scale and keep weight 0).
  """
  size = jax.tree.leaves(arrays_B)[0].shape[0]
  if chunk >= size:
    return body(carry, arrays_B)
  num = -(-size // chunk)
  pad = num * chunk - size

  def split(a):
    a = jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) if pad else a
    return a.reshape((num, chunk) + a.shape[1:])

  carry, out_N = jax.lax.scan(body, carry, jax.tree.map(split, arrays_B))
  return carry, jax.tree.map(lambda o: o.reshape((num * chunk,) + o.shape[2:])[:size], out_N)


def _summed(loss, params, batch, scale_B, keepw_B, coefficients, chunk):
  """Weighted sum over all examples of the per-example gradients, chunk by chunk.

  `coefficients(parts, keepw_b) -> (w_b, ok_b or None, outputs_b)` gives each
  example's weight in the sum; returns (params-shaped sum, stacked outputs).
  Dense layers' products are formed after the loop from the stacked rows
  (`Parts.deferred_sum`); the loop's carry holds only the other leaves.
  """
  first = jax.tree.map(lambda v: v[:chunk], batch)
  dense = {l.path for l in _capture.plan(loss, params, first).layers if l.kind == "dense"}
  flat_params = traverse_util.flatten_dict(params)
  shapes = {}

  def body(total, arrays_b):
    batch_b, scale_b, keepw_b = arrays_b
    parts = Parts(loss, params, batch_b, scale_b)
    w_b, ok_b, outputs_b = coefficients(parts, keepw_b)
    sums, rows, dense_shapes = parts.deferred_sum(w_b, ok_b)
    shapes.update(dense_shapes)
    return {p: total[p] + sums[p] for p in total}, (outputs_b, rows)

  zeros = {p: jnp.zeros_like(v) for p, v in flat_params.items() if p[:-1] not in dense}
  total, (outputs_B, rows_B) = scan_chunks(body, zeros, (batch, scale_B, keepw_B), chunk)
  flat = dict(total)
  for path, (a_B, d_B) in rows_B.items():
    sums = _dense.sums_from_rows(a_B, d_B, *shapes[path])
    flat.update({path + (leaf,): v for leaf, v in sums.items()})
  return _unflatten(flat, params), outputs_B


def clipped_sum(loss, params, batch, l2_norm_clip) -> grads_lib.ClippedSum:
  """`ClippedSum` of the fast engine (see `jaxshape.per_example.clipped_sum_and_norms`)."""
  scale_B, keepw_B = _loss.per_example_weights(batch)
  clip = jnp.asarray(l2_norm_clip, jnp.float32)

  def coefficients(parts, keepw_b):
    norms_b = parts.norms()
    ok_b = jnp.isfinite(norms_b) & (keepw_b != 0)
    keep_b = jnp.where(ok_b, keepw_b, 0.0)
    coef_b = jnp.where(ok_b, keepw_b * grads_lib.clip_factors(norms_b, clip), 0.0)
    return coef_b, ok_b, (norms_b, keep_b)

  chunk = chunk_size_for(loss, params, batch)
  total, (norms_B, keep_B) = _summed(loss, params, batch, scale_B, keepw_B, coefficients, chunk)
  return grads_lib.ClippedSum(total, norms_B.astype(jnp.float32), keep_B, clip)


def reweighted_sum(loss, params, batch, reference, weights_fn):
  """(sum_i w_i g_i, norms `[B]`, dots with `reference` `[B]`, keep `[B]`, w `[B]`), one pass.

  w_i = keep_i * weights_fn(norm_i, dot_i): the per-example weights of a shaping
  mechanism that depends on each gradient only through its norm and its dot
  product with a reference (centered clipping, cosine gating); the cost is a
  clipped sum's plus the dot products.
  """
  scale_B, keepw_B = _loss.per_example_weights(batch)

  def coefficients(parts, keepw_b):
    norms_b, dots_b = parts.norms(), parts.dots(reference)
    ok_b = jnp.isfinite(norms_b) & jnp.isfinite(dots_b) & (keepw_b != 0)
    keep_b = jnp.where(ok_b, keepw_b, 0.0)
    safe_norms_b, safe_dots_b = jnp.where(ok_b, norms_b, 0.0), jnp.where(ok_b, dots_b, 0.0)
    w_b = jnp.where(ok_b, keepw_b * weights_fn(safe_norms_b, safe_dots_b), 0.0)
    return w_b, ok_b, (norms_b, dots_b, keep_b, w_b)

  chunk = chunk_size_for(loss, params, batch)
  total, out = _summed(loss, params, batch, scale_B, keepw_B, coefficients, chunk)
  return (total,) + tuple(o.astype(jnp.float32) for o in out)


def mean_grad(loss, params, batch) -> Params:
  """`jax.grad(loss)(params, batch)` through the engine's passes."""
  weight_B = _loss.mean_weights(batch)

  def coefficients(parts, keepw_b):
    del parts
    return jnp.ones_like(keepw_b), None, ()

  chunk = chunk_size_for(loss, params, batch)
  total, _ = _summed(loss, params, batch, weight_B, weight_B, coefficients, chunk)
  return total


def norms_and_dots(loss, params, batch, reference, select):
  """(norms `[B]`, dots with `reference` `[B]`) of the selected leaves' per-example gradients."""
  scale_B, _ = _loss.per_example_weights(batch)
  chunk = chunk_size_for(loss, params, batch)

  def body(carry, arrays_b):
    batch_b, scale_b = arrays_b
    parts = Parts(loss, params, batch_b, scale_b, select)
    return carry, (parts.norms(), parts.dots(reference))

  _, out = scan_chunks(body, (), (batch, scale_B), chunk)
  return out
