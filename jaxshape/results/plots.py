"""Figures of result rows: line plots with error bars, side-by-side panels, PNG written atomically.

matplotlib is imported only when a figure is drawn (Agg canvas, no pyplot
state), so reading and summarising results never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxshape.results.files import PathLike
from jaxshape.results.files import atomic_open


def line_plot(
  path: PathLike,
  series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
  xlabel: str,
  ylabel: str,
  title: str,
  logx: bool = False,
  *,
  logy: bool = False,
  ylim: tuple[float, float] | None = None,
  dpi: int = 150,
) -> None:
  """Writes a line plot with error bars to `path` (PNG, atomically; Agg, no pyplot state).

  Args:
    path: destination image (the format is PNG whatever the suffix).
    series: label -> (x, y_mean, y_std); y_std may be None for no error bars.
    xlabel, ylabel, title: axis labels and title.
    logx: logarithmic x axis (e.g. noise multipliers, poison ratios).
    logy: logarithmic y axis.
    ylim: fixed y range, e.g. (0, 1) for accuracies.
    dpi: resolution.

  Example:
    >>> line_plot("out/acc.png", {"dp": ([0.1, 1.0], [0.9, 0.7], [0.01, 0.02])},
    ...           "noise multiplier", "test accuracy", "DP-SGD", logx=True)
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not series:
    raise ValueError("series must not be empty")
  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  n = len(series)
  for i, (label, (x, y_mean, y_std)) in enumerate(series.items()):
    x_N = np.asarray(x, np.float64)
    y_N = np.asarray(y_mean, np.float64)
    if x_N.shape != y_N.shape or x_N.ndim != 1:
      raise ValueError(f"series {label!r}: x {x_N.shape} and y_mean {y_N.shape} must be equal 1-D")
    yerr_N = None
    if y_std is not None:
      yerr_N = np.asarray(y_std, np.float64)
      if yerr_N.shape != y_N.shape:
        raise ValueError(f"series {label!r}: y_std {yerr_N.shape} must match y {y_N.shape}")
    ax.errorbar(x_N, y_N, yerr=yerr_N, label=str(label), markersize=4, capsize=3, **style(i, n))
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(frameon=False)
  save_figure(fig, path, dpi=dpi)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def style(i: int, n: int) -> dict[str, Any]:
  """Color, marker and line style of series `i` of `n`, all distinct up to 20 series.

  Up to 10 series: matplotlib's tab10 colors with round markers. More: tab20
  colors with a marker and a line style that also change, so no two series of
  a crowded plot (e.g. the 14 defenses of §6.2) share a look.
  """
  if n <= 10:
    return {"color": f"C{i % 10}", "marker": "o", "linestyle": "-"}
  from matplotlib import colormaps

  return {
    "color": colormaps["tab20"](i % 20),
    "marker": _MARKERS[i % len(_MARKERS)],
    "linestyle": ("-", "--")[i // 10 % 2],
  }


def save_figure(fig: Any, path: PathLike, *, dpi: int = 150) -> None:
  """Saves a matplotlib `Figure` to `path` as PNG, atomically."""
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def panel_plot(
  path: PathLike,
  panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float], Any]]]],
  xlabel: str,
  ylabel: str,
  *,
  logx: bool = False,
  ylim: tuple[float, float] | None = None,
  dpi: int = 130,
) -> None:
  """Side-by-side line plots sharing axes labels, one per (title, series) panel.

  Each series is label -> (x, y_mean, y_std) as in `line_plot`; y_std may be
  None. Written atomically as PNG.

  Example:
    >>> panel_plot("out/rad.png", [("label_flip", {"vanilla": (x, m, s)}),
    ...                            ("steinhardt", {"vanilla": (x, m2, s2)})],
    ...            "poisons (%)", "RAD")
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not panels:
    raise ValueError("panels must not be empty")
  fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, series) in zip(axes, panels, strict=True):
    for i, (label, (x, y_mean, y_std)) in enumerate(series.items()):
      x_N = np.asarray(x, np.float64)
      y_N = np.asarray(y_mean, np.float64)
      yerr = None if y_std is None else np.asarray(y_std, np.float64)
      ax.errorbar(
        x_N, y_N, yerr=yerr, label=str(label), markersize=3, capsize=2, **style(i, len(series))
      )
    if logx:
      ax.set_xscale("log")
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
  save_figure(fig, path, dpi=dpi)
