"""Paper tables rendered from records: AToP Table 7 beside the paper's numbers."""

from __future__ import annotations

import pytest

from leaderboards.atop_tables import atop_table7, paper_table


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
