"""Plain-text summaries of records: the table ``bench run`` prints and the one-line end-of-run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from tabulate import tabulate

from attacks.base import format_eps


def _pct(acc: Dict) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_result(record: Dict) -> str:
    independent = record["suite"].get("independent", False)
    rows: List[List[object]] = []
    for a in record["attacks"]:
        c = a["cost"]
        mean = a.get("robust_alone_mean")
        # a correction attack runs only on the points the suite left: it has no run-alone reading
        alone = ([_pct(a["robust_alone"]) if "robust_alone" in a else "—", "—" if mean is None else f"{100 * mean:.2f}%"]
                 if independent else [])
        label = a["label"] + (" (correction)" if a.get("stage") == "correction" else "")
        rows.append([label, a["attacked"], a["broken"], *alone, _pct(a["robust_after"]), c["forward"], c["backward"],
                     f"{c['seconds']:.1f}"])
    alone_headers = ["alone [95% CI]", "alone, mean of draws"] if independent else []
    headers = ["attack", "attacked", "broken", *alone_headers, "worst case so far [95% CI]", "fwd", "bwd", "s"]
    table = tabulate(rows, headers=headers)
    s, t = record["subset"], record["threat"]
    head = (f"{record['defense']['name']} on {record['classifier']['name']} | {s['dataset']} n={s['n']} seed={s['seed']} "
            f"subset {s['hash'][:12]} | {t['norm']} eps={format_eps(t['norm'], t['eps'])} | suite {record['suite']['name']} v{record['suite']['version']} "
            f"({record['suite']['budget']} budget)")
    draws = record["settings"].get("success_draws", 1)
    rule = f"; each example classified {draws} times, broken if any draw is wrong" if draws > 1 else ""
    lines = [head, f"clean accuracy: {_pct(record['clean'])}" + (" (one draw)" if draws > 1 else "")]
    if draws > 1 and "clean_worst" in record:
        lines.append(f"  no-attack floor (all {draws} draws right): {_pct(record['clean_worst'])}; mean over the draws: "
                     f"{100 * record['clean_mean']:.2f}%")
    lines += [table, f"robust accuracy (worst case over the suite{rule}): {_pct(record['robust'])}"]
    if draws > 1 and "robust_mean" in record:
        lines.append(f"  mean over the draws: {100 * record['robust_mean']:.2f}%, majority vote: {_pct(record['robust_majority'])}")
    elif draws > 1:
        lines.append(f"  no mean or majority: {record.get('mean_omitted', 'not measured')}")
    h = record["headline"]
    timing = record["timing"]
    # a resumed run: more than one part; older records have no part count, and there the attacks' time exceeding the
    # last part's says so (not in a record that has it: under torchrun the attack seconds add up over the ranks)
    resumed = (timing["parts"] > 1 if "parts" in timing
               else timing.get("attack_seconds", 0.0) > timing["seconds"])
    parts = f"{timing['parts']} parts" if "parts" in timing else "every part"
    took = (f"in {timing['seconds']:.1f} s (the last part of a resumed run; the attacks took "
            f"{timing['attack_seconds']:.1f} s over {parts})" if resumed else f"in {timing['seconds']:.1f} s")
    lines.append(f"headline ({h['metric']}): {100 * h['accuracy']:.2f}% {took}")
    reference = paper_reference(record["defense"]["name"], record["threat"]["norm"])
    if reference:
        lines.append(f"where this stands: {reference}")
    fixed = record.get("corrections")
    if record.get("unreliable"):
        lines.append("UNRELIABLE: " + "; ".join(record["unreliable_reasons"]))
    elif record.get("checks", {}).get("ran"):
        checks = record["checks"]
        ran = f": {', '.join(checks['checks_ran'])}" if checks.get("checks_ran") else ""
        lines.append(f"integrity checks passed{ran} ({checks['seconds']:.1f} s)")
    else:
        lines.append("integrity checks skipped (--no-checks): the record carries the ‡ mark on boards")
    for name, why in record.get("checks", {}).get("checks_not_run", {}).items():
        lines.append(f"  check {name} could not run: {why}")
    if fixed:
        lines.append(f"attack plan corrected ({'; '.join(fixed['actions'])}): robust accuracy "
                     f"{_pct(fixed['robust_before'])} as declared -> {_pct(fixed['robust_after'])}")
    return "\n".join(lines)


def paper_reference(name: str, norm: Optional[str] = None) -> str:
    """The registered defense's paper row for a run under ``norm`` (``Defense.reference_for``: its own table for
    that norm, else the headline), or "" (stacks: their stages')."""
    from defenses.base import DEFENSES

    parts = []
    for stage in name.split("+"):
        try:
            reference = DEFENSES.get(stage).reference_for(norm)  # the registry holds only Defense subclasses
        except Exception:  # a plug-in that is not loaded, or a name the registry does not know
            reference = ""
        if reference:
            parts.append(reference)
    return "; ".join(parts)


def end_of_run(record: Dict, path: Optional[Path]) -> str:
    """One line: what was evaluated, on what, against which suite, how long it took and where the record is."""
    s, t, suite = record["subset"], record["threat"], record["suite"]
    where = f"record: {path}" if path is not None else "record not written"
    return (f"evaluated {record['defense']['name']} on {record['classifier']['name']} | {s['dataset']} n={s['n']} | "
            f"{t['norm']} eps={format_eps(t['norm'], t['eps'])} | suite {suite['name']} ({suite['budget']}) | "
            f"{record['timing']['seconds']:.1f} s | {where}")
