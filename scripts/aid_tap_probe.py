"""Which layers of a classifier register an attack: linear probes on clean-vs-PGD features, one per tap and pooling.

AID-Purifier's discriminator reads two layers of the frozen classifier, globally average-pooled (App. A.2). Whether a
discriminator can separate clean from adversarial inputs at all depends on whether those layers move under the
attack. This script measures that directly, before any discriminator is trained: it crafts linf PGD-10 (8/255, step
2/255, random start; AID's training attack) on ``--n`` training images, reads every candidate tap of the classifier
under each pooling, trains a logistic probe on 80% of the (clean, PGD) pairs, and reports its accuracy on the other
20% (pairs split together, so no image is on both sides; chance is 50%). Last, the two taps AID's discriminator reads
by default, pooled and concatenated, under the linear probe and a one-hidden-layer network.

Poolings: ``mean`` (global average, what AID's discriminator reads), ``mean+std`` (per-channel mean and standard
deviation over space) and ``grid4`` (4x4 average pooling, flattened: where in the image the activation moves). The
logits (``linear``/``fc``) are read ``sorted`` (how confident, whatever the class) and ``raw``.

    python scripts/aid_tap_probe.py --classifier resnet20-at8 --n 2400

Prints one JSON line per (tap, pooling) and a summary table; docs/aid-purifier.md quotes the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.gradient import plain_pgd  # noqa: E402
from bench.classifiers import load_classifier  # noqa: E402
from bench.data.datasets import load_dataset  # noqa: E402
from defenses.aid_purifier import aid_layers  # noqa: E402

TAPS = ("conv1", "layer1", "layer2", "layer3", "layer4", "linear1", "linear", "linear2", "fc")
POOLINGS = ("mean", "mean+std", "grid4")


LOGIT_READINGS = ("sorted", "raw")  # the logits: one vector per image, nothing to pool; sorted = how confident


def readings(features: torch.Tensor) -> Tuple[str, ...]:
    return LOGIT_READINGS if features.dim() == 2 else POOLINGS


def pooled(features: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "sorted":
        return features.sort(dim=1, descending=True).values
    if pooling == "raw":
        return features
    if pooling == "mean":
        return features.mean(dim=(2, 3))
    if pooling == "mean+std":
        return torch.cat([features.mean(dim=(2, 3)), features.std(dim=(2, 3))], dim=1)
    return F.adaptive_avg_pool2d(features, 4).flatten(1)


def collect(classifier, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    net = getattr(classifier, "net", classifier)
    captured: Dict[str, torch.Tensor] = {}
    handles = [getattr(net, name).register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
               for name in names]
    try:
        with torch.no_grad():
            classifier(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: {p: pooled(captured[name], p) for p in readings(captured[name])} for name in names}


def probe(train_x: torch.Tensor, train_t: torch.Tensor, test_x: torch.Tensor, test_t: torch.Tensor,
          steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised features, full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(a.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + bias, train_t) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias > 0).float() == test_t).float().mean().item()


def mlp_probe(train_x: torch.Tensor, train_t: torch.Tensor, test_x: torch.Tensor, test_t: torch.Tensor,
              hidden: int = 256, steps: int = 500) -> float:
    """Held-out accuracy of a one-hidden-layer ReLU network (standardised features, Adam, weight decay): a nonlinear
    reading of the same features, closer to what AID's discriminator can learn than the linear probe."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    net = torch.nn.Sequential(torch.nn.Linear(a.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(a).squeeze(1), train_t).backward()
        opt.step()
    with torch.no_grad():
        return ((net(b).squeeze(1) > 0).float() == test_t).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--n", type=int, default=2400, help="training images (each gives one clean and one PGD input)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    classifier = load_classifier(args.classifier)
    net = getattr(classifier, "net", classifier)
    names = [name for name in TAPS if getattr(net, name, None) is not None]
    train = load_dataset("cifar10-jpeg", "train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    feats: Dict[str, Dict[str, List[List[torch.Tensor]]]] = {n: {} for n in names}
    broken = 0
    for start in range(0, args.n, args.batch_size):
        x, y = train.tensors(order[start:start + args.batch_size].numpy())
        x_adv = plain_pgd(classifier, x, y, args.eps, 2 / 255, 10)
        with torch.no_grad():
            broken += (classifier(x_adv).argmax(1) != y).sum().item()
        for side, inputs in enumerate((x, x_adv)):
            for name, by_pool in collect(classifier, names, inputs).items():
                for p, value in by_pool.items():
                    feats[name].setdefault(p, [[], []])[side].append(value)
    cut = int(0.8 * args.n)

    def split(clean: torch.Tensor, adv: torch.Tensor):
        """Train on the first 80% of the pairs, test on the rest: both inputs of an image on the same side."""
        labels = lambda k: torch.cat([torch.zeros(k), torch.ones(k)])  # noqa: E731
        return (torch.cat([clean[:cut], adv[:cut]]), labels(cut), torch.cat([clean[cut:], adv[cut:]]), labels(args.n - cut))

    rows = []
    for name in names:
        for p, sides in feats[name].items():
            clean, adv = (torch.cat(v) for v in sides)
            shift = ((adv.mean(0) - clean.mean(0)).abs() / (clean.std(0) + 1e-6)).mean().item()
            row = {"classifier": args.classifier, "tap": name, "pooling": p, "dim": clean.shape[1],
                   "heldout_separation": round(probe(*split(clean, adv)), 4),
                   "mean_shift_in_sd": round(shift, 3), "pairs": args.n, "pgd_error_rate": round(broken / args.n, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    low, high = aid_layers(classifier)  # what AID's discriminator reads by default: both taps, globally pooled
    clean, adv = (torch.cat([torch.cat(feats[low]["mean"][side]), torch.cat(feats[high]["mean"][side])], dim=1) for side in (0, 1))
    pair = {"classifier": args.classifier, "tap": f"{low}+{high}", "pooling": "mean", "dim": clean.shape[1],
            "heldout_separation": round(probe(*split(clean, adv)), 4),
            "heldout_separation_mlp": round(mlp_probe(*split(clean, adv)), 4), "pairs": args.n}
    print(json.dumps(pair), flush=True)
    print(f"\n{args.classifier}: PGD-10 at eps {args.eps * 255:.0f}/255 fools the classifier on {100 * broken / args.n:.1f}% "
          f"of {args.n} training images; held-out probe accuracy (chance 50%):")
    for name in names:
        print(f"  {name:8s} " + "  ".join(f"{p} {100 * r['heldout_separation']:.1f}" for r in rows if r["tap"] == name
                                          for p in [r["pooling"]]))
    print(f"  AID's default taps {pair['tap']} (mean-pooled, concatenated): linear {100 * pair['heldout_separation']:.1f}, "
          f"one hidden layer {100 * pair['heldout_separation_mlp']:.1f}")


if __name__ == "__main__":
    main()
