"""Paper tables rendered from records: AToP Table 7 beside the paper's numbers."""

from __future__ import annotations

import json

import pytest

from leaderboards.atop_tables import PAPERS, atop_table7, paper_table


def _record(stage: str, clean: float, pgd10: float, subset_hash: str = "a" * 64, checks: bool = True,
            reasons: tuple = ()) -> dict:
    def attack(name, steps, value, skip=False):
        entry = {"attack": name, "params": {"steps": steps} if steps else {},
                 "robust_alone": {"accuracy": value}, "robust_alone_mean": value + 0.1}
        return {**entry, "bpda_stages": ["purifier"]} if skip else entry

    return {
        "defense": {"name": f"atop-rt2-gan-{stage[:3]}", "config": {"transform": "rt2", "stage": stage}},
        "suite": {"name": "atop-table7", "version": "1", "budget": "cpu", "eot_draws": 10},
        "subset": {"dataset": "cifar10-jpeg", "n": 256, "seed": 0, "hash": subset_hash},
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
    assert "| RT2         | ✗      | 38.3 (84.2) | 20.0 (55.1) | 3.1 (72.3)" in text
    assert "| RT2         | ✓      | 43.8 (90.0) | 20.0 (89.8) | 1.2 (84.8)" in text
    assert "— (76.0)" in text  # rows without a record keep the paper's number
    mean = atop_table7([_record("pretrain", 0.383, 0.031)], field="robust_alone_mean")
    assert "37.3 (84.2) | 30.0 (55.1) | 13.1 (72.3)" in mean  # clean_mean and the mean over draws


def test_flagged_and_unchecked_records_carry_a_mark_and_a_footnote():
    text = atop_table7([_record("pretrain", 0.383, 0.031, reasons=("zero input gradients (exact) on 3 of 16 points",)),
                        _record("finetune", 0.438, 0.012, checks=False)])
    assert "| RT2 †       | ✗      |" in text and "| RT2 ‡       | ✓      |" in text
    assert "† RT2 ✗ unreliable: zero input gradients (exact) on 3 of 16 points." in text
    assert "‡ integrity checks not run for RT2 ✓" in text


def test_records_from_different_subsets_never_share_a_table():
    with pytest.raises(ValueError, match="different subsets"):
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
