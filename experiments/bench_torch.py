"""The bench's PyTorch side: the same models in PyTorch, plain SGD and Opacus (`--compare=opacus`).

Times a plain PyTorch SGD step (`opacus_sgd`), Opacus with per-sample-gradient
hooks (`opacus_hooks`) and Opacus ghost clipping (`opacus_ghost`) on the
bench's models at the same shapes (NCHW images). Needs the `[compare]` extra
(torch and opacus) only when called (torch is imported inside). PyTorch runs with
OMP_WAIT_POLICY=PASSIVE unless set otherwise: with OpenMP's default spinning
its steps measured 2.5-12x slower on a loaded 2-core machine.

References:
  Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in
  PyTorch", 2021; Li et al. 2022, §4 (ghost clipping, which Opacus implements).
"""

from __future__ import annotations

import os
from typing import Any

from experiments import bench_models

TORCH_METHODS = ("opacus_sgd", "opacus_hooks", "opacus_ghost")


def torch_model(name: str):
  """The bench model `name` in PyTorch (NCHW images, same layer shapes)."""
  import torch  # torch only under --compare=opacus
  import torch.nn as tnn

  if name == "lr":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 2))
  if name == "mlp":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 256), tnn.ReLU(), tnn.Linear(256, 10))
  if name == "deep_mlp":
    layers, width = [tnn.Flatten()], 784
    for out in (512, 128, 64):
      layers += [tnn.Linear(width, out), tnn.Tanh()]
      width = out
    return tnn.Sequential(*layers, tnn.Linear(width, 10))
  if name == "strided_cnn":
    return tnn.Sequential(
      tnn.Conv2d(1, 32, 5, stride=2, padding=2),
      tnn.ReLU(),
      tnn.Conv2d(32, 64, 3, padding=1),
      tnn.ReLU(),
      tnn.AvgPool2d(2),
      tnn.Flatten(),
      tnn.Linear(64 * 7 * 7, 128),
      tnn.ReLU(),
      tnn.Linear(128, 10),
    )
  if name == "resnet18":

    class Block(tnn.Module):
      def __init__(self, cin, cout, stride):
        super().__init__()
        g = min(32, cout)
        self.body = tnn.Sequential(
          tnn.Conv2d(cin, cout, 3, stride, 1, bias=False),
          tnn.GroupNorm(g, cout),
          tnn.ReLU(),
          tnn.Conv2d(cout, cout, 3, 1, 1, bias=False),
          tnn.GroupNorm(g, cout),
        )
        self.skip = tnn.Identity()
        if stride != 1 or cin != cout:
          self.skip = tnn.Sequential(
            tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.GroupNorm(g, cout)
          )

      def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))

    layers, cin = [tnn.Conv2d(3, 64, 3, 1, 1, bias=False), tnn.GroupNorm(32, 64), tnn.ReLU()], 64
    for stage in range(4):
      for block in range(2):
        cout = 64 * 2**stage
        layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
        cin = cout
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(512, 10))
  if name == "transformer":
    from opacus.layers import DPMultiheadAttention

    class Transformer(tnn.Module):
      def __init__(self, width=64, heads=4):
        super().__init__()
        self.embed = tnn.Embedding(bench_models.VOCAB, width)
        self.norm0, self.norm1, self.norm2 = (tnn.LayerNorm(width) for _ in range(3))
        self.attn = DPMultiheadAttention(width, heads, batch_first=True)
        self.mlp = tnn.Sequential(
          tnn.Linear(width, 4 * width), tnn.GELU(), tnn.Linear(4 * width, width)
        )
        self.head = tnn.Linear(width, 10)

      def forward(self, ids):
        h = self.embed(ids)
        q = self.norm0(h)
        h = h + self.attn(q, q, q, need_weights=False)[0]
        h = h + self.mlp(self.norm1(h))
        return self.head(self.norm2(h).mean(dim=1))

    return Transformer()
  side, channels = (28, 1) if name == "cnn_28x28x1" else (32, 3)
  flat = 32 * ((side - 4) // 2) ** 2
  return tnn.Sequential(
    tnn.Conv2d(channels, 16, 3),
    tnn.ReLU(),
    tnn.Conv2d(16, 32, 3),
    tnn.ReLU(),
    tnn.MaxPool2d(2),
    tnn.Flatten(),
    tnn.Linear(flat, 64),
    tnn.ReLU(),
    tnn.Linear(64, 10),
  )


def bench_torch(name: str, batch_size: int, config: Any, budget_s: float) -> list[dict]:
  """Rows for PyTorch SGD, Opacus hooks and Opacus ghost clipping on one model."""
  # Before torch loads its OpenMP runtime: spinning threads stall when cores are shared.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  from opacus import PrivacyEngine

  torch.manual_seed(config.seed)
  data = bench_models.make_batch(name, batch_size, config.seed)
  x = torch.from_numpy(data["x"])
  if x.ndim == 4:  # NHWC -> NCHW
    x = x.permute(0, 3, 1, 2).contiguous()
  if name == "transformer":
    x = x.long()
  y = torch.from_numpy(data["y"]).long()
  loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x.repeat(4, *([1] * (x.ndim - 1))), y.repeat(4)),
    batch_size=batch_size,
  )
  criterion = torch.nn.CrossEntropyLoss()
  runners = {}

  model = torch_model(name)
  opt = torch.optim.SGD(model.parameters(), lr=bench_models.LEARNING_RATE)

  def sgd_once():
    opt.zero_grad(set_to_none=True)
    criterion(model(x), y).backward()
    opt.step()

  runners["opacus_sgd"] = sgd_once
  for mode in ("hooks", "ghost"):
    model_m = torch_model(name)
    opt_m = torch.optim.SGD(model_m.parameters(), lr=bench_models.LEARNING_RATE)
    kwargs = dict(
      module=model_m,
      optimizer=opt_m,
      data_loader=loader,
      noise_multiplier=bench_models.NOISE_MULTIPLIER,
      max_grad_norm=bench_models.L2_NORM_CLIP,
      poisson_sampling=False,
      grad_sample_mode=mode,
    )
    engine = PrivacyEngine()
    try:
      if mode == "ghost":
        model_m, opt_m, crit_m, _ = engine.make_private(criterion=criterion, **kwargs)
      else:
        model_m, opt_m, _ = engine.make_private(**kwargs)
        crit_m = criterion
    except Exception as error:  # noqa: BLE001 (report and go on: Opacus may not support a layer)
      print(f"opacus_{mode} on {name}: not timed ({type(error).__name__}: {error})")
      continue

    def dp_once(model_m=model_m, opt_m=opt_m, crit_m=crit_m):
      opt_m.zero_grad(set_to_none=True)
      crit_m(model_m(x), y).backward()
      opt_m.step()

    runners[f"opacus_{mode}"] = dp_once
  ms = bench_models.time_interleaved(runners, config.repeats, config.warmup, budget_s)
  return [
    dict(model=name, batch=batch_size, method=m, ms_per_step=ms[m], peak_mem_mb=None)
    for m in TORCH_METHODS
    if m in ms
  ]
