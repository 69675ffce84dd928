"""Is our suite at least as strong as AutoAttack? Pair run records on the same images and compare them.

Records are paired by (dataset, subset hash, defense, classifier, threat); "reference" records are those made
with the ``autoattack-standard`` or ``autoattack-rand`` suites. For each pair: clean accuracy, our robust
accuracy (worst case over the re-classification draws) and AutoAttack's own (the points its attack broke, not the
Square and transfer sanity checks that follow it in the reference suite), the points only one of them broke, and the
verdict (ours at most one point above AutoAttack). Both sides use the verdict rule: the same clean floor (every draw
right; the clean pass is seeded alike, so the points are the same), and a point is broken when pyautoattack's own
verdict or the harness's draws on its example say so.

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
        floor = [c >= ours["settings"].get("success_draws", 1) for c in ours["samples"].get("clean_draws_right", [])] \
            or ours["samples"]["clean_correct"]
        ours_broken = {i for i, (f, r) in enumerate(zip(floor, ours["samples"]["robust"])) if f and not r}
        # AutoAttack's own breaks: the points its attack broke, not the sanity checks that follow it in the suite
        aa_labels = {a["label"] for a in ref["attacks"] if a["attack"] == "autoattack"}
        aa_broken = {i for i, by in enumerate(ref["samples"]["broken_by"]) if by in aa_labels}
        same_points = floor == ([c >= ref["settings"].get("success_draws", 1) for c in ref["samples"].get("clean_draws_right", [])]
                                or ref["samples"]["clean_correct"])
        aa_robust = sum(floor) - len(aa_broken)
        ok = ours["robust"]["correct"] <= aa_robust + 1  # within one point
        weaker += not ok
        rows.append([
            ours["defense"]["name"], ours["classifier"]["name"], f"{ours['threat']['eps'] * 255:.3g}/255", ours["subset"]["n"],
            f"{100 * ours['clean']['accuracy']:.2f}", f"{100 * sum(floor) / len(floor):.2f}" + ("" if same_points else " (differs)"),
            f"{ours['suite']['name']} v{ours['suite']['version']} {ours['suite']['budget']}",
            f"{100 * ours['robust']['accuracy']:.2f}", ref["suite"]["name"], f"{100 * aa_robust / len(floor):.2f}",
            len(aa_broken - ours_broken), len(ours_broken - aa_broken),
            f"{ours['timing']['seconds']:.0f} / {ref['timing']['seconds']:.0f}", "yes" if ok else "NO",
        ])
    print(tabulate(rows, headers=["defense", "classifier", "eps", "n", "clean %", "no attack %", "our suite", "ours worst %",
                                  "reference", "AA worst %", "AA-only breaks", "ours-only breaks", "seconds ours / AA",
                                  "ours <= AA + 1 point"], tablefmt="github"))
    return 1 if weaker else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
