"""One run over several processes (``torchrun --nproc-per-node K -m bench run ...``), with torch.distributed.

Every process loads the same subset, defense and suite. The batches of each stage (the clean pass, then each
attack) are dealt round-robin: batch b runs on rank b mod K. After each stage the ranks exchange their batch
results (``all_gather_object``), so every rank holds the same per-sample state before the next attack picks the
points still robust. The batches are exactly those of a single-process run, seeded the same way, so the
per-sample results, accuracies and pass counts equal a single-process run's; only timings differ. Rank 0 writes
the record. Each rank saves its finished batches in the run's state folder, so a killed run resumes per shard.

Backends: gloo on CPU, NCCL on CUDA (each rank on GPU ``LOCAL_RANK``). Multi-node runs use torchrun's own
rendezvous options (``--nnodes``, ``--rdzv-endpoint``); nothing here depends on the node count.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1); False when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def world() -> Tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def mine(batch: int) -> bool:
    """Whether this rank runs batch number ``batch`` of a stage."""
    rank, size = world()
    return batch % size == rank


def share(local: Dict[int, Any]) -> Dict[int, Any]:
    """Every rank's {batch: result}, merged (the identity outside a process group)."""
    rank, size = world()
    if size == 1:
        return local
    parts: list = [None] * size
    dist.all_gather_object(parts, local)
    merged: Dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
