"""RobustBench interoperability: records exported as its model_info entries, and zoo classifiers loaded offline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench.classifiers.robustbench_zoo import import_robustbench
from bench.errors import BenchError
from bench.export import LEADERBOARD_FIELDS, MODEL_INFO_FIELDS, check_entry, export_robustbench, model_info

REPO = Path(__file__).resolve().parent.parent
BOARD = REPO / "leaderboards" / "results" / "cifar10-jpeg-linf"


def test_the_field_list_is_robustbenchs():
    utils, _ = import_robustbench()
    declared = {f.name for f in dataclasses.fields(utils.ModelInfo)} - {
        "corruptions_acc", "corruptions_acc_3d", "corruptions_mce", "corruptions_mce_3d"}
    assert set(MODEL_INFO_FIELDS) == declared
    assert set(LEADERBOARD_FIELDS) == {"external", "unreliable"}  # read by its leaderboard code beside ModelInfo


def test_the_linf_board_exports_with_the_cards_fields_filled(tmp_path):
    utils, _ = import_robustbench()
    records = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in BOARD.glob("*.json")}
    written = export_robustbench([BOARD], tmp_path)
    assert len(written) == len(records) > 0
    for path, unfilled in written:
        entry = json.loads(path.read_text())
        check_entry(entry)
        utils.ModelInfo(**{k: v for k, v in entry.items() if k in MODEL_INFO_FIELDS})  # RobustBench takes it
        record = records[entry["_bench"]["run_id"]]
        assert path.parent == tmp_path / "cifar10-jpeg" / "Linf"
        assert entry["dataset"] == "cifar10-jpeg" and entry["eps"] == "8/255"  # never passed off as cifar10
        assert entry["clean_acc"] == f"{100 * record['clean']['accuracy']:.2f}"
        assert entry["external"] == f"{100 * record['robust']['accuracy']:.2f}" and "autoattack_acc" not in entry
        assert "suite linf v5" in entry["footnote"] and "not an AutoAttack number" in entry["footnote"]
        assert any(item.startswith("reported:") for item in unfilled)
        if record["defense"]["name"] != "none":
            assert entry["link"].startswith("https://arxiv.org/") and entry["authors"] and entry["venue"] == "ICLR 2024"
            assert path.name.startswith("Lin2024Adversarial_")
        if record["settings"]["success_draws"] > 1:
            assert f"all {record['settings']['success_draws']} re-classification draws" in entry["footnote"]


def _record(**changes):
    record = json.loads(next(BOARD.glob("*_none_*.json")).read_text())
    for key, value in changes.items():
        record[key] = value
    return record


def test_flagged_or_unverified_records_export_as_unreliable_and_stadv_is_refused():
    _, entry, _ = model_info(_record(unreliable=True, unreliable_reasons=["zero input gradients"]))
    assert entry["unreliable"] is True and "zero input gradients" in entry["footnote"]
    _, entry, _ = model_info(_record(checks={"ran": False}))
    assert entry["unreliable"] is True and "unverified" in entry["footnote"]
    with pytest.raises(BenchError, match="no stadv threat model"):
        model_info(_record(threat={"norm": "stadv", "eps": 0.05}))


def test_an_autoattack_record_fills_autoattack_acc():
    record = _record()
    record["suite"] = {**record["suite"], "name": "autoattack"}
    _, entry, unfilled = model_info(record)
    assert entry["autoattack_acc"] == f"{100 * record['robust']['accuracy']:.2f}" and "external" not in entry
    assert not any(item.startswith("autoattack_acc") for item in unfilled)


def test_a_zoo_classifier_loads_offline_from_its_model_folder(tmp_path, monkeypatch):
    """A checkpoint of a zoo architecture placed at $BENCH_WEIGHTS_DIR/robustbench/cifar10/Linf/<Name>.pt (RobustBench's
    layout, keys with DataParallel's ``module.`` prefix as its files have them) loads without a download and computes
    what the network it came from computes."""
    from bench.classifiers.base import load_classifier

    _, zoo = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Wong2020Fast"  # a PreAct ResNet-18: small enough to build in a test
    torch.manual_seed(0)
    net = zoo[BenchmarkDataset("cifar10")][ThreatModel("Linf")][name]["model"]().eval()
    folder = tmp_path / "robustbench" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, folder / f"{name}.pt")
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr("robustbench.utils.download_gdrive_new", lambda *a, **k: pytest.fail("tried to download"))
    classifier = load_classifier(f"robustbench:{name}").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(classifier(x), net(x), atol=1e-5)
    assert classifier.info.name == f"robustbench:{name}" and classifier.info.mean is None
