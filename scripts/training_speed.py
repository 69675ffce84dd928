"""Seconds per AToP training step in float32 and under bf16 autocast (the numbers in docs/atop.md, "Training speed").

    python scripts/training_speed.py --width 32 64 --steps 5

Times ``pretrain_step`` and ``finetune_step`` of the GAN purifier before ResNet-20 on batches of real training
images, after one warm-up step, and the largest difference between the two modes' purified outputs of one batch
from the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.classifiers import load_classifier
from bench.data.datasets import load_dataset
from defenses.atop_training import AToPSettings, AToPTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--transform", default="rt2")
    args = parser.parse_args()
    train = load_dataset("cifar10-jpeg", "train")
    x = torch.from_numpy(train.images[:args.batch_size]).permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(train.labels[:args.batch_size]).long()
    classifier = load_classifier("resnet20", "cpu")
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} timed steps after 1 warm-up")
    print("width  stage     float32 s/step  bf16 s/step  ratio  max |P_bf16(x) - P_fp32(x)|")
    for width in args.width:
        for stage in ("pretrain", "finetune"):
            seconds = {}
            for mode in ("fp32", "bf16"):
                torch.manual_seed(0)
                trainer = AToPTrainer(AToPSettings(transform=args.transform, purifier="gan", width=width), classifier,
                                      torch.device("cpu"))
                step = (lambda: trainer.pretrain_step(x)) if stage == "pretrain" else (lambda: trainer.finetune_step(x, y))
                context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext
                with context():
                    step()
                started = time.perf_counter()
                for _ in range(args.steps):
                    with context():
                        step()
                seconds[mode] = (time.perf_counter() - started) / args.steps
            torch.manual_seed(0)
            trainer = AToPTrainer(AToPSettings(transform=args.transform, purifier="gan", width=width), classifier,
                                  torch.device("cpu"))
            with torch.no_grad():
                t = trainer.transform(x)
                full = trainer.generator(t)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    half = trainer.generator(t).float()
            print(f"{width:5d}  {stage:8s}  {seconds['fp32']:14.3f}  {seconds['bf16']:11.3f}  "
                  f"{seconds['bf16'] / seconds['fp32']:5.2f}  {(half - full).abs().max().item():.4f}")


if __name__ == "__main__":
    main()
