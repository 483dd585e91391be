"""Shared test helpers: jit/eager execution and small models."""

import contextlib

import jax


@contextlib.contextmanager
def _no_context():
  yield


def run(fn, *args, jit: bool):
  """Runs `fn(*args)` jitted, or eagerly with jit disabled everywhere."""
  if jit:
    return jax.jit(fn)(*args)
  with jax.disable_jit():
    return fn(*args)
