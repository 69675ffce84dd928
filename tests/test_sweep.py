"""bench sweep: grid files, cells run as Ray tasks on a local instance, skipping, retries after a killed worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.cli import main
from bench.errors import BenchError

if os.environ.get("CI"):
    import ray  # noqa: F401  (make setup installs the sweep extra: in CI these tests must run, never skip)
else:
    pytest.importorskip("ray")

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))
VOLATILE = {"timing", "environment"}  # what may differ between two runs of one configuration


def _grid(tmp_path: Path, text: str, name: str = "g") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


TINY_GRID = f"""
name = "tiny"
plugins = [{PLUGIN!r}]

[fixed]
dataset = "tiny-test"
classifier = "tiny"
n = 16
batch_size = 8

[[grid]]
defense = ["plugin-blur", "none"]
eps = ["2/255", "8/255"]
"""


def _comparable(value):
    """A record without what legitimately differs between two runs of one configuration: timings (any key naming
    seconds), the environment (host, dates) and the timing block."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in VOLATILE and "second" not in k}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def test_grid_file_makes_one_checked_bench_run_per_cell(tmp_path):
    from bench.sweep import cell_command, load_grid

    grid = load_grid(_grid(tmp_path, TINY_GRID), out=tmp_path / "out")
    assert len(grid.cells) == 4 and grid.name == "tiny"
    assert [dict(c.values) for c in grid.cells][1] == {"defense": "plugin-blur", "eps": "8/255"}
    command = cell_command(grid, grid.cells[0])
    assert command.startswith(f"bench --plugin {PLUGIN} run --dataset tiny-test --classifier tiny --n 16 --batch-size 8")
    assert command.endswith(f"--defense plugin-blur --eps 2/255 --out {tmp_path / 'out'}")
    # A typo fails when the grid is read, naming the cell, before anything runs.
    with pytest.raises(BenchError, match=r"cell defense=none: .*unrecognized arguments: --epz"):
        load_grid(_grid(tmp_path, '[fixed]\nepz = "2/255"\n[[grid]]\ndefense = ["none"]\n', "typo"))
    with pytest.raises(BenchError, match="unknown keys"):
        load_grid(_grid(tmp_path, 'axis = 1\n', "bad"))
    with pytest.raises(BenchError, match="both fixed and an axis"):
        load_grid(_grid(tmp_path, '[fixed]\nn = 8\n[[grid]]\nn = [8, 16]\n', "both"))


def test_dry_run_prints_one_bench_run_per_cell(tmp_path, capsys):
    assert main(["sweep", str(_grid(tmp_path, TINY_GRID)), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("sweep tiny: 4 cells") and len(lines) == 5
    assert all(line.startswith("bench --plugin") and " run " in line for line in lines[1:])
    assert not (tmp_path / "out").exists()


def test_sweep_records_equal_bench_run_records_and_a_second_invocation_runs_nothing(tmp_path, capsys):
    grid = _grid(tmp_path, TINY_GRID)
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "4 cells: 4 run, 0 already done, 0 failed" in out
    swept = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*.json")}
    assert len(swept) == 4
    for defense in ("plugin-blur", "none"):
        for eps in ("2/255", "8/255"):
            assert main(["--plugin", PLUGIN, "run", "--dataset", "tiny-test", "--classifier", "tiny", "--n", "16",
                         "--batch-size", "8", "--defense", defense, "--eps", eps, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    single = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in (tmp_path / "single").glob("*.json")}
    assert set(single) == set(swept)
    for run_id, record in single.items():
        assert _comparable(swept[run_id]) == _comparable(record)
    manifest = json.loads((tmp_path / "sweep" / ".sweep" / "tiny.json").read_text())
    assert [c["status"] for c in manifest["cells"]] == ["done"] * 4 and all(c["attempts"] == 1 for c in manifest["cells"])
    assert not list((tmp_path / "sweep").glob(".state/*"))  # finished runs leave no state and no lock behind

    # Again: every record exists, nothing runs (Ray is not even started).
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*.json")}
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "4 cells, 0 to run, 4 already done" in out and "4 cells: 0 run, 4 already done, 0 failed" in out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep").glob("*.json")} == stamps


def test_a_killed_worker_cell_is_retried_and_resumes_to_the_same_record(tmp_path, capsys, monkeypatch):
    # The defense SIGKILLs its worker process once a batch of its run is saved; Ray retries the task on a new
    # worker, which resumes from the state folder and writes the record an uninterrupted run writes.
    monkeypatch.setenv("BENCH_DIE_STATE", str(tmp_path / "sweep"))
    monkeypatch.setenv("BENCH_DIE_MARKER", str(tmp_path / "died"))
    grid = _grid(tmp_path, f"""
name = "dies"
plugins = [{PLUGIN!r}]
[fixed]
dataset = "tiny-test"
classifier = "tiny"
n = 16
batch_size = 4
defense = "plugin-dies-once"
""")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--retries", "2"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "died").is_file(), out
    assert "after 2 attempts" in out and "1 cells: 1 run, 0 already done, 0 failed" in out
    manifest = json.loads((tmp_path / "sweep" / ".sweep" / "dies.json").read_text())
    assert manifest["cells"][0]["status"] == "done" and manifest["cells"][0]["attempts"] == 2
    swept = json.loads(Path(manifest["cells"][0]["record"]).read_text())

    monkeypatch.delenv("BENCH_DIE_STATE")
    assert main(["--plugin", PLUGIN, "run", "--dataset", "tiny-test", "--classifier", "tiny", "--n", "16", "--batch-size",
                 "4", "--defense", "plugin-dies-once", "--out", str(tmp_path / "single")]) == 0
    single = json.loads(next((tmp_path / "single").glob("*.json")).read_text())
    assert _comparable(swept) == _comparable(single)


def test_a_cell_with_a_user_error_fails_at_once_with_its_error_kept(tmp_path, capsys):
    grid = _grid(tmp_path, f"""
plugins = [{PLUGIN!r}]
[fixed]
dataset = "tiny-test"
classifier = "tiny"
n = 16
[[grid]]
defense = ["plugin-nan", "plugin-blur"]
""", "mixed")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep")]) == 1
    out = capsys.readouterr().out
    assert "2 cells: 1 run, 0 already done, 1 failed" in out
    manifest = json.loads((tmp_path / "sweep" / ".sweep" / "mixed.json").read_text())
    failed = next(c for c in manifest["cells"] if c["status"] == "failed")
    assert "NaN" in failed["error"] and failed["attempts"] == 1


def test_replace_keeps_one_record_per_configuration(tmp_path, capsys):
    # A board's folder holds a record made by older code (another run id, same configuration): the sweep's record
    # takes its place, and a record of a configuration outside the grid stays.
    grid = _grid(tmp_path, f"""
plugins = [{PLUGIN!r}]
out = {str(tmp_path / "board")!r}
replace = true
[fixed]
dataset = "tiny-test"
classifier = "tiny"
n = 16
defense = "plugin-blur"
""", "board")
    assert main(["--plugin", PLUGIN, "run", "--dataset", "tiny-test", "--classifier", "tiny", "--n", "16",
                 "--defense", "plugin-blur", "--out", str(tmp_path / "made")]) == 0
    made = json.loads(next((tmp_path / "made").glob("*.json")).read_text())
    (tmp_path / "board").mkdir()
    (tmp_path / "board" / "old.json").write_text(json.dumps({**made, "run_id": "0" * 24}))
    other = {**made, "run_id": "1" * 24, "settings": {**made["settings"], "seed": 1}}
    (tmp_path / "board" / "other-seed.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert main(["sweep", str(grid)]) == 0
    assert "replaced old.json" in capsys.readouterr().out
    left = sorted(json.loads(p.read_text())["run_id"] for p in (tmp_path / "board").glob("*.json"))
    assert left == sorted([made["run_id"], "1" * 24])


def test_shipped_grids_parse_and_the_board_grid_names_every_row_of_its_board():
    from bench.cli import parse_run_args, run_config
    from bench.sweep import load_grid

    root = Path(__file__).resolve().parents[1]
    grids = {path.stem: load_grid(path) for path in sorted((root / "grids").glob("*.toml"))}
    assert len(grids["smoke-12"].cells) == 12
    board = grids["cifar10-jpeg-linf"]
    assert board.replace and board.out == Path("leaderboards/results/cifar10-jpeg-linf")
    fields = ("defense", "classifier", "dataset", "threat", "suite", "budget", "n", "seed", "defense_options")

    def asked(config):
        return tuple(json.dumps(config[f], sort_keys=True) for f in fields) + (round(config["eps"], 9),)

    cells = sorted(asked(vars(run_config(parse_run_args(cell.args)))) for cell in board.cells)
    rows = sorted(asked(json.loads(p.read_text())["settings"]["run_config"])
                  for p in (root / board.out).glob("*.json"))
    # every row of the board is a cell of its grid; a cell may lack its row only while the old record waits for its
    # rerun in leaderboards/pending/ (its checkpoint was replaced), and the grid is what brings it back
    waiting = sorted(asked(json.loads(p.read_text())["settings"]["run_config"])
                     for p in (root / "leaderboards" / "pending" / board.out.name).glob("*.json"))
    assert len(cells) == len(set(cells)) and sorted(rows + waiting) == cells
