"""bench train --defense adversarial-training: PGD adversarial training of a CIFAR ResNet from scratch, its learning
curve, and the resnet20-at8 classifier that loads what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.classifiers.adversarial_training import ATSettings, ATTrainer
from bench.cli import main
from bench.errors import BenchError

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))


def test_a_few_adversarial_steps_lower_the_adversarial_loss():
    torch.manual_seed(0)
    trainer = ATTrainer(ATSettings(eps=2 / 255, attack_steps=2, lr=0.05, warmup=0.0), "resnet20", torch.device("cpu"))
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    trainer.set_progress(0.0)
    first = sum(trainer.step(x, y)["loss"] for _ in range(2)) / 2
    last = [trainer.step(x, y)["loss"] for _ in range(25)]
    assert sum(last[-3:]) / 3 < first
    x_adv = trainer.attack(x, y)
    assert (x_adv - x).abs().max() <= 2 / 255 + 1e-6 and not torch.equal(x_adv, x)


def test_the_schedule_warms_up_decays_and_ramps_eps():
    trainer = ATTrainer(ATSettings(lr=0.1, warmup=0.1, eps_ramp=0.5), "resnet20", torch.device("cpu"))
    assert trainer.set_progress(0.05) == pytest.approx(0.05) and trainer.eps == pytest.approx(0.1 * 8 / 255)
    assert trainer.set_progress(0.1) == pytest.approx(0.1) and trainer.set_progress(1.0) == pytest.approx(0.0)
    assert trainer.eps == pytest.approx(8 / 255)
    with pytest.raises(BenchError, match="trains resnet20"):
        ATTrainer(ATSettings(), "resnet4b", torch.device("cpu"))


def test_bench_train_writes_the_classifier_that_resnet20_at8_loads(tmp_path, monkeypatch):
    from bench.classifiers import load_classifier

    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    args = ["--plugin", PLUGIN, "train", "--defense", "adversarial-training", "--classifier", "resnet20", "--dataset",
            "tiny-test", "--epochs", "2", "--train-size", "16", "--batch-size", "8", "--attack-steps", "1"]
    assert main(args) == 0
    folder = tmp_path / "classifiers" / "resnet20-at8"
    manifest = json.loads((folder / "classifier.manifest.json").read_text())
    assert manifest["finished"] and manifest["config"]["classifier"] == "resnet20-at8"
    assert {"loss", "adv_acc", "heldout_clean", "heldout_pgd10"} <= set(manifest["history"][-1])
    assert (folder / "classifier.curve.png").is_file()
    model = load_classifier("resnet20-at8")
    assert model.info.training == "pgd-linf" and model.info.train_eps == pytest.approx(8 / 255)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_the_learning_curve_attacks_at_the_training_eps_unless_told_otherwise(tmp_path):
    # PGD-10 at 8/255 said little about a classifier or purifier trained at 2/255: the curve's radius follows the
    # trainer's eps (adversarial training, JATP), and --eval-eps overrides it; the plot's title names it.
    common = ["--plugin", PLUGIN, "train", "--defense", "adversarial-training", "--classifier", "resnet20", "--dataset",
              "tiny-test", "--epochs", "1", "--train-size", "16", "--batch-size", "8", "--attack-steps", "1",
              "--eps", "2/255", "--eval-size", "8"]
    assert main([*common, "--out", str(tmp_path / "own")]) == 0
    assert main([*common, "--eval-eps", "4/255", "--out", str(tmp_path / "told")]) == 0
    own, told = (json.loads((tmp_path / name / "classifier.manifest.json").read_text())["history"][-1]
                 for name in ("own", "told"))
    assert own["heldout_eps"] == pytest.approx(2 / 255) and told["heldout_eps"] == pytest.approx(4 / 255)
    assert "heldout_eps" in (tmp_path / "own" / "classifier.curve.csv").read_text().splitlines()[0]


def test_the_curve_title_names_the_radius_and_older_manifests_read_as_8_255(tmp_path):
    from unittest import mock

    from bench.training import write_curve

    titles = []
    real = __import__("matplotlib.axes", fromlist=["Axes"]).Axes.set_title
    with mock.patch("matplotlib.axes.Axes.set_title", autospec=True,
                    side_effect=lambda ax, text, **kw: (titles.append(text), real(ax, text, **kw))[1]):
        write_curve(tmp_path, "new", [{"epoch": 1, "loss": 1.0, "heldout_clean": 0.5, "heldout_pgd10": 0.3,
                                       "heldout_eps": 2 / 255}])
        write_curve(tmp_path, "old", [{"epoch": 1, "loss": 1.0, "heldout_clean": 0.5, "heldout_pgd10": 0.3}])
    assert "PGD-10 at linf 2/255" in titles[1] and "PGD-10 at linf 8/255" in titles[3]


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "bench" / "classifiers" / "checkpoints").glob("*/classifier.weights.pt"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_classifiers_match_their_manifest_and_load_with_it(path, monkeypatch, tmp_path):
    # The shipped copy is what `resnet20-at8` loads when no trained copy is under $BENCH_CHECKPOINT_DIR; its
    # manifest names its sha256 and says which run made it (finished, at the eps the name says).
    from bench.classifiers import load_classifier
    from bench.training import sha256_file

    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    manifest = json.loads(path.with_name("classifier.manifest.json").read_text())
    assert sha256_file(path) == manifest["shipped_sha256"] and manifest["finished"]
    assert path.stat().st_size <= 20 * 2**20
    name = path.parent.name
    assert manifest["config"]["classifier"] == name
    model = load_classifier(name)
    assert model.info.weights.endswith(f"checkpoints/{name}/classifier.weights.pt")
    assert round(model.info.train_eps * 255) == round(manifest["config"]["settings"]["eps"] * 255)
