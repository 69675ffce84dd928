"""The Python API mirrors the command line: same records, user modules, notebook registration, pictures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bench
from bench.cli import main
from bench.plugins import load_plugin
from bench.record import validate_record
from tests.conftest import REPO
from tests.helpers import load_script

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))


@pytest.fixture(autouse=True)
def _plugin():
    load_plugin(PLUGIN)  # the tiny dataset, classifier and defenses


def _without_timing(data):
    """The record without wall-clock fields (timing, seconds of each attack and of the checks)."""
    if isinstance(data, dict):
        return {k: _without_timing(v) for k, v in data.items() if k not in ("timing", "seconds")}
    if isinstance(data, list):
        return [_without_timing(v) for v in data]
    return data


def test_evaluate_a_loaded_defense_gives_the_record_bench_run_writes(tmp_path):
    cli = bench.run(bench.RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke",
                                    n=20, batch_size=8, out=tmp_path / "cli"))
    defense = bench.load_defense("plugin-blur", classifier="tiny")
    subset = bench.load_subset("tiny-test", n=20)
    api = bench.evaluate(defense, budget="smoke", subset=subset, batch_size=8, out=tmp_path / "api")
    assert api.run_id == cli.run_id and api.path.is_file() and cli.path.is_file()
    assert _without_timing(api.data) == _without_timing(cli.data)
    assert api.robust_accuracy == cli.data["robust"]["accuracy"] and api.clean_accuracy == 1.0
    assert "plugin-blur on tiny" in api.summary() and f"record: {api.path}" in api.summary()


class Doubler(nn.Module):
    """A plain user module around the tiny classifier (not a Defense)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return 2 * self.classifier(x)


def test_any_module_is_evaluated_as_one_model(tmp_path):
    model = Doubler(bench.load_classifier("tiny"))
    record = bench.evaluate(model, budget="smoke", dataset="tiny-test", n=16, out=tmp_path)
    validate_record(json.loads(record.path.read_text()))
    assert record["defense"]["name"] == "Doubler" and record["classifier"]["architecture"] == "Doubler"
    assert record["classifier"]["weights"].startswith("in memory, sha256 ")
    assert not record["defense"]["stochastic"] and not record.unreliable
    assert [a["label"] for a in record["attacks"]] == ["fgsm", "pgd-10"]  # exact gradients, no EOT or BPDA
    noisy = bench.evaluate(model, budget="smoke", dataset="tiny-test", n=16, out=tmp_path, name="doubler", stochastic=True)
    assert noisy["defense"]["name"] == "doubler" and noisy["settings"]["success_draws"] == 10
    assert all(a.get("eot") == 2 for a in noisy["attacks"])  # the smoke budget's EOT for a declared-random model


def test_a_classifier_is_evaluated_behind_the_none_defense(tmp_path):
    record = bench.evaluate(bench.load_classifier("tiny"), budget="smoke", dataset="tiny-test", n=8, out=tmp_path)
    assert record["defense"]["name"] == "none" and record["classifier"]["name"] == "tiny"


def test_notebook_registration_replaces_a_rerun_cell_but_refuses_a_real_clash():
    namespace = {"__name__": "notebook_cell"}
    cell = ("import bench\n@bench.register_defense('nb-identity')\nclass NbIdentity(bench.Defense):\n    pass\n")
    exec(cell, namespace)  # noqa: S102
    first = namespace["NbIdentity"]
    exec(cell, namespace)  # noqa: S102 - the same cell run again
    assert namespace["NbIdentity"] is not first and bench.load_defense("nb-identity", "tiny").__class__ is namespace["NbIdentity"]
    with pytest.raises(ValueError, match="already registered"):
        exec(cell.replace("NbIdentity", "Other"), namespace)  # noqa: S102


def test_importing_bench_is_cheap_and_exports_the_api():
    out = subprocess.run([sys.executable, "-c", "import sys, bench; print('torch' in sys.modules); print(bench.__all__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "False"
    for name in ("load_defense", "load_classifier", "load_subset", "evaluate", "register_defense", "register_attack"):
        assert name in out[1]


def test_bench_show_writes_the_grid(tmp_path, capsys):
    out = tmp_path / "show.png"
    assert main(["--plugin", PLUGIN, "show", "--defense", "plugin-blur", "--classifier", "tiny", "--dataset", "tiny-test",
                 "--n", "20", "--images", "3", "--attack-option", "steps=3", "--out", str(out)]) == 0
    assert f"picture: {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_panels_follow_the_pipeline():
    from attacks.base import Threat
    from bench.pictures import show_panels

    defense = bench.load_defense("plugin-blur", classifier="tiny")
    subset = bench.load_subset("tiny-test", n=4)
    panels = show_panels(defense, subset.x, subset.y, Threat("linf", 0.1), attack_params={"steps": 5})
    images = panels["images"]
    assert (images["adversarial"] - subset.x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert torch.allclose(images["purified (clean)"], defense.purifier(defense.transform(subset.x)))
        assert torch.equal(panels["preds"]["purified (adv.)"], defense(images["adversarial"]).argmax(1))
    assert panels["attack"] == "pgd(steps=5)"


def test_bench_curve_evaluates_each_radius_for_the_defense_and_its_classifier(tmp_path, capsys):
    out = tmp_path / "curve.png"
    assert main(["--plugin", PLUGIN, "curve", "--defense", "plugin-blur", "--classifier", "tiny", "--dataset", "tiny-test",
                 "--n", "8", "--eps", "0,0.05,0.2", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert sorted((p["model"], p["eps"]) for p in points) == sorted(
        (m, e) for m in ("plugin-blur", "none (bare classifier)") for e in (0.0, 0.05, 0.2))
    for model in ("plugin-blur", "none (bare classifier)"):
        accs = [p["robust"]["accuracy"] for p in sorted((p for p in points if p["model"] == model), key=lambda p: p["eps"])]
        assert accs[0] == 1.0 and accs == sorted(accs, reverse=True)  # clean first, then no better at a larger radius
    # eps 0 is the worst case without an attack (the no-attack floor), with the one-draw clean accuracy beside it;
    # for a deterministic defense the two agree
    zero = next(p for p in points if p["model"] == "plugin-blur" and p["eps"] == 0)
    assert zero["clean_one_draw"]["accuracy"] == zero["robust"]["accuracy"] == 1.0
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4
    assert "picture:" in capsys.readouterr().out


def test_clean_draws_reads_every_draw_from_its_own_seed(capsys):
    # scripts/clean_draws.py: how docs/ reads a candidate checkpoint's clean accuracy (mean of draws, seeds 1000 + k)
    script = load_script("clean_draws")
    subset = bench.load_subset("tiny-test", n=40)
    deterministic = script.clean_draws(bench.load_defense("none", "tiny"), subset.x, subset.y, draws=2, batch_size=16)
    assert deterministic == [100.0, 100.0]  # the tiny dataset is labelled by the tiny classifier itself
    noisy = bench.load_defense("planted-noise", "tiny")
    first = script.clean_draws(noisy, subset.x, subset.y, draws=3, batch_size=16)
    assert first == script.clean_draws(noisy, subset.x, subset.y, draws=3, batch_size=16)  # seeded: reproducible
    assert len(set(first)) > 1 and min(first) < 100  # each draw is its own noise, which costs accuracy
    script.main(["--defense", "planted-noise", "--classifier", "tiny", "--dataset", "tiny-test", "--n", "40"])
    out = capsys.readouterr().out
    mean = sum(first) / 3
    assert f"mean {mean:.2f}% over 3 draws ({', '.join(f'{a:.2f}' for a in first)})" in out


def test_a_rerun_after_a_checkpoint_was_replaced_counts_as_the_same_configuration():
    # scripts/rerun_records.py skips records already rerun into --out; a rerun names the new file's sha256, so the
    # hash must not be part of what is matched (or the script would rerun every record again after an interruption).
    identity = load_script("rerun_records").identity
    record = {"defense": {"name": "atop", "config": {"transform": "rt2", "checkpoint": "c.pt", "checkpoint_sha256": "a"}},
              "classifier": {"name": "resnet20"}, "suite": {"name": "linf", "budget": "cpu"},
              "threat": {"norm": "linf", "eps": 8 / 255}, "subset": {"n": 512, "seed": 0}}
    rerun = json.loads(json.dumps(record))
    rerun["defense"]["config"]["checkpoint_sha256"] = "b"
    assert identity(rerun) == identity(record)
    rerun["defense"]["config"]["transform"] = "rt3"
    assert identity(rerun) != identity(record)


def test_a_rerun_at_another_batch_size_is_the_run_bench_run_makes_at_that_size(tmp_path):
    """scripts/rerun_records.py --batch-size: the rerun is the record's configuration at the new batch size (what
    ``bench run --batch-size`` writes), moved.json says both sizes, and a second call finds the rerun done."""
    rerun = load_script("rerun_records")
    config = dict(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=20, checks=True)
    old = bench.run(bench.RunConfig(**config, batch_size=8, out=tmp_path / "old"))
    at_four = bench.run(bench.RunConfig(**config, batch_size=4, out=tmp_path / "at-four"))
    args = ["--plugin", PLUGIN, "--batch-size", "4", "--out", str(tmp_path / "rerun"), str(old.path)]
    assert rerun.main(args) == 0
    (new,) = [p for p in (tmp_path / "rerun").glob("*.json") if p.name != "moved.json"]
    data = json.loads(new.read_text())
    assert data["settings"]["batch_size"] == 4 and data["run_id"] == at_four.run_id != old.run_id
    assert _without_timing(data) == _without_timing(at_four.data)
    (row,) = json.loads((tmp_path / "rerun" / "moved.json").read_text())
    assert row["batch_size"] == [8, 4] and row["new_run_id"] == at_four.run_id
    before = new.stat().st_mtime_ns
    assert rerun.main(args) == 0 and new.stat().st_mtime_ns == before  # done: not run again
    with pytest.raises(SystemExit) as refused:
        rerun.main([*args[:2], "--batch-size", "0", *args[4:]])
    assert refused.value.code == 2
