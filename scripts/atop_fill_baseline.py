"""What AToP's RT1 mask costs the classifier when the holes are filled with no learning at all.

RT1 removes a random quarter of the 4x4 patches and a purifier inpaints them. As a floor for any learned purifier,
this script fills the holes by a discrete Laplace fill (each masked pixel set to the mean of its four neighbours,
repeated ``--iters`` times, the pixels the mask keeps held fixed) and by zeros, then classifies with the frozen
classifier on the fixed test subset, one line per fill with each draw of the masks (seeds 1000 + k, as the clean
accuracy of the purifiers in docs/atop.md is read).

    python scripts/atop_fill_baseline.py --classifier resnet20 --n 512 --draws 3

docs/atop.md quotes the result (the RT1 + GAN at width 64 section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from clean_draws import clean_draws  # noqa: E402
from defenses.transforms import RT1  # noqa: E402


def laplace_fill(known: torch.Tensor, mask: torch.Tensor, iters: int) -> torch.Tensor:
    """``known`` (B, 3, H, W) with zeros where ``mask`` (B, 1, H, W) is 0; the holes relaxed to their neighbours' mean."""
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    x = known.clone()
    for _ in range(iters):
        x = mask * known + (1 - mask) * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x


class FilledRT1(torch.nn.Module):
    """RT1's mask, the holes filled by ``fill(known, mask)`` with no learning, then the frozen classifier."""

    def __init__(self, fill, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.transform, self.fill, self.classifier = RT1(), fill, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked = self.transform(x)
        return self.classifier(self.fill(masked[:, :3], masked[:, 3:4]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="resnet20")
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    classifier = bench.load_classifier(args.classifier).eval()
    subset = bench.load_subset(args.dataset, args.n, 0)
    fills = {"zeros": lambda known, mask: known, "laplace": lambda known, mask: laplace_fill(known, mask, args.iters)}
    for name, fill in fills.items():
        accs = clean_draws(FilledRT1(fill, classifier), subset.x, subset.y, args.draws)
        print(f"{name}: mean {sum(accs) / len(accs):.2f}% over {args.draws} draws "
              f"({', '.join(f'{a:.2f}' for a in accs)}), {args.classifier} on {args.dataset}, n = {args.n}")


if __name__ == "__main__":
    main()
