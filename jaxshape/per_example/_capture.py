"""Finding a model's layers and capturing their inputs and output gradients.

Shapes: B batch. A layer's input `a_B...` and output gradient `delta_B...`
keep the layer's own axes after the leading batch axis.

`plan` runs the loss abstractly (`jax.eval_shape`) under a
`flax.linen.intercept_methods` interceptor that records every call of a
parameterised Flax layer the engine has rules for. A layer is *fast* when it
is called once, through `__call__`, on a batched input in a configuration its
rule covers, and owns exactly the parameters its rule expects; every other
parameter (of unknown modules, of layers called twice, of a parent's own
`self.param`) is a *fallback* leaf, whose per-example gradients are
materialised by `vmap(grad)` for those leaves only. BatchNorm in training
mode mixes the examples of a batch and is rejected here, before any work.

`capture` then runs the loss for real with a zero offset added to each fast
layer's output and differentiates sum_i scale_i loss_i with respect to the
offsets: one ordinary backward pass (XLA drops the weight gradients no one
asks for) gives every fast layer's output gradient for every example at once,
since the rows of a per-example loss are independent. With fallback leaves
the same function is differentiated per example under `vmap`, with respect to
the offsets and those leaves together.

References:
  Goodfellow, "Efficient Per-Example Gradient Computations", 2015.
  Bu et al., "Differentially Private Optimization on Large Model at Small
  Cost", 2023, §3 (book-keeping: everything from one backward pass).
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxshape._typing import Params
from jaxshape.per_example import _conv
from jaxshape.per_example import _loss

Path = tuple[str, ...]

# Flax layer type -> (rule kind, parameter names its rule handles).
KINDS = {
  nn.Dense: ("dense", ("kernel", "bias")),
  nn.DenseGeneral: ("dense", ("kernel", "bias")),
  nn.Conv: ("conv", ("kernel", "bias")),
  nn.Embed: ("embed", ("embedding",)),
  nn.LayerNorm: ("norm", ("scale", "bias")),
  nn.GroupNorm: ("norm", ("scale", "bias")),
  nn.RMSNorm: ("norm", ("scale",)),
}


class Layer(NamedTuple):
  """A fast layer: where its parameters live, its rule and the (unbound) module."""

  path: Path
  kind: str
  module: nn.Module
  out_shape: tuple[int, ...]  # its output's shape, batch axis first
  out_dtype: Any


class Plan(NamedTuple):
  """The fast layers in call order and the fallback parameter leaves."""

  layers: tuple[Layer, ...]
  fallback: tuple[Path, ...]  # paths of parameter leaves, e.g. ("Block_0", "alpha")


@dataclasses.dataclass
class _Call:
  module: Any
  count: int = 0
  other_method: bool = False
  in_shape: tuple[int, ...] | None = None
  in_dtype: Any = None
  out: jax.ShapeDtypeStruct | None = None
  kwargs: tuple[str, ...] = ()


def _path_name(path: Path) -> str:
  return "/".join(path)


def _first_arg(args, kwargs):
  if args:
    return args[0]
  return next(iter(kwargs.values()), None)


def _check_mixing(module: nn.Module, kwargs: dict) -> None:
  if isinstance(module, nn.BatchNorm):
    use_running = kwargs.get("use_running_average", module.use_running_average)
    if not use_running:
      raise ValueError(
        f"layer {_path_name(module.path)!r} is a BatchNorm in training mode: it mixes the "
        "examples of a batch, so per-example gradients are not defined; use "
        "flax.linen.GroupNorm (or LayerNorm) instead, or BatchNorm with use_running_average=True"
      )


def _record(calls: dict[Path, _Call]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    _check_mixing(module, kwargs)
    if type(module) not in KINDS:
      return next_fun(*args, **kwargs)
    call = calls.setdefault(module.path, _Call(module.clone(parent=None)))
    if context.method_name == "setup":
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      call.other_method = True
      return next_fun(*args, **kwargs)
    call.count += 1
    a = _first_arg(args, kwargs)
    call.in_shape, call.in_dtype = jnp.shape(a), jnp.result_type(a)
    call.kwargs = tuple(kwargs) + (("extra",) if len(args) > 1 else ())
    out = next_fun(*args, **kwargs)
    if isinstance(out, jax.Array):
      call.out = jax.ShapeDtypeStruct(jnp.shape(out), jnp.result_type(out))
    return out

  return interceptor


def _supported(call: _Call, params_at: Any, size: int) -> bool:
  """Whether the rule of this layer's kind covers this call exactly."""
  module = call.module
  kind, names = KINDS[type(module)]
  if call.count != 1 or call.other_method or call.kwargs:
    return False
  if not isinstance(call.out, jax.ShapeDtypeStruct) or not call.in_shape:
    return False
  if call.in_shape[0] != size or call.out.shape[:1] != (size,):
    return False
  if not isinstance(params_at, dict) or not set(params_at) <= set(names) or not params_at:
    return False
  if any(isinstance(v, dict) for v in params_at.values()):
    return False
  if kind == "dense" and isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return False
    axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    ndim = len(call.in_shape)
    axes = sorted(a % ndim for a in axes)
    return axes[0] > 0 and axes == list(range(ndim - len(axes), ndim))
  if kind == "dense":
    return len(call.in_shape) >= 2
  if kind == "conv":
    return _conv.supported(module, call.in_shape, params_at["kernel"].ndim)
  if kind == "embed":
    return jnp.issubdtype(call.in_dtype, jnp.integer)
  return True  # norms: per-example gradients through the module's own VJP


def _subtree(params: Params, path: Path) -> Any:
  node = params
  for name in path:
    if not isinstance(node, dict) or name not in node:
      return None
    node = node[name]
  return node


def plan(loss: _loss.PerExampleLoss, params: Params, batch: Any) -> Plan:
  """The fast layers and fallback leaves of `loss` on batches shaped like `batch`.

  Raises:
    ValueError: if the model runs a layer that mixes examples (BatchNorm in
      training mode), naming it.
  """
  calls: dict[Path, _Call] = {}
  with nn.intercept_methods(_record(calls)):
    jax.eval_shape(loss.per_example, params, batch)
  size = _loss.batch_size(batch)
  layers = []
  for path, call in calls.items():
    if _supported(call, _subtree(params, path), size):
      kind = KINDS[type(call.module)][0]
      layers.append(Layer(path, kind, call.module, call.out.shape, call.out.dtype))
  fast = {layer.path for layer in layers}
  leaves = traverse_util.flatten_dict(params)
  fallback = tuple(path for path in leaves if path[:-1] not in fast)
  return Plan(tuple(layers), fallback)


class Captured(NamedTuple):
  """What one backward pass gives: per fast layer its input and output gradient."""

  inputs: dict[Path, jax.Array]  # [B, ...] each fast layer's input
  deltas: dict[Path, jax.Array]  # [B, ...] d(scale_i loss_i)/d(output_i) per example
  fallback_grads: dict[Path, jax.Array]  # [B, ...] per-example grads of fallback leaves


def _with_offsets(offsets: dict[Path, jax.Array], inputs: dict[Path, jax.Array]):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    path = module.path if context.method_name == "__call__" else None
    if path not in offsets:
      return next_fun(*args, **kwargs)
    inputs[path] = a = _first_arg(args, kwargs)
    if type(module) is nn.Conv and _conv.plain(module):
      out = _conv.layer_output(module, module.variables["params"], a)
    else:
      out = next_fun(*args, **kwargs)
    return out + offsets[path]

  return interceptor


def _replace_leaves(params: Params, leaves: dict[Path, jax.Array]) -> Params:
  if not leaves:
    return params
  flat = traverse_util.flatten_dict(params)
  flat.update(leaves)
  return traverse_util.unflatten_dict(flat)


def capture(
  loss: _loss.PerExampleLoss,
  params: Params,
  batch: Any,
  the_plan: Plan,
  scale_B: jax.Array,
) -> Captured:
  """Inputs and output gradients of the fast layers, per-example grads of the fallback leaves.

  The gradients are those of scale_i loss_i for example i alone.
  """
  layers, fallback = the_plan

  def weighted_loss(offsets, fallback_leaves, batch_b, scale_b):
    inputs = {}
    p = _replace_leaves(params, fallback_leaves)
    with nn.intercept_methods(_with_offsets(offsets, inputs)):
      loss_b = loss.per_example(p, batch_b)
    return jnp.sum(scale_b.astype(loss_b.dtype) * loss_b), inputs

  if not fallback:
    zeros = {layer.path: jnp.zeros(layer.out_shape, layer.out_dtype) for layer in layers}
    total, pullback, inputs = jax.vjp(
      lambda offsets: weighted_loss(offsets, {}, batch, scale_B), zeros, has_aux=True
    )
    (deltas,) = pullback(jnp.ones_like(total))
    return Captured(inputs, deltas, {})

  flat = traverse_util.flatten_dict(params)
  fallback_leaves = {path: flat[path] for path in fallback}
  zeros_B1 = {
    layer.path: jnp.zeros((layer.out_shape[0], 1, *layer.out_shape[1:]), layer.out_dtype)
    for layer in layers
  }

  def one(offsets_1, leaves, example, scale):
    batch_1 = jax.tree.map(lambda v: v[None], example)
    return weighted_loss(offsets_1, leaves, batch_1, scale[None])

  grad_one = jax.grad(one, argnums=(0, 1), has_aux=True)
  (deltas, grads), inputs = jax.vmap(grad_one, in_axes=(0, None, 0, 0))(
    zeros_B1, fallback_leaves, batch, scale_B
  )
  squeeze = lambda v: v.reshape(v.shape[:1] + v.shape[2:])  # noqa: E731
  return Captured(
    {p: squeeze(v) for p, v in inputs.items()},
    {p: squeeze(v) for p, v in deltas.items()},
    grads,
  )
