"""AToP: gradients through the whole pipeline, training steps lower the loss, `bench train` resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.core.errors import BenchError
from defenses.atop import AToP
from defenses.atop_training import AToPSettings, AToPTrainer
from tests.conftest import needs_resnet20
from tests.helpers import NearestColor, load_script

# Clean accuracy of the shipped RT2 purifiers before ResNet-20, 128 images, mean of 3 draws from seed 0 (measured).
MEASURED_RT2 = {"pretrain": 0.469, "finetune": 0.521}  # the width-64 files
PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))


@pytest.mark.parametrize("transform", ["rt1", "rt2", "rt3"])
@pytest.mark.parametrize("purifier", ["gan", "ae"])
def test_exact_gradients_reach_the_input(transform, purifier):
    defense = AToP(NearestColor(), transform=transform, purifier=purifier, untrained=True)
    assert defense.stochastic and defense.differentiable
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    defense(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("purifier", ["gan", "ae"])
def test_a_few_training_steps_lower_the_loss(purifier):
    torch.manual_seed(0)
    # The adversarial term makes 30-step curves noisy; the L1 path is what must learn here.
    trainer = AToPTrainer(AToPSettings(purifier=purifier, gan_weight=0.0), NearestColor(), torch.device("cpu"))
    x = torch.rand(8, 3, 1, 1).expand(8, 3, 32, 32).contiguous()  # flat colours: learnable in a few steps
    first = sum(trainer.pretrain_step(x)["l1"] for _ in range(3)) / 3
    last = [trainer.pretrain_step(x)["l1"] for _ in range(30)]
    assert sum(last[-3:]) / 3 < 0.7 * first
    y = NearestColor()(x).argmax(1)
    logs = trainer.finetune_step(x, y)
    assert {"ce", "rec", "l1", "loss"} <= set(logs)


def test_bench_train_writes_manifest_resumes_and_loads(tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
            "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "1", "--epochs", "1", "--train-size", "16",
            "--batch-size", "8", "--out", str(out)]
    assert main(args) == 0
    manifest = json.loads((out / "finetune.manifest.json").read_text())
    assert manifest["finished"] and len(manifest["history"]) == 1 and len(manifest["sha256"]) == 64
    assert manifest["config"]["settings"]["rec_target"] == "adv" and manifest["config"]["settings"]["lam"] == 0.1
    before = (out / "finetune.pt").stat().st_mtime_ns
    assert main(args) == 0  # finished: resuming trains nothing more
    assert (out / "finetune.pt").stat().st_mtime_ns == before
    # the learning curve beside each stage: losses and the held-out clean / PGD-10 accuracy (24 images not trained on)
    rows = (out / "finetune.curve.csv").read_text().splitlines()
    assert rows[0].split(",")[:1] == ["epoch"] and {"ce", "heldout_clean", "heldout_pgd10", "hours"} <= set(rows[0].split(","))
    assert len(rows) == 2 and (out / "finetune.curve.png").read_bytes().startswith(b"\x89PNG")
    assert 0 <= manifest["history"][0]["heldout_pgd10"] <= manifest["history"][0]["heldout_clean"] <= 1
    code = main(["--plugin", PLUGIN, "run", "--defense", "atop-rt2-ae-ft", "--classifier", "tiny", "--dataset", "tiny-test",
                 "--budget", "smoke", "--n", "8", "--defense-option", f"checkpoint={out / 'finetune.pt'}",
                 "--out", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr().err
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["defense"]["stochastic"] and record["defense"]["config"]["transform"] == "rt2"
    assert [a["label"] for a in record["attacks"]] == ["fgsm+eot2", "pgd-10+eot2"]
    assert all(a["eot_chunk_images"] == 128 for a in record["attacks"])  # resolved from the CPU device up front
    assert record["settings"]["success_draws"] == 10


def test_each_epochs_manifest_names_the_checkpoint_it_wrote(tmp_path):
    """A training run rewrites its checkpoint at the same path every epoch: the manifest's sha256 must be the bytes
    on disk after each save, not a hash remembered from an earlier epoch."""
    import hashlib

    from bench.training import Checkpointer, TrainOptions

    checkpointer = Checkpointer(tmp_path, "pretrain", TrainOptions(defense="atop"), {"settings": {}})
    for epoch in (1, 2):
        checkpointer.save({"weights": torch.full((4,), float(epoch))}, {"epoch": epoch}, finished=epoch == 2)
        manifest = json.loads((tmp_path / "pretrain.manifest.json").read_text())
        assert manifest["sha256"] == hashlib.sha256((tmp_path / "pretrain.pt").read_bytes()).hexdigest()
        assert len(manifest["history"]) == epoch


def test_missing_checkpoint_says_how_to_train(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    code = main(["--plugin", PLUGIN, "run", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
                 "--n", "8", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "bench train --defense atop" in err


def test_skipping_the_purifier_in_the_gradient_keeps_the_forward_and_passes_x_t():
    """BPDA identity through the purifier: same logits, gradient = mask * dL/d(purified image)."""
    defense = AToP(NearestColor(), transform="rt2", purifier="gan", untrained=True).eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    torch.manual_seed(5)
    skipped = defense.bpda_forward(x, stages=("purifier",))
    torch.manual_seed(5)
    transformed = defense.transform(x)
    purified = defense.purifier(transformed).detach().requires_grad_(True)
    exact = defense.classifier(purified)
    assert torch.allclose(skipped, exact)
    (grad_skipped,) = torch.autograd.grad(skipped.sum(), x)
    (grad_image,) = torch.autograd.grad(exact.sum(), purified)
    assert torch.allclose(grad_skipped, transformed[:, 3:] * grad_image, atol=1e-6)
    (grad_exact,) = torch.autograd.grad(defense(x).sum(), x)
    assert not torch.allclose(grad_exact, grad_skipped)  # the purifier's own Jacobian is not the identity


def test_rt3_surrogate_is_the_noisy_image():
    from defenses.transforms import RT3, MaskedEnsemble

    x = torch.rand(2, 3, 32, 32)
    stacked = RT3(sigma=0.0)(x)
    assert torch.allclose(MaskedEnsemble(torch.nn.Identity(), 4).surrogate(stacked), x, atol=1e-6)


def test_a_stage_without_surrogate_cannot_be_skipped():
    from bench.errors import BenchError
    from defenses.base import Defense

    defense = Defense(NearestColor(), purifier=torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(BenchError, match="declares no surrogate"):
        defense.bpda_forward(torch.rand(1, 3, 8, 8), stages=("purifier",))


def test_a_few_finetuning_steps_lower_the_classification_loss():
    torch.manual_seed(0)
    trainer = AToPTrainer(AToPSettings(purifier="ae", finetune_lr=1e-3), NearestColor(), torch.device("cpu"))
    trainer.set_lr("finetune", 0.0)
    x = torch.rand(16, 3, 1, 1).expand(16, 3, 32, 32).contiguous()
    y = torch.arange(16) % 10
    first = sum(trainer.finetune_step(x, y)["ce"] for _ in range(3)) / 3
    last = [trainer.finetune_step(x, y)["ce"] for _ in range(40)]
    assert sum(last[-3:]) / 3 < 0.8 * first


SHIPPED = sorted(p for p in (Path(__file__).resolve().parent.parent / "defenses" / "checkpoints").glob("atop/*/*/*.pt"))


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_shipped_checkpoints_are_small_match_their_manifest_and_load(path):
    from bench.training import sha256_file
    from defenses.purifiers import purifier_from_state

    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    assert path.stat().st_size <= 8 * 2**20  # a width-64 GAN generator in fp16 is 6.6 MiB
    assert sha256_file(path) == manifest["shipped_sha256"]
    transform, purifier = path.parent.name.split("-")
    assert manifest["config"]["settings"]["purifier"] == purifier
    if path.stem != "pretrain":  # the file name says against what its FGSM examples were crafted
        assert manifest["config"]["settings"]["adv_target"] == ("pipeline" if path.stem == "finetune-pipeline" else "classifier")
    state = torch.load(path, map_location="cpu", weights_only=True)["generator"]
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    assert dtypes == {torch.float16 if manifest.get("storage_dtype") == "float16" else torch.float32}
    if dtypes == {torch.float16}:  # half precision ships only with its measurement beside it
        assert min(manifest["fp16_check"]["prediction_agreement"]) >= 0.99
    purifier_from_state(purifier, state).load_state_dict(state, strict=True)


@pytest.mark.parametrize("stem, adv_target", [("finetune", "pipeline"), ("finetune-pipeline", "classifier")])
def test_shipping_refuses_a_fine_tuned_file_named_for_the_other_fgsm_target(tmp_path, stem, adv_target):
    # `finetune-pipeline.pt` is what `atop-rt2-ae-ft-pipeline` loads: only a purifier whose FGSM examples were
    # crafted against the whole pipeline may ship under that name, and only the default one as `finetune.pt`.
    from defenses.atop import PIPELINE_STAGE, STAGES

    ship_module = load_script("ship_atop_checkpoints")
    source = tmp_path / "root" / "atop" / "resnet20" / "rt2-ae" / f"{stem}.pt"
    source.parent.mkdir(parents=True)
    torch.save({"generator": {"w": torch.zeros(2)}}, source)
    settings = {"purifier": "ae", "adv_target": adv_target}
    source.with_suffix(".manifest.json").write_text(json.dumps({"config": {"settings": settings}, "finished": True}))
    target = tmp_path / "shipped" / f"{stem}.pt"
    with pytest.raises(SystemExit, match=f"adv_target={'classifier' if adv_target == 'pipeline' else 'pipeline'}"):
        ship_module.ship(source, target, 2**20)
    assert not target.exists()
    settings["adv_target"] = "pipeline" if stem == PIPELINE_STAGE else "classifier"
    source.with_suffix(".manifest.json").write_text(json.dumps({"config": {"settings": settings}, "finished": True}))
    ship_module.ship(source, target, 2**20)
    assert json.loads(target.with_suffix(".manifest.json").read_text())["shipped_sha256"]
    assert stem in (*STAGES.values(), PIPELINE_STAGE)


@pytest.mark.parametrize("stem, adv_target", [("finetune", "classifier"), ("finetune-pipeline", "pipeline")])
def test_a_run_with_epochs_left_ships_only_when_asked_and_its_manifest_says_which_epoch(tmp_path, capsys, monkeypatch,
                                                                                         stem, adv_target):
    ship_module = load_script("ship_atop_checkpoints")
    monkeypatch.setattr(ship_module, "BUNDLED_DIR", tmp_path / "bundled")  # never the repository's folder
    source = tmp_path / "root" / "atop" / "resnet20" / "rt3-gan" / f"{stem}.pt"
    source.parent.mkdir(parents=True)
    torch.save({"generator": {"w": torch.zeros(2)}}, source)
    settings = {"purifier": "gan", "adv_target": adv_target, "finetune_epochs": 4}  # both stems plan finetune_epochs
    manifest = {"config": {"settings": settings}, "finished": False, "history": [{"epoch": 1}, {"epoch": 2}]}
    source.with_suffix(".manifest.json").write_text(json.dumps(manifest))
    assert ship_module.main([str(tmp_path / "root")]) == 0  # skipped without --unfinished: nothing written
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "bundled").exists()
    target = tmp_path / "shipped" / f"{stem}.pt"
    ship_module.ship(source, target, 2**20)
    shipped = json.loads(target.with_suffix(".manifest.json").read_text())
    assert shipped["shipped_unfinished"] == "after epoch 2 of 4" and not shipped["finished"]
    manifest["finished"], manifest["history"] = True, [{"epoch": k} for k in range(1, 5)]
    source.with_suffix(".manifest.json").write_text(json.dumps(manifest))
    ship_module.ship(source, target, 2**20)
    assert "shipped_unfinished" not in json.loads(target.with_suffix(".manifest.json").read_text())


def test_a_shipped_manifest_names_no_path_of_the_machine_that_trained_it(tmp_path):
    # a run trained outside the checkout: its --out and --pretrained become ckpt/atop/<classifier>/<run>[/<file>],
    # a file inside the checkout becomes relative to it, and the run's own manifest is left as it was
    ship_module = load_script("ship_atop_checkpoints")
    run, other = tmp_path / "runs" / "rt3-gan-w64-ft", tmp_path / "runs" / "rt1-gan-w64" / "pretrain.pt"
    inside = ship_module.REPO / "defenses" / "checkpoints" / "atop" / "resnet20" / "rt2-gan" / "pretrain.pt"
    source = run / "finetune.pt"
    source.parent.mkdir(parents=True)
    torch.save({"generator": {"w": torch.zeros(2)}}, source)
    manifest = {"command": f"bench train --pretrained {other} --out {run}", "options": {"out": str(run)},
                "config": {"classifier": "resnet20", "settings": {"purifier": "gan", "adv_target": "classifier",
                                                                  "pretrained": str(inside)}},
                "finished": True}
    source.with_suffix(".manifest.json").write_text(json.dumps(manifest))
    target = tmp_path / "shipped" / "finetune.pt"
    ship_module.ship(source, target, 2**20)
    shipped = json.loads(target.with_suffix(".manifest.json").read_text())
    assert shipped["command"] == ("bench train --pretrained ckpt/atop/resnet20/rt1-gan-w64/pretrain.pt"
                                  " --out ckpt/atop/resnet20/rt3-gan-w64-ft")
    assert shipped["options"]["out"] == "ckpt/atop/resnet20/rt3-gan-w64-ft"
    assert shipped["config"]["settings"]["pretrained"] == "defenses/checkpoints/atop/resnet20/rt2-gan/pretrain.pt"
    assert str(tmp_path) not in json.dumps(shipped)
    assert json.loads(source.with_suffix(".manifest.json").read_text()) == manifest


def test_shipping_in_fp16_halves_the_file_and_the_defense_reads_the_same(tmp_path):
    from bench.classifiers.base import ClassifierInfo
    from defenses.purifiers import PURIFIERS

    ship_module = load_script("ship_atop_checkpoints")
    torch.manual_seed(0)
    source = tmp_path / "root" / "pretrain.pt"
    source.parent.mkdir(parents=True)
    torch.save({"generator": PURIFIERS["gan"](width=8).state_dict()}, source)
    source.with_suffix(".manifest.json").write_text(json.dumps({"config": {"settings": {"purifier": "gan"}}, "finished": True}))
    full, half = tmp_path / "fp32" / "pretrain.pt", tmp_path / "fp16" / "pretrain.pt"
    ship_module.ship(source, full, 2**22)
    ship_module.ship(source, half, 2**22, fp16=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert json.loads(half.with_suffix(".manifest.json").read_text())["storage_dtype"] == "float16"
    assert json.loads(full.with_suffix(".manifest.json").read_text())["storage_dtype"] == "float32"
    classifier = NearestColor()
    classifier.info = ClassifierInfo("tiny", "tiny", "cifar10", 10, None, None, "standard", None, "-", "-")
    x = torch.rand(4, 3, 32, 32)
    outputs = []
    for path in (full, half):
        defense = AToP(classifier, transform="rt1", purifier="gan", stage="pretrain", checkpoint=str(path)).eval()
        assert all(p.dtype == torch.float32 for p in defense.purifier.parameters())  # loaded into float32 modules
        torch.manual_seed(1)
        with torch.no_grad():
            outputs.append(defense.purifier(defense.transform(x)))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-2
    # with check data, the fp16 file is measured against the float32 one into the manifest (the same draws)
    source = tmp_path / "root" / "rt1-gan" / "pretrain.pt"
    source.parent.mkdir(parents=True)
    torch.save({"generator": PURIFIERS["gan"](width=8).state_dict()}, source)
    source.with_suffix(".manifest.json").write_text(json.dumps({"config": {"settings": {"purifier": "gan"}}, "finished": True}))
    y = torch.randint(0, 10, (16,))
    ship_module.ship(source, tmp_path / "checked" / "pretrain.pt", 2**22, fp16=True,
                     check_data=(classifier, torch.rand(16, 3, 32, 32), y))
    check = json.loads((tmp_path / "checked" / "pretrain.manifest.json").read_text())["fp16_check"]
    assert check["images"] == 16 and check["draws"] == 3 and len(check["prediction_agreement"]) == 3
    assert all(0.9 <= a <= 1 for a in check["prediction_agreement"])
    assert all(abs(h - f) <= 1 / 16 + 1e-9 for h, f in zip(check["clean_fp16"], check["clean_fp32"]))
    # and the check sees a bad copy: the same fp16 file with noise added to every weight disagrees with its source
    bad = tmp_path / "bad" / "pretrain.pt"
    bad.parent.mkdir()
    state = torch.load(tmp_path / "checked" / "pretrain.pt")
    torch.manual_seed(2)
    state["generator"] = {k: v + 0.3 * torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
                          for k, v in state["generator"].items()}
    torch.save(state, bad)
    bad.with_suffix(".manifest.json").write_text((tmp_path / "checked" / "pretrain.manifest.json").read_text())
    planted = ship_module.fp16_check(source, bad, classifier, torch.rand(16, 3, 32, 32), y)
    assert max(planted["prediction_agreement"]) < 0.5, planted


def test_the_pipeline_fine_tuned_variant_loads_its_own_shipped_file(monkeypatch, tmp_path):
    from bench.classifiers.base import ClassifierInfo
    from defenses.base import DEFENSES

    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    classifier = NearestColor()
    classifier.info = ClassifierInfo("resnet20", "resnet20", "cifar10", 10, None, None, "standard", None, "-", "-")
    config = DEFENSES.get("atop-rt2-ae-ft-pipeline")(classifier).config()
    assert (config["transform"], config["purifier"], config["stage"]) == ("rt2", "ae", "finetune-pipeline")
    assert config["checkpoint"] == "defenses/checkpoints/atop/resnet20/rt2-ae/finetune-pipeline.pt"
    assert config["checkpoint_sha256"] != DEFENSES.get("atop-rt2-ae-ft")(classifier).config()["checkpoint_sha256"]


def test_the_default_atop_ships_with_the_package(monkeypatch, tmp_path):
    """`bench run --defense atop` works offline on a fresh clone: RT2 + GAN, fine-tuned, for resnet20."""
    from bench.classifiers.base import ClassifierInfo

    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))  # nothing trained here: the shipped file is used
    classifier = NearestColor()
    classifier.info = ClassifierInfo("resnet20", "resnet20", "cifar10", 10, None, None, "standard", None, "-", "-")
    defense = AToP(classifier)
    config = defense.config()
    assert config["checkpoint_source"] == "shipped" and config["stage"] == "finetune"
    assert config["checkpoint"] == "defenses/checkpoints/atop/resnet20/rt2-gan/finetune.pt"
    assert len(config["checkpoint_sha256"]) == 64


@needs_resnet20
def test_shipped_rt2_purifiers_keep_their_measured_clean_accuracy(monkeypatch, tmp_path):
    """Regression check on real data: clean accuracy of the shipped RT2 purifiers in front of ResNet-20
    (128 images of the fixed subset, mean of 3 draws), and AToP fine-tuning raising it."""
    from bench.classifiers import load_classifier
    from bench.subset import load_subset

    monkeypatch.setenv("BENCH_CHECKPOINT_DIR", str(tmp_path))
    classifier, subset = load_classifier("resnet20"), load_subset("cifar10-jpeg", 128, seed=0)
    accuracy = {}
    for stage in ("pretrain", "finetune"):
        defense = AToP(classifier, transform="rt2", purifier="gan", stage=stage).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            draws = [(defense(subset.x).argmax(1) == subset.y).float().mean().item() for _ in range(3)]
        accuracy[stage] = sum(draws) / 3
    print(f"shipped RT2 purifiers, clean accuracy on 128 images: {accuracy}")
    assert abs(accuracy["pretrain"] - MEASURED_RT2["pretrain"]) < 0.08
    assert abs(accuracy["finetune"] - MEASURED_RT2["finetune"]) < 0.08
    assert accuracy["finetune"] > accuracy["pretrain"]


def test_rt3_can_fine_tune_another_run_s_pre_trained_purifier(tmp_path):
    common = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
              "--purifier", "ae", "--train-size", "16", "--batch-size", "8"]
    assert main([*common, "--transform", "rt2", "--pretrain-epochs", "1", "--epochs", "1", "--out", str(tmp_path / "rt2")]) == 0
    source = tmp_path / "rt2" / "pretrain.pt"
    assert main([*common, "--transform", "rt3", "--epochs", "1", "--pretrained", str(source), "--out", str(tmp_path / "rt3")]) == 0
    adopted = json.loads((tmp_path / "rt3" / "pretrain.manifest.json").read_text())
    assert adopted["copied_from"] == str(source) and adopted["finished"] and len(adopted["source_sha256"]) == 64
    finetune = json.loads((tmp_path / "rt3" / "finetune.manifest.json").read_text())
    assert finetune["finished"] and finetune["config"]["settings"]["pretrained"] == str(source)
    assert (tmp_path / "rt3" / "finetune.weights.pt").is_file()
    assert main([*common, "--transform", "rt3", "--epochs", "1", "--pretrained", str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "rt3b")]) == 2


def test_the_same_seed_trains_the_same_purifier(tmp_path):
    common = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
              "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "1", "--epochs", "1", "--train-size", "16",
              "--batch-size", "8"]
    for name in ("a", "b"):
        assert main([*common, "--out", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / name / "finetune.weights.pt", weights_only=True)["generator"] for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_inside_an_epoch_resumes_from_its_partial_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    """--checkpoint-minutes 0 saves after every step; a run stopped in the middle of its second fine-tuning epoch
    continues from the step it reached and ends with the weights and losses of a run never stopped."""
    common = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
              "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "1", "--epochs", "2", "--train-size", "32",
              "--batch-size", "8", "--eval-every", "1", "--eval-size", "8"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0

    class Killed(Exception):
        pass

    original, calls, stopping = AToPTrainer.finetune_step, [], True

    def dies_at_the_seventh_step(self, x, y):  # 4 steps per epoch: the 3rd step of epoch 2
        calls.append(1)
        if len(calls) == 7 and stopping:
            raise Killed
        return original(self, x, y)

    monkeypatch.setattr(AToPTrainer, "finetune_step", dies_at_the_seventh_step)
    stopped = [*common, "--checkpoint-minutes", "0", "--out", str(tmp_path / "stopped")]
    with pytest.raises(Killed):
        main(stopped)
    partial = torch.load(tmp_path / "stopped" / "finetune.partial.pt", weights_only=True)
    assert (partial["epoch"], partial["step"]) == (1, 2)
    stopping = False
    calls.clear()
    assert main(stopped) == 0
    assert len(calls) == 2  # only the epoch's last two steps ran again, not the whole epoch
    assert not (tmp_path / "stopped" / "finetune.partial.pt").exists()  # removed when its epoch ended
    a, b = (torch.load(tmp_path / name / "finetune.weights.pt", weights_only=True)["generator"] for name in ("whole", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = (json.loads((tmp_path / name / "finetune.manifest.json").read_text())["history"]
                      for name in ("whole", "stopped"))
    drop = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert drop(whole) == drop(resumed) and len(resumed) == 2  # the same losses and held-out readings, per epoch


def test_a_time_budget_stops_training_and_a_larger_one_continues_the_same_curve(tmp_path):
    out = tmp_path / "ckpt"
    base = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
            "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "3", "--epochs", "1", "--train-size", "16",
            "--batch-size", "8", "--eval-every", "2", "--out", str(out)]
    assert main([*base, "--hours", "0"]) == 0  # no time: nothing trained
    assert not (out / "pretrain.manifest.json").exists()
    assert main([*base, "--hours", "0.0000001"]) == 0  # one epoch uses the budget up
    history = json.loads((out / "pretrain.manifest.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1] and "heldout_clean" not in history[0]
    assert main(base) == 0  # no budget: the run continues where it stopped, on the same curve
    manifest = json.loads((out / "pretrain.manifest.json").read_text())
    assert manifest["finished"] and [row["epoch"] for row in manifest["history"]] == [1, 2, 3]
    assert ["heldout_clean" in row for row in manifest["history"]] == [False, True, True]  # every 2nd epoch and the last
    assert len((out / "pretrain.curve.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize("purifier", ["gan", "ae"])
def test_a_purifier_of_any_width_trains_and_loads(purifier, tmp_path):
    from defenses.purifiers import PURIFIERS, purifier_from_state

    narrow = PURIFIERS[purifier](width=8)
    rebuilt = purifier_from_state(purifier, narrow.state_dict())
    rebuilt.load_state_dict(narrow.state_dict(), strict=True)  # the width comes from the weights
    trainer = AToPTrainer(AToPSettings(purifier=purifier, width=8), NearestColor(), torch.device("cpu"))
    assert sum(p.numel() for p in trainer.generator.parameters()) == sum(p.numel() for p in narrow.parameters())
    path = tmp_path / "narrow.pt"
    torch.save({"generator": trainer.generator.state_dict()}, path)
    defense = AToP(NearestColor(), purifier=purifier, checkpoint=str(path))
    assert defense(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_training_logs_one_line_per_epoch(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
                 "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "2", "--epochs", "1", "--train-size",
                 "16", "--batch-size", "8", "--out", str(tmp_path)]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("bench.train.")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2", "epoch 1/1"]
    assert all("loss" in line and "seconds" in line for line in lines)


def test_bf16_autocast_training_says_so_in_every_epoch_and_stays_close_to_float32(tmp_path):
    common = ["--plugin", PLUGIN, "train", "--defense", "atop", "--classifier", "tiny", "--dataset", "tiny-test",
              "--transform", "rt2", "--purifier", "ae", "--pretrain-epochs", "1", "--epochs", "1", "--train-size", "16",
              "--batch-size", "8", "--eval-every", "0"]
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*common, "--autocast", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    for stage in ("pretrain", "finetune"):
        fp32, bf16 = (json.loads((tmp_path / mode / f"{stage}.manifest.json").read_text()) for mode in ("fp32", "bf16"))
        assert all(row["autocast"] == "bf16" for row in bf16["history"])
        assert all("autocast" not in row for row in fp32["history"])
        assert bf16["options"]["autocast"] == "bf16"
        assert "autocast" in (tmp_path / "bf16" / f"{stage}.curve.csv").read_text().splitlines()[0]
    a, b = (torch.load(tmp_path / mode / "finetune.weights.pt", weights_only=True)["generator"] for mode in ("fp32", "bf16"))
    assert all(b[k].dtype == a[k].dtype for k in a)  # the weights stay float32
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 did run
    difference = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert difference < 0.05


def test_training_refuses_an_autocast_it_does_not_offer():
    from bench.training import TrainOptions, train_epochs

    with pytest.raises(BenchError, match="--autocast must be bf16"):
        train_epochs(TrainOptions(defense="atop", autocast="fp16"), None, Path("unused"), "x", {}, 1, None, None)


def test_each_variant_prints_its_own_paper_row():
    """`bench run` prints "where this stands" from the defense's paper_reference: a variant must quote its own
    transform's row of Table 7 (the numbers of leaderboards/papers/atop.json), not the default's Table 2 headline."""
    from defenses.base import DEFENSES

    paper = json.loads((Path(__file__).resolve().parents[1] / "leaderboards" / "papers" / "atop.json").read_text())
    table7 = next(t for t in paper["tables"] if str(t["table"]) == "7")
    clean, pgd20 = table7["columns"].index("clean"), table7["columns"].index("PGD-20")
    for row in table7["rows"]:
        name = f"atop-{row['transform']}-gan-{'ft' if row['atop'] else 'pre'}"
        reference = DEFENSES.get(name).paper_reference
        assert f"Table 7, {row['transform'].upper()} {'with' if row['atop'] else 'without'} AToP" in reference
        assert f"{row['values'][clean]:.2f}% clean, {row['values'][pgd20]:.2f}% under PGD-20" in reference
    assert "Table 5" in DEFENSES.get("atop-rt2-ae-ft").paper_reference
    assert DEFENSES.get("atop-rt3-ae-ft").paper_reference.startswith("no paper row")
    assert "Table 2" in DEFENSES.get("atop").paper_reference  # the default keeps the paper's headline


def test_a_run_at_l2_quotes_the_papers_l2_table():
    """A Table 8 (l2 1.0) run of a variant prints that table's row (leaderboards/papers/atop.json), not Table 7's linf
    one; the default quotes Table 6's l2 and StAdv cells; a run at linf keeps Table 7, and the AE has no l2 row."""
    from bench.reports.summary import paper_reference

    paper = json.loads((Path(__file__).resolve().parents[1] / "leaderboards" / "papers" / "atop.json").read_text())
    table8 = next(t for t in paper["tables"] if str(t["table"]) == "8")
    for row in table8["rows"]:
        name = f"atop-{row['transform']}-gan-{'ft' if row['atop'] else 'pre'}"
        clean, pgd10, pgd20 = row["values"]
        reference = paper_reference(name, "l2")
        assert f"Table 8, {row['transform'].upper()} {'with' if row['atop'] else 'without'} AToP" in reference
        assert f"{clean:.2f}% clean, {pgd10:.2f}% / {pgd20:.2f}% under PGD-10 / PGD-20" in reference
        assert "Table 7" in paper_reference(name, "linf") and "Table 7" in paper_reference(name)
    assert "Table 6" in paper_reference("atop", "l2") and "73.4%" in paper_reference("atop", "l2")
    assert "56.4%" in paper_reference("atop", "stadv") and "Table 2" in paper_reference("atop", "linf")
    assert paper_reference("atop-rt2-ae-ft", "l2") == paper_reference("atop-rt2-ae-ft")  # Table 5 is its only row


def test_the_laplace_fill_baseline_keeps_known_pixels_and_fills_holes_from_their_neighbours():
    # scripts/atop_fill_baseline.py: the no-learning floor docs/atop.md sets beside the RT1 purifiers.
    from defenses.transforms import RT1

    fill = load_script("atop_fill_baseline")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    state = torch.get_rng_state()
    masked = RT1()(x)
    known, mask = masked[:, :3], masked[:, 3:4]
    assert 0.7 < mask.mean() < 0.8  # a quarter of the 4x4 patches removed
    filled = fill.laplace_fill(known, mask, iters=200)
    assert torch.equal(filled * mask, x * mask)  # the kept pixels pass unchanged
    assert filled.min() >= 0 and filled.max() <= 1
    flat = torch.full_like(x, 0.4)  # a flat image: every hole is filled with its value
    assert torch.allclose(fill.laplace_fill(flat * mask, mask, iters=200), flat, atol=1e-3)
    # the pipeline the script reads through clean_draws: RT1's mask, the fill, then the classifier
    pipeline = fill.FilledRT1(lambda known, mask: fill.laplace_fill(known, mask, iters=200), torch.nn.Identity())
    torch.set_rng_state(state)
    assert torch.equal(pipeline(x), filled)
