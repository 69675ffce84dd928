"""The fixed evaluation subset: the same (dataset, n, seed) gives the same images everywhere.

Indices are drawn once with ``numpy.random.RandomState(seed).choice(len(test), n, replace=False)`` (the
convention of DiffPure's evaluation) and kept in that order. The record stores the sha256 of the indices
(little-endian int64) and of the pixels (uint8 NHWC bytes of the selected images, then their labels);
``subset_hash`` combines both and is what boards compare. Hashes of the subsets the boards use ship with the package
(``bench/data/subsets.json``) and are checked whenever such a subset is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from bench.core.errors import BenchError
from bench.data.datasets import load_dataset


@dataclass(frozen=True)
class Subset:
    dataset: str
    split: str
    n: int
    seed: int
    indices: np.ndarray
    x: torch.Tensor  # float32 NCHW in [0, 1]
    y: torch.Tensor  # int64
    num_classes: int
    indices_sha256: str
    pixels_sha256: str

    @property
    def subset_hash(self) -> str:
        return hashlib.sha256(f"{self.indices_sha256}:{self.pixels_sha256}".encode()).hexdigest()

    def to_dict(self) -> Dict[str, Any]:
        return {
            "dataset": self.dataset, "split": self.split, "n": self.n, "seed": self.seed,
            "indices_sha256": self.indices_sha256, "pixels_sha256": self.pixels_sha256, "hash": self.subset_hash,
        }


def subset_indices(total: int, n: int, seed: int) -> np.ndarray:
    if not 1 <= n <= total:
        raise BenchError(f"--n must be between 1 and {total} (the size of the test split), got {n}")
    if seed < 0:
        raise BenchError(f"--seed must be >= 0, got {seed}")
    return np.random.RandomState(seed).choice(total, n, replace=False).astype(np.int64)


def load_subset(
    dataset: str = "cifar10-jpeg", n: int = 512, seed: int = 0, split: str = "test", download: bool = False
) -> Subset:
    """Load the fixed subset of ``dataset`` (default: 512 test images, seed 0)."""
    data = load_dataset(dataset, split, download=download)
    indices = subset_indices(len(data), n, seed)
    images = np.ascontiguousarray(data.images[indices])
    labels = np.ascontiguousarray(data.labels[indices].astype(np.int64))
    pixels = hashlib.sha256(images.tobytes() + labels.astype("<i8").tobytes()).hexdigest()
    x, y = data.tensors(indices)
    subset = Subset(
        dataset=dataset, split=split, n=n, seed=seed, indices=indices, x=x, y=y, num_classes=data.num_classes,
        indices_sha256=hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest(), pixels_sha256=pixels,
    )
    if split == "test":
        check_pinned(subset)
    return subset


PINNED_PATH = Path(__file__).with_name("subsets.json")


@lru_cache(maxsize=1)
def pinned_hashes() -> Dict[Tuple[str, int, int], str]:
    """(dataset, n, seed) -> the subset hash that ships with the package (``bench/data/subsets.json``)."""
    entries = json.loads(PINNED_PATH.read_text())["subsets"]
    return {(e["dataset"], int(e["n"]), int(e["seed"])): e["hash"] for e in entries}


def check_pinned(subset: Subset) -> None:
    """A pinned (dataset, n, seed) must give its pinned hash: other images must not reach a record or a board."""
    expected = pinned_hashes().get((subset.dataset, subset.n, subset.seed))
    if expected is not None and expected != subset.subset_hash:
        raise BenchError(f"subset {subset.dataset} n={subset.n} seed={subset.seed} hashes to {subset.subset_hash[:12]}, "
                         f"not the pinned {expected[:12]} (bench/data/subsets.json): the data under BENCH_DATA_DIR are not the "
                         "images the boards were measured on")
