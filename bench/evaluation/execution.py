"""How the evaluated model is executed: memory format, autocast, ``torch.compile``, and batch sizes that fit.

None of these options changes what is evaluated, only how it is computed; bf16/fp16 autocast does change the numbers
(lower-precision logits and gradients), so every option is part of the run key and stored in the record.
All are off by default, so that a record is float32 and comparable wherever it was made. On a CPU they run and
keep predictions (tested); measured here they are faster there too (docs/performance.md), bf16 at the price of
logits that move by up to 0.26 on ResNet-20.

Out-of-memory back-off: a batch that raises ``torch.OutOfMemoryError`` is split in two halves, each attacked on
its own (recursively, down to single images); the record counts the splits. ``--batch-size auto`` picks the
largest batch (up to the subset size, at most 1024) whose forward+backward through the pipeline fits, halving
from there on out-of-memory; on a CPU it is 128, the measured best there.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import bpda_call
from bench.core.errors import BenchError

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BATCH_SIZE = 128
MAX_AUTO_BATCH = 1024


@dataclass(frozen=True)
class Execution:
    """Execution options of a run (all off by default)."""

    channels_last: bool = False
    autocast: Optional[str] = None  # None, "bf16" or "fp16"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.autocast not in (None, *AUTOCAST_DTYPES):
            raise BenchError(f"--autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.autocast!r}")

    @property
    def default(self) -> bool:
        return self == Execution()

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Executed(nn.Module):
    """``model`` run with the execution options; the same interface (``forward``, ``bpda_forward``, ``stochastic``).

    Logits come back as float32 whatever the autocast dtype, so losses and gradients w.r.t. the float32 input
    are computed as usual."""

    def __init__(self, model: nn.Module, execution: Execution) -> None:
        super().__init__()
        self.model, self.execution = model, execution
        if execution.channels_last:
            model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(model) if execution.compile else model

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.model, "stochastic", False))

    def _context(self, x: torch.Tensor):
        if self.execution.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.execution.autocast])

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.execution.channels_last and x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._context(x):
            out = self._forward(self._input(x))
        return out.float()

    def bpda_forward(self, x: torch.Tensor, stages: Tuple[str, ...] = ()) -> torch.Tensor:
        with self._context(x):
            out = bpda_call(self.model, self._input(x), stages)
        return out.float()


def executed(model: nn.Module, execution: Execution) -> nn.Module:
    """``model`` itself when every option is off (nothing wrapped, nothing changed), else ``Executed``."""
    return model if execution.default else Executed(model, execution)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def auto_batch_size(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> int:
    """The largest batch (a power of two up to the images given, at most 1024) whose forward+backward through
    ``model`` fits; 128 on a CPU."""
    if torch.device(device).type != "cuda":
        return CPU_BATCH_SIZE

    def probe(size: int) -> None:
        reps = -(-size // len(x))
        xb = x.repeat(reps, 1, 1, 1)[:size].to(device).requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xb), y.repeat(reps)[:size].to(device)), xb)

    return largest_fitting(probe, min(len(x), MAX_AUTO_BATCH), device)


def largest_fitting(probe: Callable[[int], None], limit: int, device: torch.device | str = "cpu") -> int:
    """The largest power of two <= ``limit`` for which ``probe(size)`` does not run out of memory."""
    size = 1 << (max(limit, 1).bit_length() - 1)
    while True:
        try:
            probe(size)
            return size
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_out_of_memory(exc) or size == 1:
                raise
        free_memory(device)
        log.info("a batch of %d does not fit, trying %d", size, size // 2)
        size //= 2


def split_on_oom(run: Callable[[Any, int], Dict[str, Any]], positions, device, depth: int = 0) -> Dict[str, Any]:
    """``run(positions, depth)`` for one batch; on out-of-memory, the two halves on their own (recursively), merged:
    per-point lists are concatenated, costs added, and ``oom_splits`` counts the splits."""
    try:
        return run(positions, depth)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
        if not is_out_of_memory(exc) or len(positions) == 1:
            raise
    free_memory(device)
    half = len(positions) // 2
    log.warning("out of memory on a batch of %d images: splitting it into %d + %d", len(positions), half,
                len(positions) - half)
    parts = [split_on_oom(run, positions[:half], device, depth + 1), split_on_oom(run, positions[half:], device, depth + 1)]
    merged: Dict[str, Any] = {"oom_splits": 1 + sum(p.get("oom_splits", 0) for p in parts)}
    for key, value in parts[0].items():
        if key == "oom_splits":
            continue
        if isinstance(value, list):
            merged[key] = value + parts[1][key]
        elif isinstance(value, dict):
            merged[key] = {k: v + parts[1][key][k] for k, v in value.items()}
    return merged
