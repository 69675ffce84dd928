"""Issue 4's planted-defense table: naive PGD vs the adaptive suite (with its corrections) vs the flags.

The planted defenses live in ``tests/plugin_examples.py`` (test plug-ins, never registered in the product):
quantization to 8 levels, undeclared Gaussian noise, an argmax palette step. For each one and for the bare
classifier this runs, on the same fixed subset:

- *naive PGD*: PGD-20 as the defense declares itself (no EOT, no BPDA: the evaluation its author would run);
- *adaptive*: ``bench run`` with the threat's suite at the chosen budget, integrity checks and corrections.

Usage: python scripts/planted_defenses.py [--n 128] [--budget cpu] [--out runs/planted] [--defenses planted-chaos ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the plug-in file imports tests.helpers

from tabulate import tabulate

from attacks.suite import AttackSpec, Suite
from bench.core.plugins import load_plugin
from bench.evaluation.engine import evaluate
from bench.evaluation.runner import RunConfig, _resolve, run

PLANTED = ("none", "planted-quantize", "planted-noise", "planted-argmax", "planted-chaos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--budget", default="cpu")
    parser.add_argument("--classifier", default="resnet20")
    parser.add_argument("--out", type=Path, default=Path("runs/planted"))
    parser.add_argument("--defenses", nargs="+", choices=PLANTED, default=list(PLANTED),
                        help="rows to (re)measure; default all")
    args = parser.parse_args()
    load_plugin(Path(__file__).resolve().parents[1] / "tests" / "plugin_examples.py")
    rows = []
    for name in args.defenses:
        config = RunConfig(defense=name, classifier=args.classifier, n=args.n, budget=args.budget, out=args.out)
        device, _, threat, subset, defense = _resolve(config)
        naive_suite = Suite("naive", "1", "cpu", "PGD-20 as declared", threat, 1, (AttackSpec("pgd", (("steps", 20),)),))
        naive = evaluate(defense, subset, naive_suite.build(threat, defense.stochastic, defense.differentiable), threat,
                         who=name, device=device)
        record, path = run(config)
        corrections = record.get("corrections")
        rows.append([
            name, f"{100 * record['clean']['accuracy']:.1f}", f"{100 * naive.robust.mean():.1f}",
            f"{100 * corrections['robust_before']['accuracy']:.1f}" if corrections else "-",
            f"{100 * record['robust']['accuracy']:.1f}",
            "; ".join(record["unreliable_reasons"]) or "none",
            "; ".join(corrections["actions"]) if corrections else "-",
        ])
        print(f"{name}: record {path}", flush=True)
    print(f"\n{args.classifier}, cifar10-jpeg n={args.n} (subset {record['subset']['hash'][:12]}), "
          f"{threat.norm} eps {threat.eps:.6g}, suite {record['suite']['name']} v{record['suite']['version']} ({args.budget})")
    print(tabulate(rows, headers=["defense", "clean %", "naive PGD-20 %", "suite as declared %", "adaptive (corrected) %",
                                  "flags", "correction"], tablefmt="github"))


if __name__ == "__main__":
    main()
