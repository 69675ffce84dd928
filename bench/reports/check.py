"""``bench check``: regression checks of the committed leaderboards.

1. Every board's records validate (schema, subset hash, dataset, threat): ``leaderboards.render.load_records``.
2. The committed markdown is what the records and templates give now (not stale).
3. The chosen entries (boards with a ``check`` block in ``boards.json``, or those named) are rerun at their
   recorded settings, or read from fresh records (``--fresh DIR``, matched by run id), and compared with the
   committed record: clean accuracy, the no-attack floor (``clean_worst``), robust accuracy and, where both carry
   it, the mean over the draws; the ``unreliable`` flag must not change either way. A number fails when it moves by
   more than the board's stated tolerance (``"check": {"tolerance": 0.02}``, meant for tiny smoke runs, whose
   reruns are seeded and repeat exactly on the same CPU: below one image of 32), or, without one, by more than the
   combined 95% interval, 1.96 * sqrt(se_committed^2 + se_fresh^2). A board may state a second tolerance for a rerun
   on other CPU kernels (``"tolerance_across_cpus"``, used when the two records' ``environment.cpu_capability``
   differ or the committed one predates it): another machine's vector kernels round differently, and FGSM's sign of
   a near-zero gradient component can flip an image.

Returns the failures as table rows; the CLI prints them and exits 1 when there are any.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bench.core.errors import BenchError
from leaderboards import render

METRICS = ("clean", "clean_worst", "robust", "robust_mean")


def allowed_difference(a: Dict[str, Any], b: Dict[str, Any], tolerance: Optional[float]) -> float:
    if tolerance is not None:
        return tolerance
    se = lambda s: math.sqrt(max(s["accuracy"] * (1 - s["accuracy"]), 0.0) / s["n"])  # noqa: E731
    return 1.96 * math.sqrt(se(a) ** 2 + se(b) ** 2)


def tolerance_key(check: Optional[Dict[str, Any]], committed: Dict[str, Any], fresh: Dict[str, Any]) -> str:
    """``tolerance_across_cpus`` when the board states it and the records were made on different CPU kernels (or the
    committed one does not say), else ``tolerance``."""
    kernels = {record.get("environment", {}).get("cpu_capability") for record in (committed, fresh)}
    return "tolerance_across_cpus" if len(kernels) > 1 and "tolerance_across_cpus" in (check or {}) else "tolerance"


def stated_tolerance(check: Optional[Dict[str, Any]], key: str) -> Optional[float]:
    """The board's tolerance under ``key`` (:func:`tolerance_key`); None (the combined interval) without one."""
    value = (check or {}).get(key)
    return None if value is None else float(value)


def compare(board: str, committed: Dict[str, Any], fresh: Dict[str, Any], tolerance: Optional[float]) -> List[List[str]]:
    entry = f"{committed['defense']['name']} on {committed['classifier']['name']}"
    rows = []
    if fresh["subset"]["hash"] != committed["subset"]["hash"]:
        rows.append([board, entry, "subset hash", committed["subset"]["hash"][:12], fresh["subset"]["hash"][:12], "equal", "FAIL"])
    if bool(committed.get("unreliable")) != bool(fresh.get("unreliable")):
        rows.append([board, entry, "unreliable", str(committed.get("unreliable")), str(fresh.get("unreliable")), "equal",
                     "FAIL"])
    for metric in METRICS:
        if metric not in committed or metric not in fresh:  # older records carry no floor; sequential ones no mean
            continue
        old, new = committed[metric], fresh[metric]
        if not isinstance(old, dict):  # a bare fraction (robust_mean): the robust accuracy's n
            old, new = ({"accuracy": v, "n": committed["robust"]["n"]} for v in (old, new))
        allowed = allowed_difference(old, new, tolerance)
        moved = abs(old["accuracy"] - new["accuracy"])
        rows.append([board, entry, metric, f"{100 * old['accuracy']:.2f}", f"{100 * new['accuracy']:.2f}",
                     f"±{100 * allowed:.2f}", "ok" if moved <= allowed + 1e-12 else "FAIL"])
    return rows


def rerun(record: Dict[str, Any], out: Path) -> Dict[str, Any]:
    from bench.evaluation.runner import config_from_record, run

    config = config_from_record(record, out=out, device="cpu")
    fresh, _ = run(config)
    return fresh


def run_check(boards: Optional[Sequence[str]] = None, fresh_dir: Optional[Path] = None,
              root: Path = render.ROOT) -> tuple[List[List[str]], List[List[str]]]:
    """(failures, compared rows). ``boards``: names to rerun (default: every board with a ``check`` block)."""
    failures: List[List[str]] = []
    all_boards = render.load_boards(root)
    known = {b.name for b in all_boards}
    for name in boards or ():
        if name not in known:
            raise BenchError(f"no board named {name!r}; boards: {', '.join(sorted(known))}")
    chosen = [b for b in all_boards if (b.name in boards if boards else b.check is not None)]
    records: Dict[str, List[Dict[str, Any]]] = {}
    for board in all_boards:
        try:
            records[board.name] = render.load_records(board, root)
        except BenchError as exc:
            failures.append([board.name, "-", "records", "-", "-", "-", f"FAIL: {exc}"])
    if not failures:
        for name in render.stale_files(root):
            failures.append([name, "-", "markdown", "-", "-", "-", "FAIL: stale (run bench leaderboard)"])
    fresh_records = {}
    if fresh_dir is not None:
        for path in sorted(Path(fresh_dir).glob("*.json")):
            data = json.loads(path.read_text())
            fresh_records[data["run_id"]] = data
    compared: List[List[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        for board in chosen:
            for committed in records.get(board.name, []):
                fresh = fresh_records.get(committed["run_id"]) if fresh_dir is not None else rerun(committed, Path(tmp))
                if fresh is None:
                    failures.append([board.name, committed["defense"]["name"], "fresh record", "-", "missing", "-", "FAIL"])
                    continue
                key = tolerance_key(board.check, committed, fresh)
                rows = compare(board.name, committed, fresh, stated_tolerance(board.check, key))
                if key == "tolerance_across_cpus":
                    for row in rows:  # say why the bound is wider: the reader of a CI log sees which rule held
                        row[5] += " (other CPU kernels)"
                compared += rows
                failures += [row for row in rows if row[-1] != "ok"]
    return failures, compared
