"""End-to-end runs: records validate, state resumes after SIGKILL with the same numbers, real-data accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.record import validate_record
from bench.runner import RunConfig, run
from tests.conftest import REPO, needs_resnet20

PLUGIN = str(Path(__file__).with_name("plugin_examples.py"))


def test_record_of_a_plugin_run_is_complete(tmp_path):
    from bench.plugins import load_plugin

    load_plugin(PLUGIN)
    record, path = run(RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=20,
                                 batch_size=8, out=tmp_path))
    on_disk = json.loads(path.read_text())
    validate_record(on_disk)
    assert on_disk == record
    samples = record["samples"]
    assert len(samples["index"]) == 20 and sum(samples["robust"]) == record["robust"]["correct"]
    assert all(c or not r for c, r in zip(samples["clean_correct"], samples["robust"]))  # robust implies clean-correct
    assert [a["label"] for a in record["attacks"]] == ["fgsm", "pgd-10"]
    assert record["attacks"][0]["attacked"] == record["clean"]["correct"]
    assert record["attacks"][1]["attacked"] == record["clean"]["correct"] - record["attacks"][0]["broken"]
    assert not (tmp_path / ".state" / record["run_id"]).exists()  # state is removed once the record is written
    # a deterministic defense: one draw, so mean, majority and worst case agree, and the headline is the worst case
    assert record["schema_version"] == 4 and record["settings"]["success_draws"] == 1
    assert record["clean_worst"] == record["clean"]  # one draw: the no-attack floor is the clean accuracy
    assert record["robust_mean"] == record["robust"]["accuracy"] == record["robust_majority"]["accuracy"]
    assert record["headline"] == {"metric": "worst", "accuracy": record["robust"]["accuracy"]}
    assert set(record["defense"]["card"]) == {"missing"}  # this plug-in gives no card, and its record says so
    mean_run, _ = run(RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=20,
                                batch_size=8, out=tmp_path, headline="mean"))
    assert mean_run["headline"] == {"metric": "mean", "accuracy": mean_run["robust_mean"]}


def _bench(args):
    return subprocess.Popen([sys.executable, "-m", "bench", "-q", "--plugin", PLUGIN, "run", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, state: Path, pattern: str) -> int:
    """SIGKILL ``proc`` once a state file matching ``pattern`` exists; return how many state files were saved."""
    deadline = time.time() + 120
    while time.time() < deadline and not list(state.glob(pattern)) and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(state.glob("*/*.json")))


def _finish(args, out: Path) -> dict:
    proc = _bench([*args, "--out", str(out)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return json.loads(next(out.glob("*.json")).read_text())


def test_killed_run_resumes_from_its_saved_batches(tmp_path):
    """SIGKILL a run in its second attack, alter one saved batch of the first, resume: the alteration shows in the
    record (saved batches are reused), the second attack's batches whose positions no longer match are redone, and
    an untouched rerun equals an uninterrupted one."""
    args = ["--defense", "plugin-slow", "--classifier", "tiny", "--dataset", "tiny-test", "--budget", "smoke",
            "--n", "40", "--batch-size", "4"]
    for out in ("resumed", "altered"):
        saved = _kill_when(_bench([*args, "--out", str(tmp_path / out)]), tmp_path / out / ".state", "*/attack1-*.json")
        assert saved >= 1 and not list((tmp_path / out).glob("*.json"))
    full = _finish(args, tmp_path / "full")
    resumed = _finish(args, tmp_path / "resumed")
    assert resumed["run_id"] == full["run_id"]
    for key in ("clean", "robust", "samples"):
        assert resumed[key] == full[key]
    assert [x["cost"]["forward"] for x in resumed["attacks"]] == [x["cost"]["forward"] for x in full["attacks"]]
    # the first attack ran wholly in the killed process: its time comes from the state into the resumed record
    assert resumed["timing"]["attack_seconds"] == sum(x["cost"]["seconds"] for x in resumed["attacks"])
    assert resumed["attacks"][0]["cost"]["seconds"] > 0
    # the record says it ran in two processes and began when the killed one did, before the resumed one started
    assert (resumed["timing"]["parts"], full["timing"]["parts"]) == (2, 1)
    assert resumed["timing"]["first_started"] < resumed["timing"]["started"]
    assert full["timing"]["first_started"] == full["timing"]["started"]
    assert 0 < full["robust"]["correct"] < full["clean"]["correct"]  # some points break, some resist

    batch = next(p for p in sorted((tmp_path / "altered" / ".state").glob("*/attack0-*.json"))
                 if not all(json.loads(p.read_text())["fooled"]))
    data = json.loads(batch.read_text())
    survivors = [p for p, hit in zip(data["positions"], data["fooled"]) if not hit]
    batch.write_text(json.dumps({**data, "fooled": [True] * len(data["fooled"]), "correct": [0] * len(data["fooled"])}))
    altered = _finish(args, tmp_path / "altered")
    assert all(altered["samples"]["broken_by"][p] == "fgsm" for p in survivors)  # the saved batch was read
    assert [p for p, (a, b) in enumerate(zip(altered["samples"]["robust"], full["samples"]["robust"])) if a != b] == \
        [p for p in survivors if full["samples"]["robust"][p]]  # and nothing else moved: redone batches agree
    assert altered["attacks"][1]["attacked"] == full["attacks"][1]["attacked"] - len(survivors)


def test_a_run_killed_in_its_correction_stage_resumes(tmp_path):
    """Undeclared noise makes the runner attack again with EOT (the correction stage); a run killed there resumes to
    the record of an uninterrupted run."""
    args = ["--defense", "planted-slow-noise", "--classifier", "tiny", "--dataset", "tiny-test", "--budget", "smoke",
            "--n", "24", "--batch-size", "4"]
    _kill_when(_bench([*args, "--out", str(tmp_path / "resumed")]), tmp_path / "resumed" / ".state", "*/correction0-*.json")
    full, resumed = _finish(args, tmp_path / "full"), _finish(args, tmp_path / "resumed")
    assert any(a.get("stage") == "correction" for a in full["attacks"])
    for key in ("clean", "robust", "samples", "corrections"):
        assert resumed[key] == full[key]


def _independent_accuracy(n: int) -> float:
    """ResNet-20 clean accuracy computed without the harness: Pillow decode, own normalization."""
    import io

    from PIL import Image

    from bench.classifiers import load_classifier
    from bench.paths import data_dir

    z = np.load(data_dir() / "cifar10-jpeg" / "test.npz", allow_pickle=False)
    idx = np.random.RandomState(0).choice(10000, n, replace=False)
    off = z["offsets"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(z["jpeg"][off[i]:off[i + 1]].tobytes())).convert("RGB")) for i in idx])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pred = load_classifier("resnet20").net((x - mean) / std).argmax(1).numpy()
    return float((pred == z["labels"][idx]).mean())


@pytest.mark.slow
@needs_resnet20
def test_default_run_on_resnet20(tmp_path):
    """The demo: bare ResNet-20, linf 8/255, 512 images. Clean ~80%, robust at most 1%."""
    start = time.perf_counter()
    record, _ = run(RunConfig(defense="none", threat="linf", classifier="resnet20", n=512, out=tmp_path))
    seconds = time.perf_counter() - start
    independent = _independent_accuracy(512)
    print(f"resnet20 clean {record['clean']['accuracy']:.4f} (independent {independent:.4f}), "
          f"robust {record['robust']['accuracy']:.4f}, {seconds:.1f} s")
    assert abs(record["clean"]["accuracy"] - independent) <= 0.02
    assert record["robust"]["accuracy"] <= 0.01
    assert seconds < 600


class WrongEveryKthCall(torch.nn.Module):
    """A 'stochastic defense' that is wrong on calls k, 2k, ... and right (class 0) on the others."""

    stochastic = True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.calls = k, 0
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        right = torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()
        return (1 - right if self.calls % self.k == 0 else right) + self.weight * x.mean()


def test_stochastic_success_check_takes_the_worst_draw():
    from attacks import ATTACKS, Threat
    from bench.evaluation import evaluate
    from bench.subset import Subset

    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    subset = Subset("toy", "test", 4, 0, np.arange(4), x, y, 10, "0" * 64, "0" * 64)
    threat = Threat("linf", 1e-3)
    plans = [("fgsm", ATTACKS.get("fgsm")(threat))]
    # call 1 (clean): right; call 2 (FGSM gradient): wrong; call 3 (single success check): right
    lucky = evaluate(WrongEveryKthCall(2), subset, plans, threat, who="flicker", success_draws=1)
    assert lucky.robust.all()
    worst = evaluate(WrongEveryKthCall(2), subset, plans, threat, who="flicker", success_draws=10)
    assert not worst.robust.any()


def test_independent_suites_attack_every_clean_correct_point():
    from attacks import ATTACKS, Threat
    from bench.evaluation import evaluate
    from bench.subset import Subset
    from tests.helpers import NearestColor

    model = NearestColor()
    x = torch.rand(32, 3, 1, 1).expand(32, 3, 8, 8).contiguous()
    y = model(x).argmax(1)
    subset = Subset("toy", "test", 32, 0, np.arange(32), x, y, 10, "0" * 64, "0" * 64)
    threat = Threat("linf", 0.03)
    plans = [("fgsm", ATTACKS.get("fgsm")(threat)), ("pgd", ATTACKS.get("pgd")(threat, steps=10))]
    chained = evaluate(model, subset, plans, threat, who="toy")
    alone = evaluate(model, subset, plans, threat, who="toy", independent=True)
    assert [a["attacked"] for a in alone.attacks] == [32, 32]
    assert chained.attacks[1]["attacked"] == 32 - chained.attacks[0]["broken"]
    assert (alone.robust == chained.robust).all()  # same worst case, different bookkeeping
    fgsm, pgd = alone.attacks
    assert 0 < pgd["robust_alone"]["correct"] <= fgsm["robust_alone"]["correct"] < 32
    assert pgd["robust_alone_mean"] == pgd["robust_alone"]["accuracy"]  # deterministic: mean = worst case
    assert alone.robust.sum() <= min(fgsm["robust_alone"]["correct"], pgd["robust_alone"]["correct"])


def test_the_clean_image_is_judged_by_the_verdict_rule_and_complete_attacks_give_a_mean():
    from attacks import ATTACKS, Threat
    from bench.evaluation import evaluate
    from bench.subset import Subset

    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    subset = Subset("toy", "test", 4, 0, np.arange(4), x, y, 10, "0" * 64, "0" * 64)
    threat = Threat("linf", 1e-3)
    # clean: calls 1-4, the 4th wrong: the first draw is right (clean 100%), 3 of 4 draws (floor 0%)
    result = evaluate(WrongEveryKthCall(4), subset, [("fgsm", ATTACKS.get("fgsm")(threat))], threat, who="cycle",
                      success_draws=4)
    assert result.clean_correct.all() and result.clean_mean == 0.75 and not result.clean_worst.any()
    assert not result.robust.any() and result.attacks[0]["attacked"] == 0  # broken without an attack: nothing to do
    assert not result.mean_valid  # a sequential suite on a stochastic model has no mean
    fgsm = ATTACKS.get("fgsm")(threat)
    fgsm.early_stop = False
    complete = evaluate(WrongEveryKthCall(4), subset, [("fgsm", fgsm)], threat, who="cycle", success_draws=4,
                        independent=True, complete=True)
    outcome = complete.attacks[0]
    assert outcome["attacked"] == 4 and outcome["completed"] and complete.mean_valid  # every point with a right draw
    assert outcome["robust_alone"]["correct"] == 0  # the floor still bounds the worst case
    # call 5 is FGSM's gradient; call 6 re-classifies all 4 draws of every point stacked in one batch (all right)
    assert outcome["robust_alone_mean"] == 1.0 and outcome["robust_alone_majority"]["correct"] == 4
    assert complete.draws_right.tolist() == [3, 3, 3, 3]  # the fewest right draws, clean image included


def test_mean_and_majority_headlines_need_attacks_run_to_completion(tmp_path):
    from bench.plugins import load_plugin

    load_plugin(PLUGIN)
    base = dict(defense="planted-noise", classifier="tiny", dataset="tiny-test", budget="smoke", n=8, out=tmp_path,
                defense_options={}, checks=False)
    from defenses.base import DEFENSES

    noisy = DEFENSES.get("planted-noise")
    noisy.stochastic = True  # declared, so its suites know it is random
    try:
        with pytest.raises(BenchError, match="--headline mean needs attacks run to completion"):
            run(RunConfig(**base, headline="mean"))
        record, _ = run(RunConfig(**base, suite="atop-table7", headline="mean"))
        assert record["settings"]["complete_attacks"] and record["headline"]["accuracy"] == record["robust_mean"]
        assert all(a["completed"] and "robust_alone_majority" in a for a in record["attacks"])
        sequential, _ = run(RunConfig(**base))
        assert "robust_mean" not in sequential and "stopped refining" in sequential["mean_omitted"]
    finally:
        noisy.stochastic = False


def test_a_record_reproduces_its_run_config(tmp_path):
    from pathlib import Path

    from bench.plugins import load_plugin
    from bench.runner import RunConfig, config_from_record, run

    load_plugin(Path(__file__).with_name("plugin_examples.py"))
    config = RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", n=12, budget="smoke", out=tmp_path)
    record, _ = run(config)
    again = config_from_record(record, out=tmp_path)
    assert (again.defense, again.suite, again.budget, again.n, again.eps) == ("plugin-blur", "linf", "smoke", 12, 8 / 255)
    legacy = {k: v for k, v in record.items()}
    legacy["settings"] = {k: v for k, v in record["settings"].items() if k != "run_config"}
    assert config_from_record(legacy, out=tmp_path) == again


def test_resume_state_is_keyed_by_the_code_that_made_it(tmp_path, monkeypatch):
    from bench import runner
    from bench.plugins import load_plugin

    load_plugin(PLUGIN)
    config = RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=8, out=tmp_path,
                       checks=False)
    reference, _ = run(config)
    assert reference["environment"]["code"]["source_sha256"] and reference["clean"]["correct"] == 8
    assert reference["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # bench check reads it

    def plant(key):  # a saved clean batch in which every prediction is wrong
        folder = tmp_path / ".state" / key
        folder.mkdir(parents=True)
        wrong = [(label + 1) % 10 for label in reference["samples"]["label"]]
        (folder / "clean-0.json").write_text(json.dumps({"positions": list(range(8)), "pred": wrong, "correct": [0] * 8}))

    plant(runner.resume_key(reference["run_id"]))
    reused, _ = run(config)
    assert reused["clean"]["correct"] == 0  # state under this code's key is resumed from
    monkeypatch.setattr(runner, "code_version", lambda: {"package": "0.1.0", "source_sha256": "0" * 64})
    plant(runner.resume_key(reference["run_id"]))  # made by "other code"
    monkeypatch.undo()
    fresh, _ = run(config)
    assert fresh["clean"]["correct"] == 8  # state another version of the code made is never read


def test_few_remaining_points_run_their_targets_side_by_side():
    from attacks import ATTACKS, CountingModule, Oracle, Threat
    from attacks.verdict import Judge
    from tests.helpers import TinyNet

    net = TinyNet().eval()
    x = torch.rand(3, 3, 8, 8)
    y = net(x).argmax(1)
    attack = ATTACKS.get("apgd-t")(Threat("linf", 1e-4), steps=5, targets=9)  # too small to break anything
    counting = CountingModule(net)
    calm = Judge(CountingModule(net), 1)
    attack.run(Oracle(counting, calm), x, y)
    # 3 points x 9 targets = 27 rows: one run side by side (clean logits, start, 5 steps), not 9 runs of 3 rows
    assert counting.counter.backward == 6 and counting.counter.backward_images == 6 * 27
    many = torch.rand(40, 3, 8, 8)
    counting = CountingModule(net)
    attack.run(Oracle(counting, Judge(CountingModule(net), 1)), many, net(many).argmax(1))
    assert counting.counter.backward == 9 * 6  # 40 points: the targets run one after another (early stop between them)


def test_weights_replaced_at_the_same_path_make_another_run(tmp_path, monkeypatch):
    """The record names the classifier's weights by their sha256, and the run id changes with them: weights swapped
    under the same file name never reuse old state or join an old board."""
    from bench.classifiers import CLASSIFIERS, Classifier, ClassifierInfo
    from bench.plugins import load_plugin
    from tests.helpers import NearestColor

    load_plugin(PLUGIN)
    config = RunConfig(defense="plugin-blur", classifier="tiny", dataset="tiny-test", budget="smoke", n=8, out=tmp_path,
                       checks=False)
    first, _ = run(config)
    assert len(first["classifier"]["weights_sha256"]) == 64

    def swapped():  # the same name, the same "file", other weights
        net = NearestColor()
        net.centers.add_(0.01)
        return Classifier(net, ClassifierInfo("tiny", "nearest-colour", "tiny-test", 10, None, None, "fixed", None, "none",
                                              "tests"))

    monkeypatch.setitem(CLASSIFIERS._entries, "tiny", swapped)
    second, _ = run(config)
    assert second["classifier"]["weights"] == first["classifier"]["weights"]
    assert second["classifier"]["weights_sha256"] != first["classifier"]["weights_sha256"]
    assert second["run_id"] != first["run_id"]


def test_concurrent_runs_into_one_folder_lose_and_corrupt_nothing(tmp_path):
    """8 bench run processes, 4 configurations twice each, into one results folder: exactly 4 valid records, and each
    duplicate either waited for its twin's lock or found the record its twin wrote meanwhile."""
    procs = []
    for seed in range(4):
        for _ in range(2):
            args = ["--defense", "plugin-slow", "--classifier", "tiny", "--dataset", "tiny-test", "--budget", "smoke",
                    "--n", "12", "--batch-size", "4", "--seed", str(seed), "--out", str(tmp_path)]
            procs.append(subprocess.Popen([sys.executable, "-m", "bench", "--plugin", PLUGIN, "run", *args], cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outputs), [err[-500:] for code, err in outputs if code]
    records = sorted(tmp_path.glob("*.json"))
    assert len(records) == 4
    for path in records:
        validate_record(json.loads(path.read_text()))
    assert len({json.loads(p.read_text())["run_id"] for p in records}) == 4
    waited = sum("waiting for it" in err or "while this one waited" in err for _, err in outputs)
    assert waited >= 1  # the twins met at the lock
    assert not [p for p in tmp_path.glob("*.tmp")] and not [p for p in tmp_path.glob(".*.json.*")]  # no torn writes left


def test_skip_existing_returns_the_written_record_and_a_plain_rerun_rewrites_it(tmp_path, capsys):
    # Queues of long runs: `bench run --skip-existing` prints the record already in --out (same run id) instead of
    # running again; without it, the same run is repeated and its record rewritten.
    from bench.cli import main

    args = ["--plugin", PLUGIN, "run", "--defense", "plugin-blur", "--classifier", "tiny", "--dataset", "tiny-test",
            "--budget", "smoke", "--n", "8", "--out", str(tmp_path)]
    assert main(args) == 0
    (path,) = tmp_path.glob("*.json")
    os.utime(path, ns=(1, 1))  # written long ago
    capsys.readouterr()
    assert main([*args, "--skip-existing"]) == 0
    assert path.stat().st_mtime_ns == 1 and list(tmp_path.glob("*.json")) == [path]
    assert json.loads(path.read_text())["run_id"][:8] in capsys.readouterr().out  # the summary of the record it found
    assert main(args) == 0
    assert path.stat().st_mtime_ns > 1
