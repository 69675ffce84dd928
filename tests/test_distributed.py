"""A run sharded over two processes by torchrun (gloo) writes the record a single-process run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))
ARGS = ["--plugin", PLUGIN, "run", "--defense", "plugin-blur", "--classifier", "tiny", "--dataset", "tiny-test",
        "--budget", "smoke", "--n", "20", "--batch-size", "4"]


def _comparable(record):
    record = json.loads(json.dumps(record))
    for key in ("timing", "environment"):
        record.pop(key)
    record["checks"].pop("seconds", None)
    for attack in record["attacks"]:
        attack["cost"].pop("seconds")
    return record


def test_two_torchrun_processes_write_the_single_process_record(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable, "-m", "bench", *ARGS, "--out", str(single)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "bench", "--"]
    done = subprocess.run([*torchrun, *ARGS, "--out", str(sharded)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("record: ") == 1  # rank 0 alone reports and writes
    (a,), (b,) = list(single.glob("*.json")), list(sharded.glob("*.json"))
    assert a.name == b.name  # the same run id
    assert _comparable(json.loads(a.read_text())) == _comparable(json.loads(b.read_text()))


def test_the_launcher_flag_runs_the_same_command_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench", *ARGS, "--launcher", "torchrun", "--nproc-per-node", "2",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("record: ") == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert "rank 1 of 2" in done.stderr


def test_each_rank_runs_only_its_share(tmp_path):
    """Equal records could also come from every rank running every batch: count the images each process classified."""
    args = [a if a != "plugin-blur" else "plugin-traced" for a in ARGS] + ["--no-checks"]
    traces = {}
    for mode in ("single", "sharded"):
        folder = tmp_path / f"trace-{mode}"
        folder.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_TRACE_DIR": str(folder)}
        launcher = [] if mode == "single" else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        command = [*launcher, "-m", "bench", "--", *args] if launcher else [sys.executable, "-m", "bench", *args]
        done = subprocess.run([*command, "--out", str(tmp_path / mode)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        traces[mode] = {p.stem: sum(int(line) for line in p.read_text().split()) for p in folder.glob("rank*.txt")}
    total = traces["single"]["rank0"]
    assert set(traces["sharded"]) == {"rank0", "rank1"}
    # the clean pass alone is 5 batches of 4 images dealt 3 / 2: neither rank did the other's work
    assert sum(traces["sharded"].values()) == total
    assert 0.25 * total < traces["sharded"]["rank1"] < traces["sharded"]["rank0"] < 0.75 * total


def test_rerun_records_under_torchrun_writes_the_record_once(tmp_path):
    """scripts/rerun_records.py --launcher torchrun: each rerun sharded over two processes, rank 0 writing the record
    (equal to the single-process one it reruns) and moved.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    subprocess.run([sys.executable, "-m", "bench", *ARGS, "--out", str(first)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    (old,) = list(first.glob("*.json"))
    done = subprocess.run([sys.executable, "scripts/rerun_records.py", "--plugin", PLUGIN, "--launcher", "torchrun",
                           "--nproc-per-node", "2", "--out", str(rerun), str(old)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1 of 2" in done.stderr
    assert done.stdout.count("plugin-blur") == 1  # rank 0 alone prints the table
    new = [p for p in rerun.glob("*.json") if p.name != "moved.json"]
    assert [p.name for p in new] == [old.name]
    assert _comparable(json.loads(new[0].read_text())) == _comparable(json.loads(old.read_text()))
    (row,) = json.loads((rerun / "moved.json").read_text())
    assert row["clean"][0] == row["clean"][1] and row["robust"][0] == row["robust"][1]


def test_the_launcher_refuses_fewer_than_one_process(tmp_path):
    """bench run and scripts/rerun_records.py share the launcher: --nproc-per-node 0 is a usage error (exit 2)."""
    for command in ([sys.executable, "-m", "bench", *ARGS], [sys.executable, "scripts/rerun_records.py", "unused.json"]):
        done = subprocess.run([*command, "--launcher", "torchrun", "--nproc-per-node", "0", "--out", str(tmp_path)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "--nproc-per-node must be >= 1" in done.stderr
        assert not list(tmp_path.iterdir())
