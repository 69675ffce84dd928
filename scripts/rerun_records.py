"""Rerun committed records at their recorded settings on the current code, with the integrity checks on.

For each record file: the ``bench run`` configuration stored in it (``settings.run_config``, or the fields of an older
record) is run again into ``--out``; a table of old and new clean, no-attack floor and robust accuracy is printed at
the end and written beside the new records (``moved.json``). The old files are left alone: replace them on the board
yourself once the new ones are read. Run it from a clean checkout (the records name its commit), e.g. a worktree:

    git worktree add ../rerun HEAD && cd ../rerun
    python scripts/rerun_records.py --out runs/rerun leaderboards/results/cifar10-jpeg-linf/*.json

Records already rerun into ``--out`` (same defense, classifier, suite, budget, threat, n and seed) are skipped, so
the command resumes after an interruption. ``--launcher torchrun --nproc-per-node K`` runs each rerun over K
processes, as ``bench run --launcher torchrun`` does (same per-sample results as one process; rank 0 writes).

``--batch-size B`` reruns at another batch size than the record's. The runner saves its state per finished batch,
so a smaller batch loses less when a long rerun is killed (one batch of 128 points under CW-100 with EOT-10 through a
large purifier is hours of one CPU thread, longer than a session). The batch decides which images share a random
stream, so for a stochastic defense the numbers move within their noise; the new record stores its batch size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import add_launcher_arguments, launch_torchrun  # noqa: E402
from bench.core.plugins import load_plugin  # noqa: E402
from bench.evaluation.runner import config_from_record, run  # noqa: E402


def identity(record):
    """What a rerun must match to count as done: the settings, not the checkpoint's hash (a rerun after a checkpoint
    was replaced names the new file's)."""
    t, s = record["threat"], record["subset"]
    config = {k: v for k, v in record["defense"].get("config", {}).items() if k != "checkpoint_sha256"}
    return (record["defense"]["name"], record["classifier"]["name"], record["suite"]["name"], record["suite"]["budget"],
            t["norm"], round(t["eps"], 8), s["n"], s["seed"], json.dumps(config, sort_keys=True))


def pct(summary):
    return None if summary is None else round(100 * summary["accuracy"], 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="load a plug-in first, as bench --plugin does (for records of plug-in defenses)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="rerun at this batch size instead of the record's (a smaller batch saves progress "
                             "more often; a stochastic defense then draws differently)")
    add_launcher_arguments(parser, "each rerun")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(argv, args.nproc_per_node, entry=[str(Path(__file__).resolve())])
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone writes and prints
    for plugin in args.plugin:
        load_plugin(plugin)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    done = {}
    for path in sorted(args.out.glob("*.json")):
        data = json.loads(path.read_text())
        if "run_id" in data:
            done[identity(data)] = data
    moved = []
    for path in args.records:
        old = json.loads(path.read_text())
        new = done.get(identity(old))
        if new is None:
            start = time.perf_counter()
            overrides = {} if args.batch_size is None else {"batch_size": args.batch_size}
            new, _ = run(config_from_record(old, out=args.out, checks=True, device="cpu", **overrides))
            logging.info("%s: %.0f s", path.name, time.perf_counter() - start)
            done[identity(new)] = new
        moved.append({"record": str(path), "defense": old["defense"]["name"], "classifier": old["classifier"]["name"],
                      "suite": f"{old['suite']['name']} {old['suite']['budget']}",
                      "clean": [pct(old["clean"]), pct(new["clean"])], "no_attack": [pct(old.get("clean_worst")), pct(new.get("clean_worst"))],
                      "robust": [pct(old["robust"]), pct(new["robust"])], "new_run_id": new["run_id"],
                      "batch_size": [old["settings"]["batch_size"], new["settings"]["batch_size"]],
                      "unreliable": new["unreliable"], "seconds": [old["timing"]["seconds"], new["timing"]["seconds"]],
                      # the attacks' own time (records before it existed have none): wall time also counts loading
                      "attack_seconds": [old["timing"].get("attack_seconds"), new["timing"].get("attack_seconds")]})
        if main_rank:
            (args.out / "moved.json").write_text(json.dumps(moved, indent=1) + "\n")
    if not main_rank:
        return 0
    for row in moved:
        print(f"{row['defense']:32s} {row['classifier']:9s} {row['suite']:22s} clean {row['clean']} floor {row['no_attack']} "
              f"robust {row['robust']} unreliable={row['unreliable']} s={row['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
