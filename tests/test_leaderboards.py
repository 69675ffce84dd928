"""Leaderboards and paper tables rendered from records (leaderboards/render.py), and the papers' numbers as data."""

from __future__ import annotations

import json

import pytest

from bench.errors import BenchError
from leaderboards.render import PAPERS, load_boards, paper_table, render_paper
from tests.conftest import REPO

TABLE7 = next(b for b in load_boards() if b.name == "atop-table7")


def atop_table7(records, field="robust_alone"):
    """The Table 7 section for one field (worst case, mean or majority over the draws)."""
    text = render_paper(TABLE7, records)
    mean_at, majority_at = text.index("## Robust accuracy: mean"), text.index("## Robust accuracy: majority")
    return {"robust_alone_mean": text[mean_at:majority_at], "robust_alone_majority": text[majority_at:]}.get(field, text[:mean_at])


def _record(stage: str, clean: float, pgd10: float, subset_hash: str = "a" * 64, checks: bool = True,
            reasons: tuple = ()) -> dict:
    def attack(name, steps, value, skip=False):
        entry = {"attack": name, "params": {"steps": steps} if steps else {}, "robust_alone": {"accuracy": value},
                 "robust_alone_mean": value + 0.1, "robust_alone_majority": {"accuracy": value + 0.05}}
        return {**entry, "bpda_stages": ["purifier"]} if skip else entry

    return {
        "defense": {"name": f"atop-rt2-gan-{stage[:3]}", "config": {"transform": "rt2", "stage": stage}, "stochastic": True},
        "settings": {"success_draws": 4}, "clean_worst": {"accuracy": clean / 4},
        "samples": {"clean_draws_right": [4, 3, 2, 1]},  # a majority vote (> 2 of 4 draws) keeps 2 of 4 points
        "suite": {"name": "atop-table7", "version": "1", "budget": "cpu", "eot_draws": 10},
        "subset": {"dataset": "cifar10-jpeg", "n": 256, "seed": 0, "hash": subset_hash},
        "threat": {"norm": "linf", "eps": 8 / 255},
        "classifier": {"name": "resnet20"}, "clean": {"accuracy": clean}, "clean_mean": clean - 0.01,
        "attacks": [attack("fgsm", None, 0.2), attack("pgd", 10, pgd10), attack("pgd", 10, pgd10 + 0.05, skip=True)],
        "checks": {"ran": checks}, "unreliable": bool(reasons), "unreliable_reasons": list(reasons),
    }


def test_paper_numbers_are_numbers():
    table = paper_table("atop", "7")
    assert table["columns"][0] == "clean" and len(table["rows"]) == 6
    assert all(isinstance(v, float) for row in table["rows"] for v in row["values"])
    rt2_ft = next(r for r in table["rows"] if r["transform"] == "rt2" and r["atop"])
    assert dict(zip(table["columns"], rt2_ft["values"]))["PGD-20"] == 84.57


def test_table7_puts_measured_beside_paper():
    text = atop_table7([_record("pretrain", 0.383, 0.031), _record("finetune", 0.438, 0.012)])
    # one-draw clean beside the paper's, then the no-attack floor (every draw right), then the attacks
    assert "| RT2         | ✗      | 38.3 (84.2) | 9.6         | 20.0 (55.1) | 3.1 (72.3)" in text
    assert "| RT2         | ✓      | 43.8 (90.0) | 10.9        | 20.0 (89.8) | 1.2 (84.8)" in text
    assert "— (76.0)" in text  # rows without a record keep the paper's number
    mean = atop_table7([_record("pretrain", 0.383, 0.031)], field="robust_alone_mean")
    assert "37.3 (84.2) | 30.0 (55.1) | 13.1 (72.3)" in mean  # clean_mean and the mean over draws
    majority = atop_table7([_record("pretrain", 0.383, 0.031)], field="robust_alone_majority")
    assert "50.0 (84.2) | 25.0 (55.1) | 8.1 (72.3)" in majority  # majority of the clean draws, and of the attacks' draws


def test_the_purifier_skipped_column_sits_beside_its_exact_gradient_column():
    """The paper's number (on the exact-gradient column), ours under its BPDA protocol and ours under exact gradients
    read side by side: each "X, purifier skipped" column follows X, not the end of the table."""
    text = atop_table7([_record("pretrain", 0.383, 0.031)])
    header = next(line for line in text.splitlines() if line.startswith("| transform"))
    names = [cell.strip() for cell in header.strip("|").split("|")]
    assert names[names.index("PGD-10") + 1] == "PGD-10, purifier skipped"
    assert names[names.index("PGD-10, purifier skipped") + 1] == "PGD-20"
    assert "| 3.1 (72.3) | 8.1                        | — (70.9)" in text  # exact (paper), skipped, next column


def test_flagged_and_unchecked_records_carry_a_mark_and_a_footnote():
    text = atop_table7([_record("pretrain", 0.383, 0.031, reasons=("zero input gradients (exact) on 3 of 16 points",)),
                        _record("finetune", 0.438, 0.012, checks=False)])
    assert "| RT2 †       | ✗      |" in text and "| RT2 ‡       | ✓      |" in text
    assert "† RT2 ✗ unreliable: zero input gradients (exact) on 3 of 16 points." in text
    assert "‡ integrity checks not run for RT2 ✓" in text


def test_records_from_different_subsets_never_share_a_table():
    with pytest.raises(BenchError, match="different subsets"):
        atop_table7([_record("pretrain", 0.4, 0.1), _record("finetune", 0.4, 0.1, subset_hash="b" * 64)])


def test_every_paper_table_is_well_formed_and_spot_checks_match_the_texts():
    files = sorted(PAPERS.glob("*.json"))
    assert {f.stem for f in files} >= {"atop", "aid-purifier", "jatp"}
    for path in files:
        data = json.loads(path.read_text())
        assert {"paper", "citation", "text", "tables"} <= set(data), path.name
        numbers = [int(t["table"]) for t in data["tables"]]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), path.name
        for table in data["tables"]:
            where = f"{path.name} table {table.get('table')}"
            assert {"table", "caption", "setting", "row_keys", "columns", "rows"} <= set(table), where
            assert isinstance(table["table"], str) and isinstance(table["setting"], dict), where
            assert table["rows"] and table["columns"], where
            seen = set()
            for row in table["rows"]:
                assert all(key in row for key in table["row_keys"]), (where, row)
                assert len(row["values"]) == len(table["columns"]), (where, row)
                assert all(v is None or isinstance(v, float) for v in row["values"]), (where, row)
                ident = tuple(row[key] for key in table["row_keys"])
                assert ident not in seen, (where, ident)
                seen.add(ident)

    def cell(paper, table, column, **keys):
        t = paper_table(paper, table)
        row = next(r for r in t["rows"] if all(r[k] == v for k, v in keys.items()))
        return row["values"][t["columns"].index(column)]

    # AToP (000_cd873d4f46ab8c06.txt)
    assert cell("atop", "2", "Robust Acc.", classifier="wrn-28-10", method="atop (ours)") == 72.85
    assert cell("atop", "6", "StAdv", method="atop (ours)") == 56.4
    assert cell("atop", "9", "PGD-20", transform="rt2", atop=True) == 82.03
    # AID-Purifier (002_41b00f17c167c020.txt)
    assert cell("aid-purifier", "3", "Worst", dataset="cifar10", base="madry2017", purifier="none") == 51.64
    assert cell("aid-purifier", "3", "Worst", dataset="cifar10", base="madry2017", purifier="aid-purifier") == 52.65
    assert cell("aid-purifier", "1", "Natural training", purifier="pixeldefend+aid-purifier") == 42.67
    # JATP (003_8340aa819e8b798f.txt)
    assert cell("jatp", "1", "AA", defense="jatp (ours)") == 43.25
    assert cell("jatp", "2", "FWA", target_model="mart", defense="jatp' (ours)") == 35.04


def _copy_leaderboards(tmp_path):
    import shutil

    from leaderboards import render

    root = tmp_path / "leaderboards"
    shutil.copytree(render.ROOT, root, ignore=shutil.ignore_patterns("__pycache__", ".state"))
    return root


def test_rendering_is_a_pure_function_of_the_records(tmp_path):
    from leaderboards.render import render_all, stale_files, write_all

    root = _copy_leaderboards(tmp_path)
    first = render_all(root)
    assert first == render_all(root)  # byte-identical, PNGs included
    write_all(root)
    assert write_all(root) == [] and stale_files(root) == []
    assert "cifar10-jpeg-linf.md" in first and "atop-table7.md" in first and "jatp-table1.md" in first
    index = first["README.md"].decode()
    assert "[atop-table7.md](atop-table7.md)" in index and "[ci-smoke.md](ci-smoke.md)" in index
    assert first["ci-smoke.png"].startswith(b"\x89PNG")


def test_a_record_from_another_subset_or_an_invalid_one_is_refused(tmp_path):
    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    board = next(b for b in load_boards(root) if b.name == "ci-smoke")
    path = next((root / board.results).glob("*.json"))
    record = json.loads(path.read_text())
    (root / board.results / "other.json").write_text(json.dumps({**record, "subset": {**record["subset"], "hash": "f" * 64}}))
    with pytest.raises(BenchError, match="subset hash ffffffffffff is not the board's"):
        load_records(board, root)
    (root / board.results / "other.json").write_text(json.dumps({**record, "clean": {"accuracy": 2.0}}))
    with pytest.raises(BenchError, match="not a valid run record"):
        load_records(board, root)


def test_one_configuration_made_twice_is_refused_on_a_board(tmp_path):
    # A rerun after a code change has another run id (so another file name): left beside the old record it would
    # show as a second row of the same defense.
    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    board = next(b for b in load_boards(root) if b.name == "ci-smoke")
    paths = sorted((root / board.results).glob("*.json"))
    record = json.loads(paths[0].read_text())
    (root / board.results / "again.json").write_text(json.dumps({**record, "run_id": "0" * 24}))
    with pytest.raises(BenchError, match=r"2 records of one configuration \(run ids [0-9a-f, ]*00000000.*git rm"):
        load_records(board, root)
    options = {**record["settings"]["run_config"], "defense_options": {"steps": 3}}
    (root / board.results / "again.json").write_text(json.dumps(
        {**record, "run_id": "0" * 24, "settings": {**record["settings"], "run_config": options}}))
    assert len(load_records(board, root)) == len(paths) + 1  # other options: another configuration


def _moved(record, metric, by):
    value = record[metric]
    if isinstance(value, dict):
        return {**record, metric: {**value, "accuracy": value["accuracy"] + by}}
    return {**record, metric: value + by}


def test_check_compares_every_number_and_the_flag_at_the_tolerance(tmp_path):
    from bench.check import run_check

    root = _copy_leaderboards(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    committed = [json.loads(p.read_text()) for p in sorted((root / "results" / "ci-smoke").glob("*.json"))]
    bare = next(r for r in committed if r["defense"]["name"] == "none")

    def check(*replaced):
        for record in committed:
            (fresh / f"{record['run_id']}.json").write_text(json.dumps(record))
        for record in replaced:
            (fresh / f"{record['run_id']}.json").write_text(json.dumps(record))
        failures, compared = run_check(None, fresh, root)
        return [(f[1], f[2]) for f in failures], compared

    failures, compared = check()
    assert failures == [] and {"clean", "clean_worst", "robust", "robust_mean"} <= {row[2] for row in compared}
    one_image = 1 / bare["subset"]["n"]  # 1/32: more than the board's tolerance of 0.02
    assert check(_moved(bare, "robust", 0.02))[0] == []  # at the boundary: allowed
    assert check(_moved(bare, "robust", one_image))[0] == [("none on resnet20", "robust")]
    assert check(_moved(bare, "clean", -one_image))[0] == [("none on resnet20", "clean")]
    assert check(_moved(bare, "clean_worst", one_image))[0] == [("none on resnet20", "clean_worst")]
    assert check(_moved(bare, "robust_mean", 0.05))[0] == [("none on resnet20", "robust_mean")]
    assert check({**bare, "unreliable": True})[0] == [("none on resnet20", "unreliable")]
    # on other CPU kernels (or a committed record that does not name them) one image may move, two may not
    elsewhere = lambda r: {**r, "environment": {**r["environment"], "cpu_capability": "AVX9"}}  # noqa: E731
    failures, compared = check(elsewhere(_moved(bare, "robust", one_image)))
    assert failures == []
    assert {row[5] for row in compared if row[1] == "none on resnet20"} == {"±4.00 (other CPU kernels)"}
    assert {row[5] for row in compared if row[1] != "none on resnet20"} == {"±2.00"}  # same kernels: the tight bound
    assert check(elsewhere(_moved(bare, "robust", 2 * one_image)))[0] == [("none on resnet20", "robust")]
    assert check({**bare, "subset": {**bare["subset"], "hash": "f" * 64}})[0] == [("none on resnet20", "subset hash")]
    (fresh / f"{bare['run_id']}.json").unlink()
    failures, _ = run_check(None, fresh, root)
    assert [(f[1], f[2], f[4]) for f in failures] == [("none", "fresh record", "missing")]
    (root / "ci-smoke.md").write_text("edited by hand\n")
    failures, _ = run_check(None, fresh, root)
    assert any(f[0] == "ci-smoke.md" and "stale" in f[-1] for f in failures)


def test_check_reruns_a_committed_record_at_its_settings(tmp_path):
    from bench.check import run_check
    from bench.plugins import load_plugin
    from bench.runner import RunConfig, run

    load_plugin(REPO / "tests" / "plugin_examples.py")
    root = _copy_leaderboards(tmp_path)
    record, _ = run(RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=16,
                              out=root / "results" / "tiny"))
    boards = json.loads((root / "boards.json").read_text())
    boards["boards"].append({"name": "tiny", "kind": "board", "title": "tiny", "results": "results/tiny",
                             "check": {"tolerance": 0.0}})
    (root / "boards.json").write_text(json.dumps(boards))
    from leaderboards.render import write_all

    write_all(root)
    failures, compared = run_check(["tiny"], None, root)  # no --fresh: rerun from the record's settings
    assert failures == [] and {row[2] for row in compared} >= {"clean", "robust"}
    assert all(row[3] == row[4] for row in compared)  # a seeded rerun repeats exactly


def _board_record(name, clean, robust, n=10, stochastic=False, reasons=(), checks=True, floor=None):
    acc = lambda k: {"correct": k, "n": n, "accuracy": k / n, "ci95": [max(0.0, k / n - 0.2), min(1.0, k / n + 0.2)]}  # noqa: E731
    return {
        "run_id": name, "defense": {"name": name, "stochastic": stochastic}, "classifier": {"name": "resnet20"},
        "subset": {"dataset": "cifar10-jpeg", "n": n, "seed": 0, "hash": "c" * 64}, "threat": {"norm": "linf", "eps": 8 / 255},
        "suite": {"name": "linf", "version": "4", "budget": "cpu"}, "clean": acc(clean), "robust": acc(robust),
        **({"clean_worst": acc(floor)} if floor is not None else {}),
        "headline": {"metric": "worst", "accuracy": robust / n},
        "settings": {"success_draws": 10 if stochastic else 1},
        "attacks": [{"cost": {"seconds": 2.0, "forward_images": 30, "backward_images": 20}}],
        "checks": {"ran": checks}, "unreliable": bool(reasons), "unreliable_reasons": list(reasons),
    }


def test_a_board_ranks_by_robust_accuracy_and_marks_flagged_entries():
    from leaderboards.render import Board, render_board

    board = Board(name="toy", kind="board", title="Toy board", results="results/toy")
    text = render_board(board, [_board_record("none", 8, 0), _board_record("atop", 5, 2, stochastic=True, floor=3),
                                _board_record("broken", 6, 6, reasons=("zero input gradients (exact) on 4 of 4 points",)),
                                _board_record("old", 5, 1, stochastic=True)])
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    assert cells[0][3:6] == ["clean % (one draw)", "no attack % (every draw right)", "robust % (worst case)"]
    assert cells[1][:6] == ["1", "broken †", "resnet20", "60.00", "60.00", "60.00"]  # deterministic: floor = clean
    assert cells[2][:6] == ["2", "[atop](cards.md#atop)", "resnet20", "50.00", "30.00 (10 draws)", "20.00"]
    assert cells[3][:6] == ["3", "old", "resnet20", "50.00", "— (10 draws)", "10.00"]  # a record from before the floor
    assert cells[4][:6] == ["4", "[none](cards.md#none) (bare, standard training)", "resnet20", "80.00", "80.00", "0.00"]
    assert [row[7] for row in cells[1:]] == ["-20.0 / +60.0", "-30.0 / +20.0", "-30.0 / +10.0", "—"]  # vs the bare row
    assert "‡ made without the checks (unverified)" in text  # the marks are explained on every board
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| 0.20               | 5 " in lines[1]  # 2 s / 10 images, 50 image-passes / 10 images
    assert "cifar10-jpeg, n = 10 (seed 0, subset cccccccccccc), linf eps 8/255; suites: linf v4 (cpu)" in text
    assert "† broken on resnet20 unreliable: zero input gradients (exact) on 4 of 4 points." in text


def test_a_board_shows_mean_and_majority_only_beside_a_stochastic_record_run_to_completion():
    from leaderboards.render import Board, render_board

    board = Board(name="toy", kind="board", title="Toy board", results="results/toy")
    complete = _board_record("diffpure", 6, 1, stochastic=True, floor=3)
    complete.update(robust_mean=0.42, robust_majority={"correct": 4, "n": 10, "accuracy": 0.4, "ci95": [0.1, 0.7]})
    stopped = _board_record("atop", 5, 2, stochastic=True, floor=3)
    stopped["mean_omitted"] = "the attacks stopped refining points at their verdict"
    bare = _board_record("none", 8, 0)
    bare.update(robust_mean=0.0, robust_majority={"correct": 0, "n": 10, "accuracy": 0.0, "ci95": [0.0, 0.3]})

    text = render_board(board, [bare, complete, stopped])
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    assert cells[0][7:9] == ["robust % (mean of draws)", "robust % (majority vote)"]
    by_name = {row[1].split("]")[0].lstrip("["): row for row in cells[1:]}
    assert by_name["diffpure"][5:9] == ["10.00", "[0.0, 30.0]", "42.00", "40.00"]  # beside the worst case, not instead
    assert by_name["atop"][7:9] == ["—", "—"]  # stopped at the verdict: no mean is measured (rule 8)
    assert [row[1].split("]")[0].lstrip("[") for row in cells[1:]] == ["atop", "diffpure", "none"]  # ranked by worst
    assert "never rank a row" in text and "No mean over the draws is shown" not in text

    text = render_board(board, [bare, stopped])  # no stochastic record ran to completion: no such columns
    assert "robust % (mean of draws)" not in text and "No mean over the draws is shown" in text


def test_a_hand_edited_accuracy_is_refused(tmp_path):
    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    board = next(b for b in load_boards(root) if b.name == "ci-smoke")
    path = next((root / board.results).glob("*.json"))
    record = json.loads(path.read_text())
    record["robust"]["accuracy"] += 0.05
    path.write_text(json.dumps(record))
    with pytest.raises(BenchError, match="robust accuracy .* is not .* \\(edited by hand\\?\\)"):
        load_records(board, root)


def test_an_attack_cell_above_the_no_attack_floor_is_refused(tmp_path):
    # A record whose per-attack cell (robust_alone) exceeds the points every clean draw gets right was read under an
    # older clean verdict than its floor: the board refuses it rather than print a number above the truth.
    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    board = next(b for b in load_boards(root) if b.name == "aid-purifier-table3")
    load_records(board, root)  # the committed records pass
    path = next(p for p in sorted((root / board.results).glob("*.json"))
                if any("robust_alone" in a for a in json.loads(p.read_text())["attacks"]))
    record = json.loads(path.read_text())
    attack = next(a for a in record["attacks"] if "robust_alone" in a)
    floor = record["clean_worst"]["correct"]
    n = attack["robust_alone"]["n"]
    attack["robust_alone"].update(correct=floor + 1, accuracy=(floor + 1) / n)
    path.write_text(json.dumps(record))
    with pytest.raises(BenchError, match=f"robust_alone of {attack['label']} is above the no-attack floor"):
        load_records(board, root)


def test_a_record_of_a_replaced_checkpoint_is_refused(tmp_path):
    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    board = next(b for b in load_boards(root) if b.name == "ci-smoke")
    path = next(p for p in (root / board.results).glob("*.json") if json.loads(p.read_text())["defense"]["name"] == "atop")
    record = json.loads(path.read_text())
    assert record["defense"]["config"]["checkpoint_source"] == "shipped"
    load_records(board, root)  # the committed record names the file that ships now
    record["defense"]["config"]["checkpoint_sha256"] = "0" * 64  # as if the file had been replaced since
    path.write_text(json.dumps(record))
    with pytest.raises(BenchError, match="sha256 000000000000, but the shipped file is now .* rerun or git rm"):
        load_records(board, root)
    record["defense"]["config"]["checkpoint"] = "defenses/checkpoints/atop/resnet20/rt9-gan/finetune.pt"
    path.write_text(json.dumps(record))
    with pytest.raises(BenchError, match="no longer in the repository"):
        load_records(board, root)


def test_without_a_stated_tolerance_a_number_may_move_by_the_combined_interval():
    from bench.check import allowed_difference, compare

    half = {"accuracy": 0.5, "n": 512, "correct": 256}
    assert allowed_difference(half, half, None) == pytest.approx(1.96 * (2 * 0.25 / 512) ** 0.5)  # about 6.1 points
    record = {"defense": {"name": "d"}, "classifier": {"name": "c"}, "subset": {"hash": "h"}, "clean": half, "robust": half}
    moved = dict(record, robust={**half, "accuracy": 0.56})
    assert [row[-1] for row in compare("b", record, moved, None)] == ["ok", "ok"]
    moved = dict(record, robust={**half, "accuracy": 0.57})
    assert [row[-1] for row in compare("b", record, moved, None)] == ["ok", "FAIL"]


def test_boards_link_each_defense_to_its_card():
    from leaderboards.render import render_all

    files = render_all(pictures=False)
    cards = files["cards.md"].decode()
    for name in ("atop", "jatp", "nrp", "pixeldefend", "aid-purifier", "none"):
        assert f'<a id="{name}"></a>' in cards
    assert "| venue | ICLR 2024 |" in cards
    assert "[atop](cards.md#atop)" in files["cifar10-jpeg-linf.md"].decode()
    assert "(cards.md)" in files["README.md"].decode()


def test_generated_markdown_does_not_depend_on_plugins_loaded_in_the_process():
    # The CI suite loads tests/plugin_examples.py in-process (test_cli) before it checks the boards: a plug-in
    # in the registry must not show up in cards.md and make the committed markdown look stale.
    from pathlib import Path

    from bench.plugins import load_plugin
    from defenses.base import DEFENSES
    from leaderboards.render import render_all, stale_files

    before = render_all(pictures=False)["cards.md"]
    load_plugin(Path(__file__).with_name("plugin_examples.py"))
    assert "plugin-nan" in DEFENSES.names()
    assert render_all(pictures=False)["cards.md"] == before
    assert stale_files() == []


def test_a_defense_that_changes_no_outcome_is_called_so_on_its_board():
    # A purifier trained into the identity (JATP with the per-image L2 pixel term) gives rows equal to the bare
    # classifier's, image by image; the board must say so rather than show identical rows without a word, and must
    # not say it of a purifier that changed an outcome (NRP, the retrained JATP).
    from leaderboards.render import render_all, same_as_bare

    files = render_all(pictures=False)
    board = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "jatp-table1").glob("*.json"))]
    identity = [r for r in board if same_as_bare(r, board)]
    notes = [line for line in files["jatp-table1.md"].decode().splitlines() if line.startswith("= ")]
    assert len(notes) == (1 if identity else 0)
    assert any(r["defense"]["name"] == "jatp" and r not in identity for r in board)  # the retrained JATP purifies
    assert all(f"{r['defense']['name']} on {r['classifier']['name']}" in notes[0] for r in identity)
    assert not any("nrp on resnet4b" in line for line in notes)
    committed = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "ci-smoke").glob("*.json"))]
    bare = next(r for r in committed if r["defense"]["name"] == "none")
    copy = {**bare, "defense": {**bare["defense"], "name": "identity"}}
    assert same_as_bare(copy, committed)
    flipped = list(bare["samples"]["robust"])
    flipped[0] = not flipped[0]
    assert not same_as_bare({**copy, "samples": {**bare["samples"], "robust": flipped}}, committed)


def test_table7_shows_the_papers_own_protocol_beside_the_adaptive_columns():
    # PROTOCOL rule 9: PGD-20 crafted on the bare classifier (the suite's transfer attack) has no paper column of
    # its own; the board adds it after the paper's columns once a record measures it.
    plain = atop_table7([_record("finetune", 0.438, 0.012)])
    assert "crafted on the bare classifier" not in plain
    record = _record("finetune", 0.438, 0.012)
    record["attacks"].append({"attack": "transfer", "params": {"steps": 20}, "robust_alone": {"accuracy": 0.412},
                              "robust_alone_mean": 0.43, "robust_alone_majority": {"accuracy": 0.42}})
    text = atop_table7([record])
    header = next(line for line in text.splitlines() if line.startswith("| transform"))
    assert header.rstrip(" |").endswith("PGD-20 crafted on the bare classifier (the caption's protocol)")
    row = next(line for line in text.splitlines() if line.startswith("| RT2") and "✓" in line)
    assert row.rstrip(" |").endswith("41.2")
    assert atop_table7([record], field="robust_alone_mean").count("43.0") == 1


def test_a_record_from_a_dirty_tree_is_marked_and_footnoted():
    clean = _record("pretrain", 0.383, 0.031)
    dirty = {**_record("finetune", 0.438, 0.012, checks=False), "environment": {"git_dirty": True}}
    text = atop_table7([clean, dirty])
    assert "| RT2 ‡ §     | ✓      |" in text and "| RT2         | ✗      |" in text
    assert "§ RT2 ✓: each made from a working tree with uncommitted changes" in text


def test_a_board_borrows_records_of_another_board_and_a_pattern_naming_no_folder_is_an_error(tmp_path):
    # One AutoAttack-rand run of `atop` measures AToP's Tables 5 and 6: Table 5 shows it without a copy that could
    # drift from the original. The test plants that record (it is off the boards while its checkpoint's rerun runs).
    from dataclasses import replace

    from leaderboards.render import load_boards, load_records

    root = _copy_leaderboards(tmp_path)
    boards = {b.name: b for b in load_boards(root)}
    [pattern] = boards["atop-table5"].borrow
    for planted in (root / "results" / "atop-table6").glob("*_atop_autoattack-rand_*.json"):
        planted.unlink()
    assert load_records(boards["atop-table5"], root)  # matching nothing borrows nothing, and the board still renders
    source = next((root / "results" / "atop-table5").glob("*_atop-rt2-ae-ft_autoattack-rand_*.json"))
    source.rename(root / "results" / "atop-table6" / source.name.replace("_atop-rt2-ae-ft_", "_atop_"))
    shown = load_records(boards["atop-table5"], root)
    own = {json.loads(p.read_text())["run_id"] for p in (root / "results" / "atop-table5").glob("*.json")}
    original = {r["run_id"] for r in load_records(boards["atop-table6"], root)}
    borrowed = [r for r in shown if r["run_id"] not in own]
    assert len(borrowed) == 1 and {r["run_id"] for r in borrowed} <= original and len(shown) == len(own) + 1
    assert all(r["suite"]["name"] == "autoattack-rand" and r["threat"]["norm"] == "linf" for r in borrowed)
    assert sorted(root.glob(pattern)) == sorted((root / "results" / "atop-table6").glob("*_atop_autoattack-rand_*"))
    with pytest.raises(BenchError, match="borrow pattern 'results/nowhere/\\*.json' names no folder"):
        load_records(replace(boards["atop-table5"], borrow=["results/nowhere/*.json"]), root)


def test_a_column_pinned_to_a_radius_reads_only_records_of_that_radius():
    from leaderboards.render import metric_value

    record = {"threat": {"norm": "l2", "eps": 0.5}, "robust": {"accuracy": 0.25}}
    assert metric_value(record, "robust@l2") == 0.25 and metric_value(record, "robust@l2:0.5") == 0.25
    assert metric_value(record, "robust@l2:1") is None and metric_value(record, "robust@linf") is None
    linf = {"threat": {"norm": "linf", "eps": 8 / 255}, "robust": {"accuracy": 0.1}}
    assert metric_value(linf, "robust@linf:8/255") == 0.1 and metric_value(linf, "robust@linf:4/255") is None


def test_autoattack_standard_on_a_stochastic_defense_is_marked_with_the_worst_case_beside_it():
    # AutoAttack standard takes one draw per gradient: before nrp-dynamic was rerun with AutoAttack-rand (jatp-table1
    # v3) its AA cell read above the suite's EOT attacks; such a cell carries a mark and the note names the EOT
    # attacks' number and the record's worst case. The v2 record is rebuilt here from the v3 one (the same run but
    # for AutoAttack's version).
    from leaderboards.render import footnotes, single_draw_attacks

    board = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "jatp-table1").glob("*.json"))]
    rand = next(r for r in board if r["defense"]["stochastic"])
    assert single_draw_attacks(rand) == []  # AutoAttack-rand averages over draws: no mark
    standard = {**rand, "attacks": [{**a, "params": {**a["params"], "version": "standard"}} if a["attack"] == "autoattack"
                                    else a for a in rand["attacks"]]}
    assert single_draw_attacks(standard) == ["autoattack"]
    assert not any(single_draw_attacks(r) for r in board if not r["defense"]["stochastic"])
    note = next(n for n in footnotes([("x", standard)]) if n.startswith("¶ x"))
    assert f"worst case over every attack is {100 * standard['robust']['accuracy']:.2f}" in note
    assert not any(n.startswith("¶") for n in footnotes([("x", {**standard, "defense": {**standard["defense"], "stochastic": False}})]))
    assert not any(n.startswith("¶") for n in footnotes([("x", rand)]))
    text = (REPO / "leaderboards" / "jatp-table1.md").read_text()
    assert not any(line.startswith(f"| {rand['defense']['name']} on") and " ¶ " in line for line in text.splitlines())


def test_the_single_draw_mark_is_on_the_cell_in_atops_transform_tables_too():
    # The ¶ mark used to be added only by the plain paper-table renderer; AToP's transform tables showed the footnote
    # without marking the cell. Both now take it from single_draw_mark, in every reading of the table.
    from dataclasses import replace

    from leaderboards.render import VARIANTS, transform_rows

    board = replace({b.name: b for b in load_boards()}["atop-table7"], also={"AutoAttack": "autoattack"})
    records = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "atop-table7").glob("*.json"))]
    # any fine-tuned row on the board (a replaced checkpoint takes its records off until their reruns land)
    tuned = next(r for r in records if r["defense"]["name"].endswith("-gan-ft"))
    assert tuned["defense"]["stochastic"]
    value = {"accuracy": 0.5}
    tuned["attacks"].append({"attack": "autoattack", "label": "autoattack", "params": {"version": "standard"},
                             "robust_alone": value, "robust_alone_mean": 0.5, "robust_alone_majority": 0.5})
    for field_name, _, clean_of, floor in VARIANTS:
        rows, headers, _, _ = transform_rows(board, paper_table("atop", "7"), records, field_name, clean_of, floor)
        column = headers.index("AutoAttack")
        marked = [(row[0], row[1]) for row in rows if row[column].endswith(" ¶")]
        assert marked == [(tuned["defense"]["config"]["transform"].upper(), "✓")], (field_name, marked)
        assert rows[0][column] == "—"  # the bare classifier's record has no AutoAttack: no number, no mark


def test_paper_tables_give_each_measured_cell_its_interval():
    # Issue 19: every paper board shows our numbers "with the intervals". Each cell's 95% interval is the record's
    # own (Wilson, over its n images), for the attack the column reads; a Worst column takes its lowest metric's.
    from leaderboards.render import VARIANTS, metric_interval, metric_value, transform_rows

    record = json.loads(next((REPO / "leaderboards" / "results" / "jatp-table1").glob("*nrp-dynamic*.json")).read_text())
    pgd = next(a for a in record["attacks"] if a["attack"] == "pgd")["robust_alone"]
    assert metric_interval(record, "pgd40") == tuple(pgd["ci95"])
    low, high = metric_interval(record, "pgd40")
    assert low <= metric_value(record, "pgd40") <= high
    lowest = min(("pgd40", "apgd-dlr40"), key=lambda m: metric_value(record, m))
    assert metric_interval(record, "min:pgd40,apgd-dlr40") == metric_interval(record, lowest)
    assert metric_interval(record, "clean") == tuple(record["clean"]["ci95"])
    assert metric_interval(record, "robust_mean") is None and metric_interval(record, "fwa") is None
    text = (REPO / "leaderboards" / "jatp-table1.md").read_text()
    section = text.split("95% intervals of the cells above", 1)[1].split("## The paper's numbers", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "[" in line]
    assert len(rows) == len(list((REPO / "leaderboards" / "results" / "jatp-table1").glob("*.json")))
    board = {b.name: b for b in load_boards()}["atop-table7"]
    records = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "atop-table7").glob("*.json"))]
    for field_name, _, clean_of, floor in VARIANTS:
        rows, headers, _, intervals = transform_rows(board, paper_table("atop", "7"), records, field_name, clean_of, floor)
        if field_name != "robust_alone":
            assert intervals == []  # a mean over draws is no count of images
            continue
        assert len(intervals) == len(rows) and [i[1] for i in intervals] == [r[1] for r in rows]  # same rows, same order
        column = headers.index("PGD-20")
        for row, ci in zip(rows, intervals):
            if row[column].startswith("—"):
                assert ci[column] == "—"
            else:
                value = float(row[column].split(" ")[0])
                low, high = (float(v) for v in ci[column].strip("[]").split(", "))
                assert low - 0.05 <= value <= high + 0.05


def test_a_paper_board_mixing_radii_names_each_rows_threat():
    # jatp-table1 holds rows at 2/255 (before ResNet-4b) and at the paper's 8/255 (before resnet20-at8): without the
    # radius in the row, "none on resnet4b" and "none on resnet20-at8" read as the same measurement at two strengths.
    from leaderboards.render import render_paper

    board = {b.name: b for b in load_boards()}["jatp-table1"]
    records = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "jatp-table1").glob("*.json"))]
    radii = {round(r["threat"]["eps"] * 255) for r in records}
    assert radii == {2, 8}
    text = render_paper(board, records)
    rows = [line for line in text.split("## Measured here", 1)[1].split("95% intervals", 1)[0].splitlines()
            if line.startswith("| ") and " on " in line]
    assert len(rows) == len(records)
    assert all(("linf 2/255" in row) != ("linf 8/255" in row) for row in rows)
    one_radius = [r for r in records if round(r["threat"]["eps"] * 255) == 2]
    single = render_paper(board, one_radius).split("## Measured here", 1)[1].split("95% intervals", 1)[0]
    assert "linf 2/255 |" not in single  # one radius: the setting line above the table says it once


def test_a_board_row_names_the_gradient_route_of_its_record():
    from leaderboards.render import what_it_is

    records = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "diffpure-routes").glob("*.json"))]
    routes = sorted(what_it_is(r) for r in records if r["defense"]["name"] == "diffpure")
    assert {" (gradient route: bpda)", " (gradient route: exact)"} <= set(routes)
    assert what_it_is({"defense": {"name": "atop", "config": {}}}) == ""
    text = (REPO / "leaderboards" / "diffpure-routes.md").read_text()
    assert "(gradient route: exact)" in text and "(gradient route: bpda)" in text


def test_every_committed_record_prints_its_summary():
    """`bench run` prints the record it wrote; a correction attack appended to an independent suite has no
    run-alone reading (the diffpure adjoint record has two) and must print as such, not crash."""
    from bench.reports.summary import format_result

    paths = sorted((REPO / "leaderboards" / "results").glob("*/*.json"))
    corrected = 0
    for path in paths:
        record = json.loads(path.read_text())
        text = format_result(record)
        assert record["defense"]["name"] in text
        if record["suite"].get("independent") and any(a.get("stage") == "correction" for a in record["attacks"]):
            corrected += 1
            assert "(correction)" in text
    assert corrected >= 1


def test_a_resumed_runs_summary_says_what_its_seconds_cover():
    """A resumed run's own clock covers only its last part (a Table 7 record once read 65 s of a 102-minute run); the
    summary must say so and give the attacks' time over every part. Any committed Table 7 record serves, its timing
    set here."""
    from bench.reports.summary import format_result

    path = sorted((REPO / "leaderboards" / "results" / "atop-table7").glob("*atop-rt*.json"))[0]
    record = json.loads(path.read_text())
    record["timing"].pop("parts", None)  # an older record, before the part count
    record["timing"].update(seconds=64.5, attack_seconds=6123.9)
    assert "the attacks took 6123.9 s over every part" in format_result(record)
    record["timing"].update(seconds=7000.0)
    assert "in 7000.0 s" in format_result(record) and "every part" not in format_result(record)
    record["timing"].update(parts=2, seconds=64.5)
    assert "the attacks took 6123.9 s over 2 parts" in format_result(record)
    # one part under torchrun: the attack seconds add up over the ranks and exceed the wall clock; not a resumed run
    record["timing"].update(parts=1, seconds=3000.0)
    assert "in 3000.0 s" in format_result(record) and "resumed" not in format_result(record)
    record["timing"].update(seconds=64.5, parts=3)
    assert "the attacks took 6123.9 s over 3 parts" in format_result(record)


def test_a_record_waiting_for_its_rerun_names_a_board_and_leaves_it_when_the_rerun_lands():
    """leaderboards/pending/<results folder>/ holds the records that left a board (a replaced checkpoint) until
    their reruns land; a rerun on the board (same settings: scripts/rerun_records.py's identity, the checkpoint's hash
    aside) means the old record must go."""
    from pathlib import Path

    from tests.helpers import load_script

    identity = load_script("rerun_records").identity
    root = REPO / "leaderboards"
    boards = {Path(b.results).name: b for b in load_boards() if b.results}
    for path in sorted((root / "pending").glob("*/*.json")):
        assert path.parent.name in boards, f"{path}: no board keeps its results in results/{path.parent.name}"
        on_board = {identity(json.loads(p.read_text())) for p in (root / boards[path.parent.name].results).glob("*.json")}
        assert identity(json.loads(path.read_text())) not in on_board, f"{path}: its rerun is on the board; delete it"


def test_transform_tables_pair_each_transforms_two_rows_by_image():
    from bench.reports.compare import compare_records

    records = [json.loads(p.read_text()) for p in sorted((REPO / "leaderboards" / "results" / "atop-table7").glob("*.json"))]
    text = render_paper(TABLE7, records)
    section = text[text.index("## Does AToP fine-tuning raise accuracy?"):]
    by = {(r["defense"]["config"].get("transform"), r["defense"]["config"].get("stage")): r
          for r in records if r["defense"]["name"] != "none"}
    pairs = [t for t in ("rt1", "rt2", "rt3") if (t, "finetune") in by and (t, "pretrain") in by]
    assert pairs, "Table 7 has at least one transform with both rows"
    for t in pairs:
        line = next(x for x in section.splitlines() if x.startswith(f"| {t.upper()} "))
        worst = next(r for r in compare_records(by[(t, "finetune")], by[(t, "pretrain")])["paired"]
                     if r["outcome"].startswith("robust, worst"))
        assert f"({worst['only_a']} / {worst['only_b']}, p {worst['mcnemar_p']:.2g})" in line
    # a transform with one row only has no line
    for t in {"rt1", "rt2", "rt3"} - set(pairs):
        assert f"| {t.upper()} " not in section
