"""Is our suite at least as strong as AutoAttack? Pair run records on the same images and compare them.

Records are paired by (dataset, subset hash, defense, classifier, threat); "reference" records are those made
with the ``autoattack-standard`` or ``autoattack-rand`` suites. For each pair: clean accuracy, our robust
accuracy (worst case over the re-classification draws) and AutoAttack's, the points AutoAttack broke that
our suite did not, and the verdict (ours <= AutoAttack). AutoAttack's adversarial examples are re-classified
by the harness exactly like ours, so a stochastic defense is judged by the same worst-case rule on both sides.

Usage: python scripts/compare_with_autoattack.py RECORD_DIR [RECORD_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tabulate import tabulate

REFERENCE = ("autoattack-standard", "autoattack-rand")


def key(record):
    t = record["threat"]
    return (record["subset"]["dataset"], record["subset"]["hash"], record["defense"]["name"], record["classifier"]["name"],
            t["norm"], round(t["eps"], 8))


def main(dirs) -> int:
    records = [json.loads(p.read_text()) for d in dirs for p in sorted(Path(d).glob("*.json"))]
    refs = {key(r): r for r in records if r["suite"]["name"] in REFERENCE}
    rows, weaker = [], 0
    for ours in records:
        ref = refs.get(key(ours))
        if ours["suite"]["name"] in REFERENCE or ref is None:
            continue
        ours_robust, ref_robust = ours["samples"]["robust"], ref["samples"]["robust"]
        missed = sum(1 for a, b in zip(ours_robust, ref_robust) if a and not b)
        ok = ours["robust"]["correct"] <= ref["robust"]["correct"]
        weaker += not ok
        rows.append([
            ours["defense"]["name"], ours["classifier"]["name"], f"{ours['threat']['eps'] * 255:.3g}/255", ours["subset"]["n"],
            f"{100 * ours['clean']['accuracy']:.2f}",
            f"{ours['suite']['name']} v{ours['suite']['version']} {ours['suite']['budget']}",
            f"{100 * ours['robust']['accuracy']:.2f}", f"{100 * ours.get('robust_mean', ours['robust']['accuracy']):.2f}",
            ref["suite"]["name"], f"{100 * ref['robust']['accuracy']:.2f}", f"{100 * ref.get('robust_mean', ref['robust']['accuracy']):.2f}",
            missed, f"{ours['timing']['seconds']:.0f} / {ref['timing']['seconds']:.0f}", "yes" if ok else "NO",
        ])
    print(tabulate(rows, headers=["defense", "classifier", "eps", "n", "clean %", "our suite", "ours worst %", "ours mean %",
                                  "reference", "AA worst %", "AA mean %", "AA-only breaks", "seconds ours / AA",
                                  "ours <= AA"], tablefmt="github"))
    return 1 if weaker else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
