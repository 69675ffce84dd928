"""Measure the EOT-20 gradient time for several chunk sizes; the source of the CPU default in attacks/adaptive.py.

Usage: BENCH_WEIGHTS_DIR=... .venv/bin/python scripts/eot_chunk_benchmark.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from attacks.adaptive import EOTOracle
from attacks.losses import ce
from bench.classifiers import load_classifier


class Noisy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + 0.05 * torch.randn_like(x))


def median_ms(oracle: EOTOracle, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> float:
    oracle.loss_grad(x, y, ce)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        oracle.loss_grad(x, y, ce)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    model = Noisy(load_classifier("resnet20"))
    print("batch | " + " | ".join(["loop", "chunk 32", "chunk 128", "all draws"]) + "  (ms per EOT-20 gradient)")
    for batch in (1, 8, 32, 128):
        x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        cells = [median_ms(EOTOracle(model, 20, chunk), x, y) for chunk in (batch, 32, 128, 20 * batch)]
        print(f"{batch:5d} | " + " | ".join(f"{c:8.0f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
