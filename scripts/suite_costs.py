"""What each suite budget costs: a table from run records (one row per record).

Columns: defense, classifier, suite and budget, n, robust accuracy, attack time and passes (summed over the
suite's attacks: forward and backward passes, and the images in them), integrity-check time, whole-run time.

Usage: python scripts/suite_costs.py RECORD_DIR_OR_FILE [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tabulate import tabulate


def records(paths):
    for p in map(Path, paths):
        yield from (json.loads(f.read_text()) for f in (sorted(p.glob("*.json")) if p.is_dir() else [p]))


def main(paths) -> int:
    rows = []
    for r in sorted(records(paths), key=lambda r: (r["defense"]["name"], ["smoke", "cpu", "full", "paper"].index(r["suite"]["budget"]))):
        cost = {k: sum(a["cost"][k] for a in r["attacks"]) for k in ("seconds", "forward", "backward", "forward_images", "backward_images")}
        rows.append([
            r["defense"]["name"], r["classifier"]["name"], f"{r['suite']['name']} v{r['suite']['version']} {r['suite']['budget']}",
            r["subset"]["n"], f"{100 * r['robust']['accuracy']:.2f}", f"{cost['seconds']:.1f}", cost["forward"], cost["backward"],
            cost["forward_images"], cost["backward_images"], f"{r['checks'].get('seconds', 0):.1f}", f"{r['timing']['seconds']:.1f}",
        ])
    print(tabulate(rows, headers=["defense", "classifier", "suite", "n", "robust %", "attack s", "fwd passes", "bwd passes",
                                  "fwd images", "bwd images", "checks s", "total s"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
