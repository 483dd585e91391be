"""Results of experiments: files on disk, their statistics, their figures.

Three modules, one idea each:
- `files`: CSV rows, JSON and any file written atomically (`atomic_open`);
  cells that round-trip exactly (`format_value`, `parse`).
- `stats`: `mean_std` per group, `wilson_interval`, `format_table`.
- `plots`: `line_plot`, `panel_plot` (matplotlib, imported when drawing).

Every public name is also here, so `jaxshape.results.<name>` is the one
import experiments use:

  >>> results.write_csv("out/results.csv", rows, columns=["defense", "seed", "acc"])
  >>> table = results.mean_std(results.parse(results.read_csv("out/results.csv")),
  ...                          by=["defense"], value="acc")
  >>> print(results.format_table(table, ["defense", "mean", "std", "n"]))
"""

from jaxshape.results.files import PathLike
from jaxshape.results.files import Row
from jaxshape.results.files import atomic_open
from jaxshape.results.files import canonical
from jaxshape.results.files import format_value
from jaxshape.results.files import parse
from jaxshape.results.files import parse_value
from jaxshape.results.files import read_csv
from jaxshape.results.files import read_header
from jaxshape.results.files import read_json
from jaxshape.results.files import write_csv
from jaxshape.results.files import write_json
from jaxshape.results.plots import line_plot
from jaxshape.results.plots import panel_plot
from jaxshape.results.plots import save_figure
from jaxshape.results.plots import style
from jaxshape.results.stats import format_table
from jaxshape.results.stats import mean_std
from jaxshape.results.stats import wilson_interval

__all__ = [
  "PathLike",
  "Row",
  "atomic_open",
  "canonical",
  "format_table",
  "format_value",
  "line_plot",
  "mean_std",
  "panel_plot",
  "parse",
  "parse_value",
  "read_csv",
  "read_header",
  "read_json",
  "save_figure",
  "style",
  "wilson_interval",
  "write_csv",
  "write_json",
]
