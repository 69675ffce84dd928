"""Paired comparison of two records made on the same points (``bench compare A B``).

Two defenses evaluated on one subset are paired by image: an image that one keeps and the other loses says more than
two overlapping intervals do. For each outcome a record stores per image (clean on one draw, the no-attack floor, the
worst case over the suite, the majority vote over the draws) the comparison counts the images right under both, only
under A, only under B, and gives the exact McNemar p-value of the discordant split. The mean over the draws is compared
as a mean of per-image differences (normal interval and p-value). Per attack (independent suites), each attack's
run-alone readings are listed side by side with their intervals, and paired by image too where both records keep the
attack's per-image draws (``attacks[].draws_right``, records from 2026-12-02 on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tabulate import tabulate

from bench.core.errors import BenchError
from bench.core.stats import mcnemar_exact, paired_mean_difference


def load_record(path: Path) -> Dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read record {path}: {exc}") from exc
    if "samples" not in record or "run_id" not in record:
        raise BenchError(f"{path} is not a run record (no samples or run_id)")
    return record


def _draws(record: Dict[str, Any]) -> int:
    """Re-classifications per image under the verdict rule: the record's own (a correction may have added draws to a
    defense declared deterministic)."""
    return int(record["settings"].get("success_draws", 1))


def _outcomes(record: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Per-image binary outcomes the record stores, in its subset's order."""
    s, draws = record["samples"], _draws(record)
    out = {"clean, one draw": np.asarray(s["clean_correct"], bool)}
    if draws > 1 and "clean_draws_right" in s:
        out["no-attack floor (every draw right)"] = np.asarray(s["clean_draws_right"]) >= draws
    out["robust, worst case over the suite"] = np.asarray(s["robust"], bool)
    if draws > 1 and "robust_mean" in record and "draws_right" in s:
        out["robust, majority vote over the draws"] = np.asarray(s["draws_right"]) * 2 > draws
    return out


def _mean_fractions(record: Dict[str, Any]) -> Optional[np.ndarray]:
    """Per image: the share of draws right after the suite (the record's mean, per image), where it has a mean."""
    s, draws = record["samples"], _draws(record)
    if draws > 1 and "robust_mean" not in record:
        return None  # early-stopped attacks: the mean is not measured
    if "draws_right" in s:
        return np.asarray(s["draws_right"], float) / draws
    return np.asarray(s["robust"], float)


def _aligned(a: Dict[str, Any], b: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Positions in A and in B of the images both records evaluated, matched by test-set index."""
    if a["subset"]["dataset"] != b["subset"]["dataset"]:
        raise BenchError(f"the records are on different datasets ({a['subset']['dataset']}, {b['subset']['dataset']})")
    ia, ib = a["samples"]["index"], b["samples"]["index"]
    where_b = {index: k for k, index in enumerate(ib)}
    pa = [k for k, index in enumerate(ia) if index in where_b]
    if not pa:
        raise BenchError("the records share no image: nothing to pair")
    return np.asarray(pa), np.asarray([where_b[ia[k]] for k in pa])


def _name(record: Dict[str, Any]) -> str:
    t = record["threat"]
    return (f"{record['defense']['name']} on {record['classifier']['name']}, suite {record['suite']['name']} "
            f"({record['suite'].get('budget')}), {t['norm']} eps {t['eps']:.6g}, n={record['subset']['n']}, "
            f"run {record['run_id'][:8]}")


def compare_records(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """The paired comparison as data (``bench compare --json``)."""
    pa, pb = _aligned(a, b)
    oa, ob = _outcomes(a), _outcomes(b)
    rows = []
    for outcome in [k for k in oa if k in ob]:
        ra, rb = oa[outcome][pa], ob[outcome][pb]
        only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
        rows.append({"outcome": outcome, "a": float(ra.mean()), "b": float(rb.mean()), "both": int((ra & rb).sum()),
                     "only_a": only_a, "only_b": only_b, "neither": int((~ra & ~rb).sum()),
                     "mcnemar_p": mcnemar_exact(only_a, only_b)})
    fa, fb = _mean_fractions(a), _mean_fractions(b)
    mean = None
    if fa is not None and fb is not None:
        mean = paired_mean_difference(fa[pa].tolist(), fb[pb].tolist())
        mean.update({"a": float(fa[pa].mean()), "b": float(fb[pb].mean())})
    attacks_b = {x["label"]: x for x in b["attacks"] if "robust_alone" in x}
    per_attack = []
    for x in a["attacks"]:
        y = attacks_b.get(x["label"])
        if "robust_alone" not in x or y is None:
            continue
        row = {"attack": x["label"], "a": _alone(x), "b": _alone(y)}
        if "draws_right" in x and "draws_right" in y:  # per image: the attack alone, paired
            wa, wb = _alone_worst(a, x)[pa], _alone_worst(b, y)[pb]
            only_a, only_b = int((wa & ~wb).sum()), int((wb & ~wa).sum())
            row["paired_worst"] = {"both": int((wa & wb).sum()), "only_a": only_a, "only_b": only_b,
                                   "mcnemar_p": mcnemar_exact(only_a, only_b)}
            if "robust_alone_majority" in x and "robust_alone_majority" in y:
                ma = np.asarray(x["draws_right"])[pa] * 2 > _draws(a)
                mb = np.asarray(y["draws_right"])[pb] * 2 > _draws(b)
                only_a, only_b = int((ma & ~mb).sum()), int((mb & ~ma).sum())
                row["paired_majority"] = {"both": int((ma & mb).sum()), "only_a": only_a, "only_b": only_b,
                                          "mcnemar_p": mcnemar_exact(only_a, only_b)}
        per_attack.append(row)
    notes = []
    if len(pa) != a["subset"]["n"] or len(pb) != b["subset"]["n"]:
        notes.append(f"paired on the {len(pa)} images both records evaluated (A has {a['subset']['n']}, B {b['subset']['n']})")
    if (a["threat"]["norm"], round(a["threat"]["eps"], 8)) != (b["threat"]["norm"], round(b["threat"]["eps"], 8)):
        notes.append("the records are at different threats")
    if a["suite"]["name"] != b["suite"]["name"] or a["suite"].get("budget") != b["suite"].get("budget"):
        notes.append("the records ran different suites: the worst cases are not over the same attacks")
    if _draws(a) != _draws(b):
        notes.append(f"the records re-classify {_draws(a)} and {_draws(b)} times: their worst cases differ in strictness")
    return {"a": _name(a), "b": _name(b), "n": int(len(pa)), "paired": rows, "mean": mean, "per_attack": per_attack,
            "notes": notes}


def _alone_worst(record: Dict[str, Any], attack: Dict[str, Any]) -> np.ndarray:
    """Per image, this attack alone under the verdict rule: every clean draw right and every draw after it right."""
    s, draws = record["samples"], _draws(record)
    floor = (np.asarray(s["clean_draws_right"]) >= draws if "clean_draws_right" in s
             else np.asarray(s["clean_correct"], bool))
    return floor & (np.asarray(attack["draws_right"]) >= draws)


def _alone(attack: Dict[str, Any]) -> Dict[str, Any]:
    majority = attack.get("robust_alone_majority")
    return {"worst": attack["robust_alone"], "mean": attack.get("robust_alone_mean"), "majority": majority}


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _interval(summary: Optional[Dict[str, Any]]) -> str:
    if summary is None:
        return "—"
    lo, hi = summary["ci95"]
    return f"{100 * summary['accuracy']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _split(paired: Optional[Dict[str, Any]]) -> str:
    return "—" if paired is None else f"{paired['only_a']} / {paired['only_b']}, p {paired['mcnemar_p']:.3g}"


def format_comparison(c: Dict[str, Any]) -> str:
    lines = [f"A: {c['a']}", f"B: {c['b']}", f"paired on {c['n']} images", ""]
    rows = [[r["outcome"], _pct(r["a"]), _pct(r["b"]), r["both"], r["only_a"], r["only_b"], r["neither"],
             f"{r['mcnemar_p']:.3g}"] for r in c["paired"]]
    lines.append(tabulate(rows, headers=["outcome", "A %", "B %", "both", "A only", "B only", "neither",
                                         "McNemar p (exact)"]))
    m = c["mean"]
    if m is not None:
        lo, hi = m["ci95"]
        lines += ["", f"robust, mean over the draws: A {_pct(m['a'])}%, B {_pct(m['b'])}%; A - B = "
                      f"{100 * m['difference']:+.2f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], p = {m['p']:.3g} (normal, paired); "
                      f"images higher under A {m['higher_a']}, under B {m['higher_b']}"]
    if c["per_attack"]:
        rows = [[p["attack"], _interval(p["a"]["worst"]), _interval(p["b"]["worst"]), _pct(p["a"]["mean"]),
                 _pct(p["b"]["mean"]), _interval(p["a"]["majority"]), _interval(p["b"]["majority"])]
                for p in c["per_attack"]]
        paired = any("paired_worst" in p for p in c["per_attack"])
        if paired:
            for row, p in zip(rows, c["per_attack"]):
                row += [_split(p.get("paired_worst")), _split(p.get("paired_majority"))]
        lines += ["", "each attack alone" + ("; A only / B only / McNemar p, paired by image" if paired else
                                             " (unpaired: these records keep per-attack totals only)"),
                  tabulate(rows, headers=["attack", "A worst [95% CI]", "B worst [95% CI]", "A mean", "B mean",
                                          "A majority [95% CI]", "B majority [95% CI]",
                                          *(["worst: A/B only, p", "majority: A/B only, p"] if paired else [])])]
    lines += [f"note: {n}" for n in c["notes"]]
    return "\n".join(lines)
