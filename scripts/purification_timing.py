"""Seconds per image of a defense's purification (transform + purifier stages, no classification), at batch 1 and
a larger batch: the measurement behind the purification times in docs/aid-purifier.md (AID-Purifier's Table 2
reports, for CIFAR-10 on one RTX 2080 Ti at batch 1, 0.29 s per image for AID-Purifier and 40.54 s for PixelDefend).

Usage: BENCH_WEIGHTS_DIR=... BENCH_DATA_DIR=... .venv/bin/python scripts/purification_timing.py \
           --defense aid-purifier --defense pixeldefend --classifier resnet20 [--batch 1 --batch 128] [--out timing.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.classifiers import load_classifier
from bench.core.record import environment
from bench.data.datasets import load_dataset
from defenses.base import build_defense


def purify_seconds(defense, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one purification of the batch ``x`` (after one warm-up)."""
    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            defense.purifier(defense.transform(x))
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", action="append", required=True)
    parser.add_argument("--classifier", default="resnet20")
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    test = load_dataset("cifar10-jpeg", "test")
    classifier = load_classifier(args.classifier, torch.device("cpu"))
    rows = []
    for name in args.defense:
        defense = build_defense(name, classifier).eval()
        for batch in args.batch or [1, 128]:
            x = torch.tensor(test.images[:batch]).permute(0, 3, 1, 2).float().div(255).contiguous()
            seconds = purify_seconds(defense, x, args.repeats)
            rows.append({"defense": name, "classifier": args.classifier, "batch": batch, "seconds_per_batch": seconds,
                         "seconds_per_image": seconds / batch})
            print(f"{name:28s} {args.classifier:10s} batch {batch:4d}: {seconds:8.3f} s per batch, "
                  f"{seconds / batch:8.4f} s per image")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"rows": rows, "threads": torch.get_num_threads(), "environment": environment()}, handle, indent=2)


if __name__ == "__main__":
    main()
