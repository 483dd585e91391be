"""Gradient artifacts of poisoning, and PCA / KMeans views of poisons.

Shapes: N points, D features, K clusters, B batch.

§3 of the paper measures how poisons show in training: per epoch, the mean
gradient of the clean examples and of the poisons (batch means inside each
batch, averaged over the epoch), their magnitude ratio ||g_poison|| /
||g_clean|| and their cosine. `subset_mean_grads` gives the two batch means
(no per-example gradients needed: the mean gradient of a subset is the
gradient of the subset's mean loss), and `artifacts` the ratio and cosine for
the whole model and for one layer. §7.1 looks at poisons in a 2-D PCA of the
data with KMeans; `pca_2d`, `kmeans` and `plot_poison_pca` do that.

References:
  Hong et al. 2020, §3 (Fig. 1), §4, §6.2 (Fig. 4c/4f), §7.1 (Fig. 8).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxshape._typing import Params


def subset_mean_grads(loss_fn, params: Params, batch: dict) -> dict[str, Params]:
  """Mean gradient of the batch's clean examples and of its poisons.

  Args:
    loss_fn: a `ClassifierLoss` (it needs `per_example`).
    params: parameters.
    batch: dict with x, y, `is_poison` (1 for poisons) and optionally `mask`.

  Returns:
    `{"clean": tree, "poison": tree, "n_clean": [], "n_poison": []}`; a mean
    over an empty subset is zero (its count tells).
  """
  mask_B = batch.get("mask", jnp.ones_like(batch["is_poison"]))
  poison_B = batch["is_poison"] * mask_B
  clean_B = (1.0 - batch["is_poison"]) * mask_B

  def subset_loss(p, sel_B):
    loss_B = loss_fn.per_example(p, batch)
    return jnp.sum(jnp.where(sel_B > 0, loss_B, 0.0) * sel_B) / jnp.maximum(jnp.sum(sel_B), 1.0)

  grad_fn = jax.grad(subset_loss)
  return {
    "clean": grad_fn(params, clean_B),
    "poison": grad_fn(params, poison_B),
    "n_clean": jnp.sum(clean_B),
    "n_poison": jnp.sum(poison_B),
  }


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def ratio_and_cosine(g_clean: Params, g_poison: Params) -> tuple[jax.Array, jax.Array]:
  """||g_poison|| / ||g_clean|| and cos(g_clean, g_poison) of two parameter-shaped trees."""
  a, b = _flat(g_clean), _flat(g_poison)
  na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
  ratio = nb / jnp.where(na > 0, na, jnp.nan)
  cosine = jnp.dot(a, b) / jnp.where(na * nb > 0, na * nb, jnp.nan)
  return ratio, cosine


def last_layer_kernel(tree: Params) -> Params:
  """The last dense layer's kernel of a jaxshape model's tree (the paper code's view)."""
  return tree["head"]["kernel"]


def artifacts(mean_grads: dict[str, Params]) -> dict[str, jax.Array]:
  """Magnitude ratio and cosine for the whole model (`*_all`) and the last layer (`*_last`)."""
  clean, poison = mean_grads["clean"], mean_grads["poison"]
  ratio_all, cos_all = ratio_and_cosine(clean, poison)
  ratio_last, cos_last = ratio_and_cosine(last_layer_kernel(clean), last_layer_kernel(poison))
  return {
    "ratio_all": ratio_all,
    "cosine_all": cos_all,
    "ratio_last": ratio_last,
    "cosine_last": cos_last,
    "clean_norm_all": jnp.linalg.norm(_flat(clean)),
    "poison_norm_all": jnp.linalg.norm(_flat(poison)),
    "clean_norm_last": jnp.linalg.norm(_flat(last_layer_kernel(clean))),
    "poison_norm_last": jnp.linalg.norm(_flat(last_layer_kernel(poison))),
  }


# ------------------------------------------------------------------ PCA / KMeans


def pca_2d(x_ND: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Projection on the first two principal components: (`z_N2`, `components_2D`, `mean_D`)."""
  x_ND = jnp.asarray(x_ND, jnp.float32).reshape(np.shape(x_ND)[0], -1)
  mean_1D = jnp.mean(x_ND, axis=0, keepdims=True)
  _, _, vt = jnp.linalg.svd(x_ND - mean_1D, full_matrices=False)
  comps_2D = vt[:2]
  return (x_ND - mean_1D) @ comps_2D.T, comps_2D, mean_1D[0]


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def kmeans(key: jax.Array, x_ND: jax.Array, k: int, iterations: int = 50):
  """Lloyd's KMeans from k random distinct points: (`centers_KD`, `assign_N`).

  A cluster that loses all its points keeps its center.
  """
  x_ND = x_ND.reshape(x_ND.shape[0], -1)
  init = jax.random.choice(key, x_ND.shape[0], (k,), replace=False)
  centers_KD = x_ND[init]

  def assign(c_KD):
    d_NK = jnp.sum(x_ND**2, 1)[:, None] - 2 * x_ND @ c_KD.T + jnp.sum(c_KD**2, 1)[None, :]
    return jnp.argmin(d_NK, axis=1)

  def step(c_KD, _):
    onehot_NK = jax.nn.one_hot(assign(c_KD), k)
    count_K = jnp.sum(onehot_NK, 0)
    new_KD = onehot_NK.T @ x_ND / jnp.maximum(count_K, 1.0)[:, None]
    return jnp.where(count_K[:, None] > 0, new_KD, c_KD), None

  centers_KD, _ = jax.lax.scan(step, centers_KD, None, length=iterations)
  return centers_KD, assign(centers_KD)


def count_distinct(x_ND: np.ndarray, decimals: int = 4) -> int:
  """Number of distinct points (rounded to `decimals`): §7.1 found 3-4 among 4,320."""
  flat = np.round(np.asarray(x_ND).reshape(len(x_ND), -1), decimals)
  return int(np.unique(flat, axis=0).shape[0]) if len(flat) else 0


def plot_poison_pca(path: str, x_ND, y_N, poison_sets: dict, *, key: jax.Array, k: int = 2):
  """Fig. 8: clean points and each attack's poisons in the clean data's 2-D PCA.

  KMeans (k clusters) runs on the poisons of each attack. Returns one row per
  attack with the number of poisons, distinct poisons, and cluster sizes.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_ND = np.asarray(x_ND).reshape(len(x_ND), -1)
  _, comps_2D, mean_D = pca_2d(x_ND)
  mean_D, comps_2D = np.asarray(mean_D), np.asarray(comps_2D)
  proj = lambda a: (np.asarray(a).reshape(len(a), -1) - mean_D) @ comps_2D.T
  z_clean = proj(x_ND)
  fig, axes = plt.subplots(
    1, len(poison_sets), figsize=(5.5 * len(poison_sets), 4.8), squeeze=False
  )
  rows = []
  for ax, (attack, (px, py)) in zip(axes[0], poison_sets.items(), strict=True):
    z_p = proj(px)
    kk = min(k, len(px))
    _, assign = kmeans(key, jnp.asarray(np.asarray(px).reshape(len(px), -1)), kk)
    sizes = np.bincount(np.asarray(assign), minlength=kk)
    for label in np.unique(y_N):
      sel = np.asarray(y_N) == label
      ax.scatter(z_clean[sel, 0], z_clean[sel, 1], s=3, alpha=0.25, label=f"clean class {label}")
    for label in np.unique(py):
      sel = np.asarray(py) == label
      ax.scatter(
        z_p[sel, 0], z_p[sel, 1], s=40, marker="x", label=f"poisons labelled {label} ({sel.sum()})"
      )
    ax.set_title(f"{attack}: {len(px)} poisons, {count_distinct(px)} distinct")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best")
    rows.append(
      {
        "attack": attack,
        "n_poisons": len(px),
        "n_distinct": count_distinct(px),
        "kmeans_sizes": "/".join(str(int(s)) for s in sorted(sizes, reverse=True)),
      }
    )
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return rows
