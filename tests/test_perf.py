"""bench perf: attack efficiency, the reference comparisons, EOT chunking and early stop."""

from __future__ import annotations

import numpy as np
import torch

from attacks.adaptive import EOTOracle
from attacks.apgd import APGDCE
from attacks.base import CountingModule, Oracle, PassCounter, Threat
from attacks.gradient import PGD
from attacks.losses import ce
from bench.perf import format_report, run_perf
from bench.subset import Subset
from tests.helpers import TinyNet


def _data(n=24, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n, 3, 8, 8), torch.randint(0, 10, (n,))


def test_without_early_stop_attacks_keep_going_but_return_the_same_verdicts():
    net = TinyNet().eval()
    x, y = _data()
    threat = Threat("linf", 16 / 255)
    for cls, kwargs in ((PGD, {"steps": 5, "restarts": 2}), (APGDCE, {"steps": 5, "restarts": 2})):
        results = {}
        for early in (True, False):
            attack = cls(threat, **kwargs)
            attack.early_stop = early
            counting = CountingModule(net, PassCounter())
            torch.manual_seed(0)
            x_adv = attack.perturb(counting, x, y)
            with torch.no_grad():
                fooled = net(x_adv).argmax(1) != y
            results[early] = (fooled, counting.counter.backward_images)
            assert (x_adv - x).abs().max() <= 16 / 255 + 1e-6
        assert results[True][0].any()
        # the points early stop drops are fooled either way; without it the attack spends more passes
        assert torch.equal(results[True][0] & results[False][0], results[True][0])
        assert results[False][1] > results[True][1]


def test_eot_chunking_averages_exactly_like_a_loop():
    net = TinyNet().eval()
    x, y = _data(6)
    grads = [EOTOracle(net, 20, chunk).loss_grad(x, y, ce)[1] for chunk in (6, 120, 48)]  # loop, all at once, ours
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
    _, single, _ = Oracle(net).loss_grad(x, y, ce)
    assert torch.allclose(grads[0], single, atol=1e-6)  # a deterministic model: the mean is the one gradient


def test_run_perf_reports_every_part(monkeypatch):
    net = TinyNet().eval()
    x, y = _data(16)
    subset = Subset("toy", "test", 16, 0, np.arange(16), x, y, 10, "0" * 64, "0" * 64)
    report = run_perf(net, subset, torch.device("cpu"), eps=8 / 255, steps=3, batch_sizes=(1, 8), budget="smoke",
                      execution_options=("channels_last", "autocast bf16"))
    assert [a["attack"] for a in report["attacks"]] == ["pgd-3", "apgd-ce-3"]
    for a in report["attacks"]:
        assert a["backward_images"] > 0 and a["efficiency"] > 0
    assert {r["reference"] for r in report["reference"]} == {"textbook PGD loop", "pyautoattack APGDAttack"}
    for row in report["reference"]:  # ours is at least as strong as the reference, within one image
        assert row["ours_robust"] <= row["reference_robust"] + 1 / 16 + 1e-9, row
    assert [r["batch"] for r in report["eot"]] == [1, 8]
    early = report["early_stop"]
    assert early["early_stop"]["robust_accuracy"] == early["no_early_stop"]["robust_accuracy"]
    assert "efficiency" in format_report(report) and "forward+backward s" in format_report(report)
    assert [r["option"] for r in report["execution"]] == ["plain", "channels_last", "autocast bf16"]
    assert report["execution"][1]["max_logit_diff"] < 1e-4 and report["execution"][2]["max_logit_diff"] < 0.1


class _Spy(Oracle):
    """Records every point PGD asks a gradient for."""

    def __init__(self, model):
        super().__init__(model)
        self.asked = []

    def loss_grad(self, x, y, loss_fn):
        self.asked.append(x.clone())
        return super().loss_grad(x, y, loss_fn)


def test_pgd_ascends_exactly_like_the_textbook_loop():
    """Without early stop, every iterate of our PGD is the textbook loop's iterate from the same random start."""
    import torch.nn.functional as F

    net = TinyNet().eval()
    x, y = _data(8)
    eps, steps = 8 / 255, 6
    attack = PGD(Threat("linf", eps), steps=steps)
    attack.early_stop = False
    spy = _Spy(net)
    torch.manual_seed(0)
    attack.run(spy, x, y)
    torch.manual_seed(0)
    x_ref = Threat("linf", eps).random_start(x)
    for asked in spy.asked:
        assert torch.equal(asked, x_ref)
        xg = x_ref.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(xg), y), xg)
        x_ref = torch.min(torch.max(x_ref + attack.step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    assert len(spy.asked) == steps
