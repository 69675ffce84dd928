"""How far DiffPure's adjoint input gradient is from the exact one on the shipped score model (docs/diffpure.md).

For the first ``--images`` images of the fixed subset, both routes purify from the same initial noise along the same
Brownian path (``brownian_for`` after the same seed) and differentiate the frozen classifier's cross-entropy on the
purified images; this prints, per solver grid, the seconds of each route, the gradients' norms, and per image the
cosine and the sign agreement between the two gradients. The unit test (tests/test_diffpure.py) checks agreement on a
tiny score model; this measures it on the real one.

    python scripts/diffpure_gradient_agreement.py --steps 10 100 [--images 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.api import load_defense, load_subset
from defenses.diffpure import DiffPurification, brownian_for, diffuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100], help="solver grids (default 10 100)")
    parser.add_argument("--images", type=int, default=4, help="images of the 512 subset (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the initial noise and the Brownian path")
    args = parser.parse_args()

    defense = load_defense("diffpure")
    subset = load_subset("cifar10-jpeg", 512, 0)
    x, y = subset.x[:args.images], subset.y[:args.images]
    for steps in args.steps:
        purifier = DiffPurification(defense.purifier.score, defense.purifier.t_star, steps)
        grads = {}
        for route in ("exact", "adjoint"):
            torch.manual_seed(args.seed)
            xi = x.clone().requires_grad_(True)
            noisy = diffuse(2 * xi - 1, purifier.t_star)
            path = brownian_for(noisy, purifier.t_star)
            start = time.perf_counter()
            out = (purifier.reverse(noisy, brownian=path, exact_grad=True) if route == "exact"
                   else purifier.reverse_adjoint(noisy, path))
            loss = F.cross_entropy(defense.classifier(((out + 1) / 2).clamp(0, 1)), y)
            grads[route] = torch.autograd.grad(loss, xi)[0]
            print(f"{steps} steps, {route}: {time.perf_counter() - start:.1f} s, |grad| {grads[route].norm():.4g}")
        exact, adjoint = grads["exact"].flatten(1), grads["adjoint"].flatten(1)
        cosine = F.cosine_similarity(exact, adjoint)
        signs = (exact.sign() == adjoint.sign()).float().mean(1)
        print(f"{steps} steps: cosine per image {[round(c, 3) for c in cosine.tolist()]}, "
              f"sign agreement {[round(v, 3) for v in signs.tolist()]}")


if __name__ == "__main__":
    main()
