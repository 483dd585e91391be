"""Tests experiments/bench_torch.py: PyTorch / Opacus rows on the same shapes (needs [compare])."""

import pytest

from experiments import bench
from experiments import bench_torch


def test_bench_compare_opacus(tmp_path):
  pytest.importorskip("opacus")
  config = bench.BenchConfig(
    models=("lr",),
    batch_sizes=(4,),
    repeats=1,
    warmup=1,
    compare="opacus",
    methods=("clip_fast",),
    out=str(tmp_path),
  )
  rows = bench.run(config)
  methods = [r["method"] for r in rows]
  assert methods == ["clip_fast", *bench_torch.TORCH_METHODS]
  assert all(r["ms_per_step"] > 0 for r in rows)
  assert all(r["peak_mem_mb"] is None for r in rows if r["method"].startswith("opacus"))


@pytest.mark.parametrize("name", ["strided_cnn", "transformer"])
def test_torch_models_take_the_bench_inputs(name):
  torch = pytest.importorskip("torch")
  pytest.importorskip("opacus")
  data = bench.bench_models.make_batch(name, 2, 0)
  x = torch.from_numpy(data["x"])
  x = x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.long()
  assert tuple(bench_torch.torch_model(name)(x).shape) == (2, 10)
