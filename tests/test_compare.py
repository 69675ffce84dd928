"""``bench compare``: paired comparison of two committed records."""

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.errors import BenchError
from bench.core.stats import mcnemar_exact
from bench.reports.compare import compare_records, format_comparison, load_record

RESULTS = Path(__file__).resolve().parent.parent / "leaderboards" / "results"


def _one(pattern, board="atop-table5"):
    (path,) = (RESULTS / board).glob(pattern)
    return path


def _kept(record):
    s = record["samples"]
    return {i for i, r in zip(s["index"], s["robust"]) if r}


def test_compare_pairs_by_image_and_counts_discordant_images():
    # AToP's Table 5 AE rows under AutoAttack-rand (docs/atop.md: 5 images to none, exact McNemar p = 0.06)
    a = load_record(_one("*_atop-rt2-ae-ft_autoattack-rand_*.json"))
    b = load_record(_one("*_atop-rt2-ae-pre_autoattack-rand_*.json"))
    c = compare_records(a, b)
    worst = next(r for r in c["paired"] if r["outcome"].startswith("robust, worst"))
    ka, kb = _kept(a), _kept(b)
    assert (worst["only_a"], worst["only_b"], worst["both"]) == (len(ka - kb), len(kb - ka), len(ka & kb))
    assert worst["only_a"] + worst["only_b"] > 0 and worst["mcnemar_p"] == mcnemar_exact(worst["only_a"], worst["only_b"])
    assert worst["a"] == a["robust"]["accuracy"] and worst["b"] == b["robust"]["accuracy"]
    clean = next(r for r in c["paired"] if r["outcome"].startswith("clean"))
    assert clean["a"] == a["clean"]["accuracy"] and clean["both"] + clean["only_a"] + clean["only_b"] + clean["neither"] == 128
    assert c["mean"] is None  # AutoAttack stops at a point's verdict: the records have no mean over the draws
    # the pairing follows test-set indices, not positions: reversing one record's samples changes nothing
    rev = json.loads(json.dumps(b))
    rev["samples"] = {k: v[::-1] for k, v in b["samples"].items()}
    assert compare_records(a, rev)["paired"] == c["paired"]


def test_compare_refuses_records_without_common_images():
    a = load_record(_one("*_atop-rt2-ae-ft_autoattack-rand_*.json"))
    b = json.loads(json.dumps(a))
    b["samples"]["index"] = [i + 100000 for i in b["samples"]["index"]]
    with pytest.raises(BenchError, match="share no image"):
        compare_records(a, b)


def test_compare_command_prints_and_writes_json(tmp_path, capsys):
    a = _one("*_atop-rt1-gan-ft_atop-table7_*.json", "atop-table7")
    b = _one("*_atop-rt1-gan-pre_atop-table7_*.json", "atop-table7")
    out = tmp_path / "c.json"
    assert main(["compare", str(a), str(b), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "McNemar p (exact)" in text and data["n"] == 256
    assert data["per_attack"], "the atop-table7 suite is independent: each attack has a run-alone reading"
    assert data["mean"] is not None and -1 <= data["mean"]["difference"] <= 1
    assert text.strip().startswith("A: atop-rt1-gan-ft") and format_comparison(data).splitlines()[0] in text


def test_independent_records_are_paired_per_attack(tmp_path):
    """Two fresh records of the atop-table7 suite (independent, run to completion) on one tiny subset: each attack's
    per-image draws are in the record, and the paired counts agree with its run-alone totals."""
    from bench.core.plugins import load_plugin
    from bench.evaluation.runner import RunConfig, run
    from defenses.base import DEFENSES

    load_plugin(Path(__file__).with_name("plugin_examples.py"))
    base = dict(classifier="tiny", dataset="tiny-test", budget="smoke", n=8, out=tmp_path, suite="atop-table7",
                checks=False)
    noisy = DEFENSES.get("planted-noise")
    noisy.stochastic = True  # declared, so the suite draws and runs to completion
    try:
        a, _ = run(RunConfig(defense="planted-noise", **base))
    finally:
        noisy.stochastic = False
    b, _ = run(RunConfig(defense="planted-shared-noise", **base))  # declared stochastic: the same attack labels
    assert all(len(x["draws_right"]) == 8 for x in a["attacks"] + b["attacks"])
    c = compare_records(a, b)
    assert len(c["per_attack"]) == len(a["attacks"])
    for row, x, y in zip(c["per_attack"], a["attacks"], b["attacks"]):
        w = row["paired_worst"]
        assert w["both"] + w["only_a"] == x["robust_alone"]["correct"] and w["both"] + w["only_b"] == y["robust_alone"]["correct"]
        m = row["paired_majority"]
        assert m["both"] + m["only_a"] == x["robust_alone_majority"]["correct"]
    assert "paired by image" in format_comparison(c)
