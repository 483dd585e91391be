"""Shared pieces of the shaping tests: a toy per-example batch, flattening, NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import run

B = 8
PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}


def per_example(key=0, scale=3.0, shift=0.0):
  kw, kb = jax.random.split(jax.random.key(key))
  return {
    "b": shift + scale * jax.random.normal(kb, (B, 3)),
    "w": shift + scale * jax.random.normal(kw, (B, 4, 3)),
  }


def flat(g):
  """[B, K] float64 rows (leaves in tree order)."""
  return np.concatenate([np.asarray(x, np.float64).reshape(B, -1) for x in jax.tree.leaves(g)], 1)


def unflat(v, like=PARAMS):
  """A PARAMS-shaped tree from a flat vector (leaves in tree order)."""
  leaves, out, i = jax.tree.leaves(like), [], 0
  for p in leaves:
    out.append(v[i : i + p.size].reshape(p.shape))
    i += p.size
  return jax.tree.unflatten(jax.tree.structure(like), out)


def update(tx, g):
  return tx.update(g, tx.init(PARAMS), PARAMS)


def two_steps(tx, g1, g2, jit):
  """Two updates; returns (first out, second out, state after the first)."""

  def fn(g1, g2):
    s0 = tx.init(PARAMS)
    o1, s1 = tx.update(g1, s0, PARAMS)
    o2, _ = tx.update(g2, s1, PARAMS)
    return o1, o2, s1

  return run(fn, g1, g2, jit=jit)


# --- NumPy references (float64 loops over the rows) ----------------------------------------


def ref_centered(rows, r, tau):
  """sum_i r + min(1, tau / ||x_i - r||) (x_i - r)."""
  return sum(r + min(1.0, tau / max(np.linalg.norm(x - r), 1e-30)) * (x - r) for x in rows)


def ref_cosine(rows, r, kappa, clip):
  """sum over rows with cos(x_i, r) >= kappa (all if r = 0) of min(1, C / ||x_i||) x_i."""
  total = np.zeros(rows.shape[1])
  for x in rows:
    n = np.linalg.norm(x)
    cos = 1.0 if np.linalg.norm(r) == 0 else x @ r / (n * np.linalg.norm(r))
    if cos >= kappa:
      total += min(1.0, clip / n) * x
  return total


def ref_trimmed(rows, beta):
  """Mean of the sorted values with m = min(floor(beta n), (n - 1) // 2) cut from each end."""
  n = len(rows)
  m = min(int(np.floor(beta * n)), (n - 1) // 2)
  return np.sort(rows, axis=0)[m : n - m].mean(0)
