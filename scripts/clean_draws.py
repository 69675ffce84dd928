"""Clean accuracy of a defense on the fixed test subset, over several draws of its randomness.

How docs/ reads the clean accuracy of a candidate checkpoint before shipping it (``mean of 3 draws, seeds
1000-1002``): draw ``k`` runs with ``torch.manual_seed(1000 + k)``, one line per draw and their mean. It is a
checkpoint-selection reading, not a board number (a board's "clean" is the record's one draw under its suite).

    python scripts/clean_draws.py --defense atop --defense-option checkpoint=/path/finetune.pt --draws 3
    python scripts/clean_draws.py --defense diffpure --defense-option checkpoint=/path/score.pt --n 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
from bench.cli import parse_options  # noqa: E402


def draw_predictions(defense: torch.nn.Module, x: torch.Tensor, draws: int, batch_size: int = 128) -> List[torch.Tensor]:
    """The defense's predicted labels for ``x``, once per draw (draw ``k`` seeded ``1000 + k``)."""
    preds = []
    for k in range(draws):
        torch.manual_seed(1000 + k)
        with torch.no_grad():
            preds.append(torch.cat([defense(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]))
    return preds


def clean_draws(defense: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int,
                batch_size: int = 128) -> List[float]:
    """Percent of ``x`` the defense classifies as ``y``, once per draw (seeded ``1000 + k``)."""
    return [100 * (pred == y).float().mean().item() for pred in draw_predictions(defense, x, draws, batch_size)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", required=True)
    parser.add_argument("--classifier", default="resnet20")
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    defense = bench.load_defense(args.defense, args.classifier, **parse_options(args.defense_option))
    subset = bench.load_subset(args.dataset, args.n, 0)
    start = time.perf_counter()
    accs = clean_draws(defense, subset.x, subset.y, args.draws, args.batch_size)
    options = " ".join(args.defense_option)
    print(f"{args.defense} {options} on {args.classifier}, {args.dataset}, n = {args.n}: mean {sum(accs) / len(accs):.2f}% "
          f"over {args.draws} draws ({', '.join(f'{a:.2f}' for a in accs)}), {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
