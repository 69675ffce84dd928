"""The CLI: bad input gets one clear line and exit code 2 with nothing written; plug-ins and listing work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.cli import main
from tests.conftest import needs_resnet20

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))
TINY = ["--plugin", PLUGIN, "--dataset", "tiny-test", "--classifier", "tiny", "--n", "16"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(args, capsys, tmp_path, *fragments):
    code, out, err = run_cli([*args, "--out", str(tmp_path / "out")] if args[0] == "run" else args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    return lines[0]


def test_plugin_defense_runs_end_to_end(capsys, tmp_path):
    code, out, err = run_cli(["run", "--defense", "plugin-blur", "--budget", "smoke", *TINY, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["defense"]["name"] == "plugin-blur" and record["subset"]["n"] == 16
    assert "record:" in out and "robust accuracy" in out


def test_unknown_defense(capsys, tmp_path):
    assert_user_error(["run", "--defense", "nonee", *TINY], capsys, tmp_path, "Unknown defense 'nonee'", "Did you mean: none")


def test_unknown_classifier_and_suite(capsys, tmp_path):
    assert_user_error(["run", "--defense", "none", *TINY, "--classifier", "resnet21"], capsys, tmp_path, "Did you mean")
    assert_user_error(["run", "--defense", "none", *TINY, "--suite", "linff"], capsys, tmp_path, "Did you mean: linf")


@pytest.mark.parametrize("threat,eps", [("linf", "2"), ("linf", "0"), ("l2", "-1")])
def test_eps_out_of_range(capsys, tmp_path, threat, eps):
    assert_user_error(["run", "--defense", "none", *TINY, "--threat", threat, "--eps", eps], capsys, tmp_path, "out of range")


def test_bad_sizes(capsys, tmp_path):
    assert_user_error(["run", "--defense", "none", *TINY[:-2], "--n", "0"], capsys, tmp_path, "--n must be")
    assert_user_error(["run", "--defense", "none", *TINY, "--batch-size", "0"], capsys, tmp_path, "--batch-size")


def test_missing_data_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "nowhere"))
    line = assert_user_error(["run", "--defense", "none", "--n", "8"], capsys, tmp_path, "BENCH_DATA_DIR")
    assert "nowhere" in line


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x04 this is not a checkpoint" * 10)
    assert_user_error(["run", "--defense", "none", *TINY, "--classifier", f"file:resnet20:{bad}"], capsys, tmp_path, "not a loadable")


class NotWeights:
    pass


def test_non_weights_checkpoint_is_refused(capsys, tmp_path):
    path = tmp_path / "pickled_object.pt"
    torch.save({"state_dict": NotWeights()}, path)
    assert_user_error(["run", "--defense", "none", *TINY, "--classifier", f"file:resnet20:{path}"], capsys, tmp_path, "weights-only")


def test_checkpoint_for_another_architecture(capsys, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    assert_user_error(["run", "--defense", "none", *TINY, "--classifier", f"file:resnet20:{path}"], capsys, tmp_path, "does not match")


@pytest.mark.parametrize("defense,fragment", [("plugin-nan", "NaN"), ("plugin-wrong-shape", "shape")])
def test_broken_defense_outputs_are_named(capsys, tmp_path, defense, fragment):
    assert_user_error(["run", "--defense", defense, *TINY], capsys, tmp_path, f"defense {defense}", fragment)


def test_missing_plugin_file(capsys, tmp_path):
    assert_user_error(["--plugin", str(tmp_path / "nope.py"), "list"], capsys, tmp_path, "not a Python file")


def test_robustbench_weights_missing_says_where(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert_user_error(["run", "--defense", "none", *TINY, "--classifier", "robustbench:Standard"], capsys, tmp_path,
                      "Standard.pt", str(tmp_path / "weights"))


def test_list_shows_every_registry(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for fragment in ("defenses:", "none", "attacks:", "apgd-t", "suites:", "linf v5 smoke", "stadv v2 cpu", "--eps 1", "classifiers:", "resnet4b", "datasets:", "cifar10-jpeg"):
        assert fragment in out


@needs_resnet20
def test_file_classifier_roundtrip(capsys, tmp_path):
    from bench.classifiers import load_classifier

    reference = load_classifier("resnet20")
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": reference.net.state_dict()}, path)
    mine = load_classifier(f"file:resnet20:{path}")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(mine(x), reference(x))


def test_audit_flags_a_planted_broken_defense_and_passes_an_honest_one(capsys):
    base = ["--plugin", str(Path(__file__).with_name("plugin_examples.py")), "audit", "--classifier", "tiny",
            "--dataset", "tiny-test", "--n", "16"]
    assert main([*base, "--defense", "planted-quantize"]) == 1
    out = capsys.readouterr().out
    assert "verdict: UNRELIABLE" in out and "zero input gradients (exact)" in out
    assert main([*base, "--defense", "plugin-blur"]) == 0
    assert "verdict: no integrity problem found" in capsys.readouterr().out


def test_run_records_the_checks_or_their_absence(tmp_path, capsys):
    base = ["--plugin", str(Path(__file__).with_name("plugin_examples.py")), "run", "--defense", "planted-quantize",
            "--classifier", "tiny", "--dataset", "tiny-test", "--n", "16", "--budget", "smoke"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    flagged = json.loads(next((tmp_path / "a").glob("*.json")).read_text())
    assert flagged["unreliable"] and flagged["checks"]["ran"] and "UNRELIABLE" in capsys.readouterr().out
    assert any("zero input gradients" in reason for reason in flagged["unreliable_reasons"])
    assert main([*base, "--no-checks", "--out", str(tmp_path / "b")]) == 0
    unchecked = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert unchecked["checks"] == {"ran": False} and not unchecked["unreliable"]


def test_option_values_arrive_parsed():
    from bench.cli import parse_options

    options = parse_options(["untrained=false", "eps-defend=8/255", "steps=3", "lam=0.5", "checkpoint=runs/a.pt",
                             "layers=layer1", "flag=True"])
    assert options == {"untrained": False, "eps_defend": 8 / 255, "steps": 3, "lam": 0.5, "checkpoint": "runs/a.pt",
                       "layers": "layer1", "flag": True}


@pytest.mark.parametrize("argv", [["--eps", "-3/255"], ["--eps=-3/255"]])
def test_a_negative_eps_gets_the_range_error_however_it_is_written(argv, capsys, tmp_path):
    assert_user_error(["run", "--defense", "plugin-blur", *TINY, *argv], capsys, tmp_path,
                      "eps -0.0117647 (-3/255) is out of range for linf")


def test_threat_spellings_and_the_suites_own_threat(capsys, tmp_path):
    def header(*args):
        code, out, err = run_cli(["run", "--defense", "plugin-blur", "--budget", "smoke", *TINY, *args, "--out", str(tmp_path)],
                                 capsys)
        assert code == 0, err
        return out.splitlines()[0]

    assert "| linf eps=8/255 | suite linf v5" in header("--threat", "Linf")  # RobustBench's spelling; eps in 255ths
    assert "| l2 eps=0.5 | suite l2 v5" in header("--threat", "L2")
    assert "| l2 eps=0.5 | suite l2 v5" in header("--suite", "l2")  # the threat follows the suite
    assert "| stadv eps=0.05 | suite stadv v2" in header("--suite", "stadv")
    assert_user_error(["run", "--defense", "plugin-blur", *TINY, "--threat", "l2", "--suite", "linf"], capsys, tmp_path,
                      "suite linf is for threat linf, not l2")


@needs_resnet20
def test_list_says_which_defenses_have_weights_and_explains_suites(capsys, monkeypatch, tmp_path):
    import defenses.diffpure

    # DiffPure's score model neither trained here nor shipped: a defense without weights, said before a run fails
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setattr(defenses.diffpure, "SHIPPED_DIR", tmp_path / "shipped")
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert lines["atop"].endswith("weights for resnet20")
    assert "no weights yet" in lines["diffpure"]
    assert lines["atop-rt3-ae-ft"].endswith("weights for resnet20")
    assert lines["atop-rt1-ae-ft"].endswith("weights for resnet20")
    assert lines["jatp"].endswith("weights for resnet4b")
    assert lines["none"].strip() == "none"
    assert "+bpda[stage] back-propagates through that stage as the identity" in out


def test_show_card_and_list_long_give_each_defense_its_paper(capsys):
    code, out, _ = run_cli(["show-card", "atop"], capsys)
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["paper"].strip().startswith("Adversarial Training on Purification (AToP)")
    assert fields["venue"].strip() == "ICLR 2024" and fields["link"].strip().startswith("https://arxiv.org/abs/")
    assert fields["weights here"].strip() and fields["differs from the paper"].strip()
    code, out, _ = run_cli(["show-card", "nrp+aid-purifier"], capsys)  # a stack names both papers
    assert code == 0 and "A Self-supervised Approach" in out and "AID-Purifier" in out
    code, out, _ = run_cli(["list", "defenses", "--long"], capsys)
    assert code == 0 and "PixelDefend: Leveraging Generative Models" in out


def test_trainer_settings_read_text_values_as_their_declared_types():
    from bench.training import build_settings
    from defenses.aid_training import AIDSettings
    from defenses.jatp_training import JATPSettings

    jatp = build_settings(JATPSettings, {"eps": "8/255", "attack_steps": "7", "oblivious": "true", "grad_clip": "none",
                                         "milestones": "0.3,0.9", "pixel_loss": "l2"}, "jatp")
    assert jatp.eps == pytest.approx(8 / 255) and jatp.attack_steps == 7 and jatp.oblivious is True
    assert jatp.grad_clip is None and jatp.milestones == (0.3, 0.9) and jatp.pixel_loss == "l2"
    assert build_settings(AIDSettings, {"layers": "layer1,layer3"}, "aid-purifier").layers == ("layer1", "layer3")
    assert build_settings(JATPSettings, {"beta": 2.0}, "jatp").beta == 2.0  # typed values (the flags') pass as they are


@pytest.mark.parametrize("option, fragments", [
    ("chanels=8", ["pixeldefend: unsupported training option chanels", "channels, layers"]),
    ("layers=many", ["pixeldefend: training option layers='many' is not a int"]),
    ("layers", ["--option takes KEY=VALUE"]),
])
def test_bench_train_option_refuses_unknown_settings_and_bad_values(option, fragments, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    assert_user_error(["--plugin", PLUGIN, "train", "--defense", "pixeldefend", "--dataset", "tiny-test",
                       "--train-size", "16", "--option", option], capsys, tmp_path, *fragments)
    assert not any(tmp_path.rglob("*.pt"))


def test_bench_train_option_refuses_a_setting_given_twice(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    assert_user_error(["--plugin", PLUGIN, "train", "--defense", "jatp", "--dataset", "tiny-test", "--classifier", "tiny",
                       "--eps", "2/255", "--option", "eps=4/255"], capsys, tmp_path, "--option eps repeats a setting")


def test_bench_train_option_reaches_the_trainer_and_its_manifest(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    out = tmp_path / "pixelcnn"
    code, _, err = run_cli(["--plugin", PLUGIN, "train", "--defense", "pixeldefend", "--dataset", "tiny-test",
                            "--classifier", "tiny", "--epochs", "1", "--train-size", "16", "--batch-size", "8",
                            "--eval-every", "0", "--out", str(out), "--option", "channels=8", "--option", "layers=2",
                            "--option", "test_images=8"], capsys)
    assert code == 0, err
    manifest = json.loads(next(out.glob("*.manifest.json")).read_text())
    settings = manifest["config"]["settings"]
    assert (settings["channels"], settings["layers"], settings["test_images"]) == (8, 2, 8)
    assert manifest["options"]["extra"]["channels"] == "8"  # what was typed, beside the setting it became
