"""AToP Table 7 in the paper's shape, from run records of the ``atop-table7`` suite, beside the paper's numbers.

A pure function of the records and ``leaderboards/papers/atop.json``: rows are transform x {pre-trained only,
AToP fine-tuned}; every cell reads ``measured (paper)``. All records must share one subset hash (numbers
from different images never share a table).

    python -m leaderboards.atop_tables RECORD.json [RECORD.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

PAPERS = Path(__file__).with_name("papers")
# Table 7 column -> key of our attack in the record (exact gradients); "clean" is the clean pass.
COLUMNS = {"FGSM": "fgsm", "PGD-10": "pgd10", "PGD-20": "pgd20"}


def paper_table(paper: str, table: str) -> Dict[str, object]:
    data = json.loads((PAPERS / f"{paper}.json").read_text())
    return next(t for t in data["tables"] if t["table"] == table)


def _attack_key(attack: Dict[str, object]) -> str:
    steps = attack["params"].get("steps")
    return f"{attack['attack']}{steps or ''}" + ("+skip" if attack.get("bpda_stages") else "")


def _per_attack(record: Dict[str, object], field: str) -> Dict[str, float]:
    return {_attack_key(a): 100 * (a[field]["accuracy"] if isinstance(a[field], dict) else a[field]) for a in record["attacks"]}


def _mark(record: Optional[Dict[str, object]]) -> str:
    """† flagged unreliable by the integrity checks, ‡ made without them (``--no-checks``)."""
    if record is None:
        return ""
    if record.get("unreliable"):
        return " †"
    return "" if record.get("checks", {}).get("ran") else " ‡"


def _footnotes(labelled: Sequence[tuple]) -> List[str]:
    notes = [f"† {label} unreliable: {'; '.join(r['unreliable_reasons'])}." for label, r in labelled if r.get("unreliable")]
    unchecked = [label for label, r in labelled if _mark(r) == " ‡"]
    if unchecked:
        notes.append(f"‡ integrity checks not run for {', '.join(unchecked)} (record made with --no-checks).")
    return notes


def _cell(measured: Optional[float], paper: Optional[float]) -> str:
    left = "—" if measured is None else f"{measured:.1f}"
    return left if paper is None else f"{left} ({paper:.1f})"


def atop_table7(records: Sequence[Dict[str, object]], field: str = "robust_alone") -> str:
    """Markdown: Table 7's rows and columns, measured (paper). ``field``: robust_alone or robust_alone_mean."""
    if not records:
        raise ValueError("no records")
    hashes = {r["subset"]["hash"] for r in records}
    if len(hashes) != 1:
        raise ValueError(f"records come from {len(hashes)} different subsets; a table needs one")
    paper = paper_table("atop", "7")
    paper_rows = {(row["transform"], row["atop"]): dict(zip(paper["columns"], row["values"])) for row in paper["rows"]}
    ours, bare = {}, None
    for record in records:
        name = record["defense"]["name"]
        if record["suite"]["name"] != "atop-table7" or not (name.startswith("atop") or name == "none"):
            raise ValueError(f"{name} / {record['suite']['name']}: not an AToP Table 7 record")
        if name == "none":
            bare = record
            continue
        config = record["defense"]["config"]
        ours[(config["transform"], config["stage"] == "finetune")] = record
    rows: List[List[str]] = []
    if bare is not None:  # the bare classifier on the same images (PROTOCOL rule 8); the paper has no such row
        measured = _per_attack(bare, field)
        rows.append(["none (bare classifier)" + _mark(bare), "", _cell(100 * bare["clean"]["accuracy"], None),
                     *(_cell(measured.get(key), None) for key in COLUMNS.values()),
                     *(_cell(measured.get(f"{key}+skip"), None) for key in COLUMNS.values())])
    for transform in ("rt1", "rt2", "rt3"):
        for atop in (False, True):
            record, theirs = ours.get((transform, atop)), paper_rows[(transform, atop)]
            measured = _per_attack(record, field) if record else {}
            clean_value = (record.get("clean_mean", record["clean"]["accuracy"]) if field == "robust_alone_mean"
                           else record["clean"]["accuracy"]) if record else None
            clean = None if clean_value is None else 100 * clean_value
            rows.append([transform.upper() + _mark(record), "✓" if atop else "✗", _cell(clean, theirs["clean"]),
                         *(_cell(measured.get(key), theirs[col]) for col, key in COLUMNS.items()),
                         *(_cell(measured.get(f"{key}+skip"), None) for key in COLUMNS.values())])
    headers = ["transform", "AToP", "clean", *COLUMNS, *(f"{c}, purifier skipped" for c in COLUMNS)]
    any_record = records[0]
    s, suite = any_record["subset"], any_record["suite"]
    what = ("worst case over the re-classification draws; clean = one draw" if field == "robust_alone"
            else "mean over the re-classification draws; clean = mean over the same number of draws")
    note = (f"{s['dataset']}, n = {s['n']} (seed {s['seed']}, subset {s['hash'][:12]}), classifier "
            f"{any_record['classifier']['name']}, suite {suite['name']} v{suite['version']} ({suite['budget']} budget, "
            f"EOT-{suite['eot_draws']}); robust accuracy = {what}. Cells: measured (paper: {paper['setting']['classifier']}, "
            f"{paper['setting']['dataset']}, {paper['setting']['gradients']}).")
    labelled = [("none", bare)] if bare is not None else []
    labelled += [(f"{t.upper()} {'✓' if a else '✗'}", ours[(t, a)]) for t in ("rt1", "rt2", "rt3") for a in (False, True) if (t, a) in ours]
    notes = "".join(f"\n{line}" for line in _footnotes(labelled))
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) + "\n\n" + note + notes + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:])
    records = [json.loads(Path(p).read_text()) for p in paths]
    print(atop_table7(records))
    print()
    print(atop_table7(records, field="robust_alone_mean"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
