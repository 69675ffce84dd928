"""Park a rerun's resume state in the repository at a session's end, and put it back at the next one's start.

A rerun longer than a working session (``scripts/rerun_records.py`` on a large purifier) keeps its progress in the
state folder of its ``--out`` (``<out>/.state/<run id>-<code hash>/``, one JSON file per finished batch). Nothing
outside the repository survives a session here, so the folder is copied to ``leaderboards/pending/parked/`` with a
``run.json`` that says which record it reruns, on which commit, at which batch size, with how many processes, what
is done (counted from the state files) and the command that resumes it (leaderboards/pending/README.md):

    # at the end of a session, from the worktree the rerun runs in (its HEAD is the commit)
    python scripts/park_rerun.py park --out ../runs/t7-pre leaderboards/pending/atop-table7/<record>.json
    # at the start of the next, from the checkout
    python scripts/park_rerun.py resume leaderboards/pending/parked/<state folder> --out ../runs/t7-pre \\
        --worktree ../resume

``park`` replaces an earlier parked state of the same record (a rerun started over at another batch size or commit
leaves nothing stale behind). ``resume`` copies the state into ``<out>/.state/``, adds the worktree at the parked
commit if it is missing, and prints the command to run from it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
PARKED = REPO / "leaderboards" / "pending" / "parked"
STATE_KEY = re.compile(r"^(?P<stage>[a-z-]+?)(?P<index>\d*)-(?P<batch>\d+)$")  # clean-3, attack2-14, correction0-1


def state_folder(out: Path, name: Optional[str] = None) -> Path:
    """The one state folder under ``<out>/.state/`` (or the one called ``name``)."""
    folders = sorted(p for p in (out / ".state").glob("*") if p.is_dir())
    if name is not None:
        folders = [p for p in folders if p.name == name]
    if len(folders) != 1:
        found = ", ".join(p.name for p in folders) or "none"
        raise SystemExit(f"park_rerun: expected one state folder under {out / '.state'}, found {found}; name it with --state")
    return folders[0]


def progress(folder: Path, labels: List[str]) -> List[Dict[str, Any]]:
    """What the state files hold, per stage: batches finished, points, points broken and seconds of compute.
    ``labels`` names attack k (the pending record's attacks, in suite order)."""
    stages: Dict[str, Dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        match = STATE_KEY.match(path.stem)
        if match is None:  # parts.json
            continue
        stage, index = match["stage"], match["index"]
        name = f"{stage}{index}"
        data = json.loads(path.read_text())
        row = stages.setdefault(name, {"stage": name, "batches": 0, "points": 0})
        if stage == "attack" and index and int(index) < len(labels):
            row["attack"] = labels[int(index)]
        row["batches"] += 1
        row["points"] += len(data["positions"])
        if "fooled" in data:
            row["broken"] = row.get("broken", 0) + sum(map(bool, data["fooled"]))
            row["seconds"] = round(row.get("seconds", 0.0) + data["cost"]["seconds"], 1)
    order = lambda r: (r["stage"] != "clean", int(re.sub(r"\D", "", r["stage"]) or -1), r["stage"])  # noqa: E731
    return sorted(stages.values(), key=order)


def batch_size_of(folder: Path) -> int:
    """The run's batch size: the size of its first clean batch (the clean pass covers every image)."""
    first = folder / "clean-0.json"
    if not first.is_file():
        raise SystemExit(f"park_rerun: {folder} has no clean-0.json: nothing to park yet")
    return len(json.loads(first.read_text())["positions"])


def relative_record(record: Path) -> str:
    """The record's path inside a checkout (the worktree the rerun runs in, or this one)."""
    parts = record.resolve().parts
    starts = [i for i, part in enumerate(parts) if part == "leaderboards"]
    if not starts:
        raise SystemExit(f"park_rerun: {record} is not under a checkout's leaderboards/")
    return str(Path(*parts[starts[-1]:]))  # the last one: a checkout may itself sit under a folder of that name


def override(batch: int, own: int) -> Optional[int]:
    """``--batch-size`` for a rerun at ``batch`` of a record made at ``own``: None when they agree."""
    return None if batch == own else batch


def command(record: str, batch: Optional[int], nproc: int, out: str) -> str:
    """The rerun's command, run from a checkout at the parked commit (``batch``: None at the record's own size, which
    older commits' rerun_records.py, without ``--batch-size``, also runs)."""
    launcher = f" --launcher torchrun --nproc-per-node {nproc}" if nproc > 1 else ""
    size = "" if batch is None else f" --batch-size {batch}"
    return (f"BENCH_DATA_DIR=... BENCH_WEIGHTS_DIR=... OMP_NUM_THREADS=1 ../<checkout>/.venv/bin/python "
            f"scripts/rerun_records.py{launcher}{size} --out {out} {record}")


def park(args: argparse.Namespace) -> int:
    folder = state_folder(args.out, args.state)
    record = relative_record(args.record)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.record.resolve().parent,
                                           capture_output=True, text=True, check=True).stdout.strip()
    pending = json.loads(args.record.read_text())
    batch = batch_size_of(folder)
    into = args.into / folder.name
    for old in sorted(args.into.glob("*/run.json")):  # an earlier state of the same record goes
        if json.loads(old.read_text())["record"] == record and old.parent != into:
            shutil.rmtree(old.parent)
            print(f"removed the earlier parked state {old.parent.name}")
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob("*.json"):
        stale.unlink()
    for path in sorted(folder.glob("*.json")):
        shutil.copy2(path, into / path.name)
    out = f"../runs/{args.out.resolve().name}"  # relative: a committed file names no machine's path
    run = {
        "record": record,
        "commit": commit,
        "state_folder": folder.name,
        "batch_size": batch,
        "record_batch_size": pending["settings"]["batch_size"],
        "processes": args.nproc,
        "progress": progress(folder, [a["label"] for a in pending.get("attacks", [])]),
        "started": json.loads((folder / "parts.json").read_text())["started"] if (folder / "parts.json").is_file() else [],
        "command": command(record, override(batch, pending["settings"]["batch_size"]), args.nproc, out),
        "resume": (f"python scripts/park_rerun.py resume leaderboards/pending/parked/{folder.name} --out {out} "
                   "--worktree ../resume, then the command from ../resume"),
        **({"note": args.note} if args.note else {}),
    }
    (into / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(f"parked {folder.name}: {len(list(folder.glob('*.json')))} state files, batch {batch}, commit {commit}")
    for row in run["progress"]:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return 0


def resume(args: argparse.Namespace) -> int:
    run = json.loads((args.parked / "run.json").read_text())
    target = args.out / ".state" / run["state_folder"]
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.parked.glob("*.json")):
        if path.name != "run.json":
            shutil.copy2(path, target / path.name)
    if args.worktree is not None and not args.worktree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(args.worktree), run["commit"]], cwd=REPO, check=True)
    where = args.worktree or "a clean checkout at that commit"
    batch = override(run["batch_size"], run["record_batch_size"])  # every parked run.json has it (a test says so)
    again = command(run["record"], batch, run["processes"], str(args.out.resolve()))
    print(f"state copied to {target}; from {where} (commit {run['commit']}) run:\n  {again}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("park", help="copy a rerun's state into leaderboards/pending/parked/ with its run.json")
    p.add_argument("record", type=Path, help="the pending record the rerun reruns")
    p.add_argument("--out", type=Path, required=True, help="the rerun's --out")
    p.add_argument("--state", help="the state folder's name, when --out holds several")
    p.add_argument("--commit", help="the commit the rerun runs on (default: HEAD of the record's checkout)")
    p.add_argument("--nproc", type=int, default=1, help="processes the rerun runs over (the state is per rank)")
    p.add_argument("--note", help="anything the counts do not say (what ran beside it, what is left)")
    p.add_argument("--into", type=Path, default=PARKED)
    r = sub.add_parser("resume", help="copy a parked state into <out>/.state/ and print the command")
    r.add_argument("parked", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--worktree", type=Path, help="add a worktree at the parked commit here if it is missing")
    args = parser.parse_args(argv)
    return park(args) if args.what == "park" else resume(args)


if __name__ == "__main__":
    sys.exit(main())
