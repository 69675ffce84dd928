"""scripts/park_rerun.py: a rerun's state carried across sessions through the repository, and back."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench
from bench.plugins import load_plugin
from tests.conftest import REPO
from tests.helpers import load_script
from tests.test_docs import MACHINE_PATH

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))
CONFIG = dict(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=20, checks=False)


@pytest.fixture(autouse=True)
def _plugin(monkeypatch):
    load_plugin(PLUGIN)
    # a finished run deletes its state folder; these runs keep it, standing in for a run stopped at a session's end
    from bench.evaluation import runner

    monkeypatch.setattr(runner, "shutil", SimpleNamespace(rmtree=lambda *args, **kwargs: None))


def _pending(tmp_path: Path, record: dict) -> Path:
    """The record as a checkout's leaderboards/pending/ holds it."""
    path = tmp_path / "checkout" / "leaderboards" / "pending" / "board" / "old.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    return path


def test_a_parked_state_says_what_is_done_and_resumes_to_the_same_record(tmp_path, capsys):
    park = load_script("park_rerun")
    first = bench.run(bench.RunConfig(**CONFIG, batch_size=4, out=tmp_path / "runs" / "first"))
    pending = _pending(tmp_path, first.data)
    parked = tmp_path / "parked"
    assert park.main(["park", str(pending), "--out", str(tmp_path / "runs" / "first"), "--commit", "abc1234",
                      "--into", str(parked)]) == 0
    (state,) = [p for p in (tmp_path / "runs" / "first" / ".state").iterdir() if p.is_dir()]
    run = json.loads((parked / state.name / "run.json").read_text())
    assert run["record"] == "leaderboards/pending/board/old.json" and run["commit"] == "abc1234"
    assert run["batch_size"] == 4 and run["processes"] == 1 and run["state_folder"] == state.name
    assert "rerun_records.py --out ../runs/first leaderboards/pending/board/old.json" in run["command"]  # its own size
    assert not MACHINE_PATH.search(json.dumps(run)), "run.json is committed: no machine's path in it"
    by_stage = {row["stage"]: row for row in run["progress"]}
    assert by_stage["clean"] == {"stage": "clean", "batches": 5, "points": 20}
    for k, attack in enumerate(first.data["attacks"]):  # each attack's count, named as the record names it
        row = by_stage[f"attack{k}"]
        assert row["attack"] == attack["label"] and row["broken"] == attack["broken"]
        assert row["points"] == attack["attacked"] and row["seconds"] == pytest.approx(attack["cost"]["seconds"], abs=0.2)
    copied = sorted(p.name for p in (parked / state.name).glob("*.json") if p.name != "run.json")
    assert copied == sorted(p.name for p in state.glob("*.json"))

    # the next session: the state goes back under a new --out and the run picks it up without attacking again
    out = tmp_path / "runs" / "again"
    assert park.main(["resume", str(parked / state.name), "--out", str(out)]) == 0
    assert f"rerun_records.py --out {out.resolve()}" in capsys.readouterr().out
    resumed = out / ".state" / state.name
    stamps = {p.name: p.stat().st_mtime_ns for p in resumed.glob("attack*.json")}
    again = bench.run(bench.RunConfig(**CONFIG, batch_size=4, out=out))
    assert {p.name: p.stat().st_mtime_ns for p in resumed.glob("attack*.json")} == stamps
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timing", "environment")}  # noqa: E731
    assert strip(again.data) == strip(first.data)


def test_parking_a_new_state_of_a_record_replaces_the_old_one(tmp_path, capsys):
    park = load_script("park_rerun")
    parked = tmp_path / "parked"
    for size in (4, 5):  # a rerun started over at another batch size: another run id, another state folder
        done = bench.run(bench.RunConfig(**CONFIG, batch_size=size, out=tmp_path / "runs" / f"b{size}"))
        pending = tmp_path / "checkout" / "leaderboards" / "pending" / "board" / "old.json"
        if not pending.is_file():
            pending = _pending(tmp_path, done.data)
        assert park.main(["park", str(pending), "--out", str(tmp_path / "runs" / f"b{size}"), "--commit", "abc1234",
                          "--into", str(parked)]) == 0
    (left,) = list(parked.iterdir())
    run = json.loads((left / "run.json").read_text())
    assert run["batch_size"] == 5 and "--batch-size 5 --out ../runs/b5" in run["command"]  # not the record's 4
    assert run["record_batch_size"] == 4
    assert park.main(["resume", str(left), "--out", str(tmp_path / "runs" / "next")]) == 0  # and resumes at 5
    assert f"--batch-size 5 --out {(tmp_path / 'runs' / 'next').resolve()}" in capsys.readouterr().out


def test_every_parked_state_names_a_pending_record_and_its_own_folder():
    for run_json in sorted((REPO / "leaderboards" / "pending" / "parked").glob("*/run.json")):
        run = json.loads(run_json.read_text())
        assert (REPO / run["record"]).is_file(), f"{run_json}: its record is no longer pending: delete the folder"
        assert run["state_folder"] == run_json.parent.name
        assert {"batch_size", "record_batch_size", "processes", "commit", "command"} <= set(run), f"{run_json}: park it again"
        assert any(p.name.startswith("clean-") for p in run_json.parent.glob("*.json")), f"{run_json}: no state"


def test_park_refuses_an_out_without_one_state_folder(tmp_path):
    park = load_script("park_rerun")
    (tmp_path / "out" / ".state").mkdir(parents=True)
    with pytest.raises(SystemExit, match="expected one state folder"):
        park.main(["park", str(tmp_path / "x.json"), "--out", str(tmp_path / "out"), "--commit", "abc"])
