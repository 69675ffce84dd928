"""Attacks stay in the threat ball and [0, 1]; EOT averages single-draw gradients; BPDA uses the surrogate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks import ATTACKS, BPDA, EOT, CountingModule, Oracle, Threat
from attacks.base import Attack
from attacks.adaptive import EOTOracle
from attacks.apgd import checkpoints
from attacks.losses import ce, dlr
from attacks.verdict import Candidates, Judge, judging, margin
from bench.errors import BenchError
from defenses.base import Defense
from tests.conftest import needs_resnet20
from tests.helpers import TinyNet

THREATS = [Threat("linf", 8 / 255), Threat("l2", 0.5)]
ORACLE_ATTACKS = [n for n in ATTACKS.names() if ATTACKS.get(n).uses_oracle]


@pytest.mark.parametrize("name,threat", [(n, t) for n in ORACLE_ATTACKS for t in THREATS if t.norm in ATTACKS.get(n).norms],
                         ids=lambda v: v.norm if isinstance(v, Threat) else v)
def test_attack_stays_in_ball_and_box(name, threat, tiny_net, batch):
    x, _ = batch
    x[0] = 0.0  # corners of the box must be respected too
    x[1] = 1.0
    y = tiny_net(x).argmax(1)  # every point starts correct, so every attack must move
    params = {"fgsm": {}, "square": {"queries": 50}}.get(name, {"steps": 5})
    if name == "apgd-t":
        params["targets"] = 2
    x_adv = ATTACKS.get(name)(threat, **params).run(Oracle(tiny_net), x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if threat.norm == "linf" else delta.norm(dim=1)
    assert (size <= threat.eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).flatten(1).any(1).all()  # every point gets a candidate, never the clean image


def test_projection_is_exact():
    threat = Threat("l2", 0.5)
    x = torch.full((2, 3, 4, 4), 0.5)
    far = x + 0.1 * torch.randn_like(x).sign()  # norm 0.69, inside the box
    proj = threat.project(far, x)
    assert torch.allclose((proj - x).flatten(1).norm(dim=1), torch.tensor([0.5, 0.5]), atol=1e-5)
    assert torch.allclose(Threat("linf", 0.05).project(far, x), x + 0.05 * (far - x).sign())
    inside = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    assert torch.equal(Threat("linf", 0.05).project(inside, x), inside)  # no rounding of points already inside


@needs_resnet20
def test_attack_strength_is_ordered_at_a_small_eps():
    """ResNet-20 at linf 1/255 on 64 images: FGSM breaks some points, PGD-10 clearly more, APGD-CE-10 at least as many;
    every attack's output (``run``, before any projection) is inside the ball."""
    from bench.classifiers import load_classifier
    from bench.subset import load_subset

    net, subset = load_classifier("resnet20"), load_subset("cifar10-jpeg", 64)
    with torch.no_grad():
        right = net(subset.x).argmax(1) == subset.y
    x, y = subset.x[right], subset.y[right]
    threat = Threat("linf", 1 / 255)
    robust = {}
    for name, params in (("fgsm", {}), ("pgd", {"steps": 10}), ("apgd-ce", {"steps": 10})):
        torch.manual_seed(0)
        x_adv = ATTACKS.get(name)(threat, **params).run(Oracle(net), x, y)
        assert ((x_adv - x).abs().flatten(1).max(1).values <= threat.eps + 1e-6).all(), name
        with torch.no_grad():
            robust[name] = int((net(x_adv).argmax(1) == y).sum())
    assert robust["apgd-ce"] <= robust["pgd"] <= robust["fgsm"] - 3 < len(y) - 3, robust


def test_a_plugin_attack_that_leaves_the_ball_is_refused(tiny_net, batch):
    import numpy as np

    from bench.evaluation import evaluate
    from bench.subset import Subset

    class Escapes(Attack):
        uses_oracle = False

        def perturb(self, model, x, y):  # no projection: twice the radius
            return (x + 2 * self.threat.eps).clamp(0, 1)

    x, _ = batch
    x = x.clamp(0.1, 0.9)
    y = tiny_net(x).argmax(1)
    subset = Subset("toy", "test", len(y), 0, np.arange(len(y)), x, y, 10, "0" * 64, "0" * 64)
    threat = Threat("linf", 0.03)
    with pytest.raises(RuntimeError, match="returned points outside the linf ball"):
        evaluate(tiny_net, subset, [("escapes", Escapes(threat))], threat, who="tiny")


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_is_scale_invariant():
    logits = torch.randn(5, 10)
    y = torch.arange(5)
    assert torch.allclose(dlr(logits, y), dlr(3 * logits, y), atol=1e-5)


class RecordingNoise(nn.Module):
    """A stochastic model that remembers the noise of each call, so single draws can be replayed."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.draws, self.replay = net, [], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.replay if self.replay is not None else 0.1 * torch.randn_like(x)
        if self.replay is None:
            self.draws.append(noise.detach())
        return self.net(x + noise)


@pytest.mark.parametrize("chunk_images", [1, 12, 1000])
def test_eot_gradient_is_mean_of_single_draw_gradients(chunk_images, tiny_net, batch):
    x, y = batch
    n = 5
    model = RecordingNoise(tiny_net)
    loss, grad, _ = EOTOracle(model, n, chunk_images).loss_grad(x, y, ce)
    draws = torch.cat(model.draws).view(n, *x.shape)  # draws are stacked draw-major along the batch
    singles = []
    for noise in draws:
        model.replay = noise
        singles.append(Oracle(model).loss_grad(x, y, ce))
    assert torch.allclose(grad, torch.stack([g for _, g, _ in singles]).mean(0), atol=1e-6)
    assert torch.allclose(loss, torch.stack([l for l, _, _ in singles]).mean(0), atol=1e-6)


def test_eot_passes_are_chunked(tiny_net, batch):
    x, y = batch  # 6 images
    counting = CountingModule(RecordingNoise(tiny_net))
    attack = EOT(ATTACKS.get("fgsm")(Threat("linf", 0.03)), n=20, chunk_images=24)
    attack.perturb(counting, x, y)
    assert counting.counter.forward == 5  # 4 draws (24 images) per pass -> 5 passes
    assert counting.counter.forward_images == 120 and counting.counter.backward_images == 120
    assert attack.describe()["eot"] == 20


class NoisyLogits(nn.Module):
    """A declared-stochastic model whose every draw adds large noise to the logits: single draws are often wrong."""

    stochastic = True

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits + 3 * logits.detach().std() * torch.randn_like(logits)


def test_a_point_leaves_an_attack_only_on_the_judges_verdict(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    rows, cand = torch.arange(len(y)), (x + 0.01).clamp(0, 1)
    says_wrong = torch.nn.functional.one_hot((y + 1) % 10, 10).float()  # the attack's own evidence: misclassified
    calm = Judge(CountingModule(tiny_net), 6, stochastic=True)  # draws that are always right
    found = Candidates(Oracle(NoisyLogits(tiny_net), calm), x, y)
    assert found.offer(rows, cand, says_wrong).all() and not found.broken.any()
    noisy = Judge(CountingModule(NoisyLogits(tiny_net)), 6)
    found = Candidates(Oracle(NoisyLogits(tiny_net), noisy), x, y)
    keep = found.offer(rows, cand, says_wrong)
    right = torch.tensor([noisy.verdict(row) for row in cand])
    assert torch.equal(~keep, right < 6) and (~keep).any()  # exactly the points a fresh draw misclassified leave
    assert torch.equal(found.x[~keep], cand[~keep])  # with the example the judge confirmed


def test_pgd_on_single_draws_that_never_confirm_takes_every_step(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    steps = 7
    model = CountingModule(NoisyLogits(tiny_net))  # single draws: often wrong
    calm = Judge(CountingModule(tiny_net), 6, stochastic=True)  # but the verdict's draws are always right
    attack = ATTACKS.get("pgd")(Threat("linf", 1e-3), steps=steps, random_start=False)
    with judging(calm):
        x_adv = attack.perturb(model, x, y)
    assert model.counter.backward_images == steps * len(x)  # no point left on a lucky draw
    assert (x_adv != x).flatten(1).any(1).all()  # and each returns a candidate, not the clean image
    assert not EOTOracle(model, 4, 64).single_draw and EOTOracle(model, 1, 64).single_draw
    assert BPDA(attack).make_oracle(model).single_draw


def test_judge_confirms_with_fresh_draws_and_keeps_its_verdicts(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    deterministic = Judge(CountingModule(tiny_net), 10)
    assert deterministic.draws == 1 and not deterministic.stochastic
    wrong = (y + 1) % 10
    assert deterministic(x, wrong, tiny_net(x)).all()  # a deterministic verdict reuses the logits: no pass
    assert deterministic.model.counter.forward == 0 and deterministic.verdict(x[0]) == 0
    noisy = CountingModule(NoisyLogits(tiny_net))
    judge = Judge(noisy, 8)
    logits = tiny_net(x).detach()
    broken = judge(x, y, torch.nn.functional.one_hot(wrong, 10).float())  # the attack's logits only trigger the draws
    right = torch.tensor([judge.verdict(row) for row in x])
    assert torch.equal(broken, right < 8) and noisy.counter.forward_images == 8 * len(x)
    assert not judge(x, y, logits).any() or noisy.counter.forward_images > 8 * len(x)
    judge.force(x[:1])
    assert judge.verdict(x[0]) == 0


def test_candidates_keep_the_lowest_margin_and_never_the_clean_image(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    oracle = Oracle(tiny_net)
    found = Candidates(oracle, x, y, early_stop=False)
    owners = torch.arange(len(y)).repeat(2)  # two runs side by side
    near, far = x + 0.001, x + 0.2
    found.offer(owners, torch.cat([near, x]), tiny_net(torch.cat([near, x])))
    assert torch.equal(found.x, near)  # the clean image never wins, though its margin may be lower
    cand = torch.cat([near, far]).clamp(0, 1)
    logits = tiny_net(cand)
    found.offer(owners, cand, logits)
    m = margin(logits, y.repeat(2)).view(2, -1)
    pick = m.argmin(0)
    assert torch.equal(found.x, torch.stack([cand.view(2, *x.shape)[p, i] for i, p in enumerate(pick)]))


class Quantize(nn.Module):
    """A non-differentiable stage (zero gradient almost everywhere); BPDA surrogate: identity."""

    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


def test_bpda_uses_the_declared_surrogate(tiny_net, batch):
    x, y = batch
    defense = Defense(tiny_net, purifier=Quantize())
    assert not defense.differentiable
    exact = Oracle(defense).loss_grad(x, y, ce)[1]
    assert exact.abs().sum() == 0  # rounding kills the exact gradient
    bpda = BPDA(ATTACKS.get("fgsm")(Threat("linf", 0.03))).make_oracle(defense)
    _, grad, logits = bpda.loss_grad(x, y, ce)
    assert grad.abs().sum() > 0
    assert torch.allclose(logits, defense(x))  # forward values stay the real ones
    assert torch.allclose(grad, Oracle(lambda z: tiny_net(z + (defense.purifier(z) - z).detach())).loss_grad(x, y, ce)[1])


def test_eot_around_bpda_composes(tiny_net, batch):
    x, y = batch
    defense = Defense(tiny_net, purifier=Quantize())
    attack = EOT(BPDA(ATTACKS.get("pgd")(Threat("linf", 0.1), steps=3)), n=2, chunk_images=64)
    x_adv = attack.perturb(CountingModule(defense), x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert attack.describe() == {**attack.describe(), "eot": 2, "bpda": True}


def test_counting_module_counts_passes(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    counting = CountingModule(tiny_net)
    ATTACKS.get("pgd")(Threat("linf", 1e-4), steps=3).perturb(counting, x, y)
    # 3 gradient steps (forward + backward) and one final forward, tiny eps keeps every point
    assert counting.counter.forward == 4 and counting.counter.backward == 3
    assert counting.forward_sizes is None  # sizes are only kept when asked for
    sized = CountingModule(tiny_net, record_sizes=True)
    ATTACKS.get("pgd")(Threat("linf", 1e-4), steps=3).perturb(sized, x, y)
    assert sized.forward_sizes == [len(x)] * 4 and sized.backward_sizes == [len(x)] * 3


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_linf_eps_out_of_range_is_a_user_error(bad):
    with pytest.raises(BenchError, match="out of range"):
        Threat("linf", bad)


def test_suite_adds_bpda_and_eot_variants():
    from attacks import SUITES

    suite = SUITES.get("linf")["smoke"]
    threat = suite.threat
    assert [label for label, _ in suite.build(threat, stochastic=False, differentiable=True)] == ["fgsm", "pgd-10"]
    labels = [label for label, _ in suite.build(threat, stochastic=True, differentiable=False)]
    assert labels == ["fgsm+eot2", "fgsm+bpda+eot2", "pgd-10+eot2", "pgd-10+bpda+eot2"]


def test_autoattack_auto_runs_rand_on_a_stochastic_defense_and_standard_otherwise():
    # AutoAttack standard takes each gradient from one draw of a stochastic defense: against nrp-dynamic it read 53.91
    # where PGD-40 with EOT-10 read 49.22. jatp-table1 v3 asks for "auto", resolved per defense before building.
    from attacks.suite import load_suite

    suite = load_suite("jatp-table1", "linf", "cpu")
    assert [dict(s.params)["version"] for s in suite.attacks if s.attack == "autoattack"] == ["auto"]
    for stochastic, version in ((True, "rand"), (False, "standard")):
        built = dict(suite.build(suite.threat, stochastic=stochastic, differentiable=True))
        assert built["autoattack"].params()["version"] == version
    with pytest.raises(BenchError, match="resolved for the defense"):
        ATTACKS.get("autoattack")(Threat("linf", 0.03), version="auto")


def test_atop_table8_runs_its_columns_at_l2_1_exact_and_with_the_purifier_skipped():
    from attacks.suite import load_suite
    from leaderboards.render import attack_key, load_boards

    suite = load_suite("atop-table8", "l2", "cpu")
    assert (suite.threat.norm, suite.threat.eps, suite.independent) == ("l2", 1.0, True)
    plans = suite.build(suite.threat, stochastic=True, differentiable=True, complete=True)
    keys = {attack_key({"attack": a.attack, "params": dict(a.params), "bpda_stages": list(a.bpda)}) for a in suite.attacks}
    board = {b.name: b for b in load_boards()}["atop-table8"]
    for column in board.columns.values():  # every paper column measured both ways
        assert {column, f"{column}+skip"} <= keys
    assert all(label.endswith("+eot10") for label, _ in plans if not label.startswith("transfer"))


@pytest.mark.parametrize("version", ["standard", "rand"])
def test_reference_autoattack_runs_through_the_harness(version, tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    attack = ATTACKS.get("autoattack")(Threat("linf", 0.3), version=version)
    x_adv = attack.perturb(tiny_net, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (tiny_net(x_adv).argmax(1) != y).all()


def test_suites_come_in_budgets_and_record_them():
    from attacks.suite import load_suite

    smoke, cpu, full = (load_suite("linf", "linf", b) for b in ("smoke", "cpu", "full"))
    assert (smoke.eot_draws, cpu.eot_draws, full.eot_draws) == (2, 10, 20)
    assert full.to_dict()["budget"] == "full" and full.to_dict()["name"] == "linf"
    assert load_suite("linf", "linf", "paper") == full  # the budget's older name still resolves (older records)
    assert not full.independent and load_suite("atop-table7", "linf", "cpu").independent
    with pytest.raises(BenchError, match="is for threat linf"):
        load_suite("linf", "l2", "cpu")


@pytest.mark.parametrize("bad,match", [
    ({"budgets": {"huge": {"eot_draws": 1, "attacks": [{"attack": "fgsm"}]}}}, "budgets must be"),
    ({"budgets": {"cpu": {"eot_draws": 0, "attacks": [{"attack": "fgsm"}]}}}, "eot_draws >= 1"),
    ({"budgets": {"cpu": {"eot_draws": 1, "attacks": [{"attack": "fgsm", "bpda": ["classifier"]}]}}}, "bpda stages"),
    ({"budgets": {"cpu": {"eot_draws": 1, "attacks": [{"atack": "fgsm"}]}}}, "needs 'attack'"),
    ({"budget": {}}, "unknown keys"),
])
def test_broken_suite_files_are_one_line_errors(bad, match):
    from attacks.suite import parse_suite

    data = {"name": "x", "version": "1", "threat": {"norm": "linf", "eps": 0.03}, **bad}
    data.setdefault("budgets", {"cpu": {"eot_draws": 1, "attacks": [{"attack": "fgsm"}]}})
    with pytest.raises(BenchError, match=match):
        parse_suite(data, "test")


def test_suite_spec_can_skip_a_stage_in_the_gradient():
    from attacks.suite import load_suite

    suite = load_suite("atop-table7", "linf", "smoke")
    plans = suite.build(suite.threat, stochastic=True, differentiable=True, eot_chunk_images=64)
    labels = [label for label, _ in plans]
    assert labels == ["fgsm+eot2", "pgd-3+eot2", "pgd-3+bpda[purifier]+eot2"]
    described = plans[-1][1].describe()
    assert described["bpda"] and described["bpda_stages"] == ["purifier"] and described["eot"] == 2


def test_mim_accumulates_l1_normalised_gradients():
    from attacks.momentum import MIM

    mim = MIM(Threat("linf", 0.03), steps=4, mu=0.5)
    g1, g2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    d1, memory = mim.direction(g1, torch.zeros_like(g1))
    d2, _ = mim.direction(g2, memory)
    l1 = lambda g: g.abs().flatten(1).sum(1).view(-1, 1, 1, 1)  # noqa: E731
    assert torch.allclose(d2, 0.5 * g1 / l1(g1) + g2 / l1(g2))
    assert mim.step_size == pytest.approx(0.03 / 4) and not mim.random_start


def test_ti_bim_smooths_the_gradient_with_a_normalised_gaussian():
    from attacks.momentum import TIBIM, gaussian_kernel

    assert gaussian_kernel(5).sum().item() == pytest.approx(1.0)
    spike = torch.zeros(1, 3, 9, 9)
    spike[:, :, 4, 4] = 1.0
    smoothed, _ = TIBIM(Threat("linf", 0.03), kernel=5).direction(spike, spike)
    assert smoothed[0, 0, 4, 4] < 1 and smoothed[0, 0, 2:7, 2:7].sum() == pytest.approx(1.0, abs=1e-5)
    assert (smoothed[0, 0, 2:7, 2:7] > 0).all() and smoothed[0, 0, 0, 0] == 0
    with pytest.raises(BenchError, match="odd kernel"):
        TIBIM(Threat("linf", 0.03), kernel=4)


def test_ti_bim_with_a_one_pixel_kernel_is_bim(tiny_net, batch):
    from attacks.momentum import TIBIM

    x, _ = batch
    y = tiny_net(x).argmax(1)
    threat = Threat("linf", 0.5)
    ti = TIBIM(threat, steps=20, kernel=1).run(Oracle(tiny_net), x, y)
    bim = ATTACKS.get("pgd")(threat, steps=20, step_size=0.5 / 20, random_start=False).run(Oracle(tiny_net), x, y)
    assert torch.allclose(ti, bim) and (tiny_net(ti).argmax(1) != y).all()


def test_square_is_a_score_based_attack_that_eot_can_wrap(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    threat = Threat("linf", 0.5)
    square = ATTACKS.get("square")(threat, queries=200)
    assert not square.uses_gradients
    counting = CountingModule(tiny_net)
    x_adv = EOT(square, n=2, chunk_images=64).perturb(counting, x, y)
    assert (x_adv - x).abs().max() <= 0.5 + 1e-6 and (tiny_net(x_adv).argmax(1) != y).any()
    assert (x_adv != x).flatten(1).any(1).all()  # every point gets a candidate, never the clean image
    assert counting.counter.backward == 0  # no gradient was ever asked for


def test_transfer_attack_crafts_on_the_bare_classifier_and_costs_no_defense_gradients(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)

    class Shifted(Defense):  # a defense whose purifier the transfer attack never sees
        def __init__(self, classifier):
            super().__init__(classifier, purifier=nn.Identity())

    counting = CountingModule(Shifted(tiny_net))
    transfer = ATTACKS.get("transfer")(Threat("linf", 0.5), steps=10)
    x_adv = transfer.perturb(counting, x, y)
    assert counting.counter.forward == 0 and counting.counter.backward == 0
    assert (x_adv - x).abs().max() <= 0.5 + 1e-6 and (tiny_net(x_adv).argmax(1) != y).float().mean() >= 0.5
    assert transfer.params()["source"] == "classifier"


def test_an_attack_refuses_a_threat_it_cannot_work_in():
    with pytest.raises(BenchError, match="works in l2"):
        ATTACKS.get("cw-l2")(Threat("linf", 8 / 255))
    with pytest.raises(BenchError, match="works in stadv"):
        ATTACKS.get("stadv")(Threat("linf", 8 / 255))
    with pytest.raises(BenchError, match="works in linf, l2"):
        ATTACKS.get("pgd")(Threat("stadv", 0.05))


@pytest.mark.parametrize("name,threat", [("cw-l2", Threat("l2", 5.0)), ("deepfool", Threat("l2", 5.0)),
                                         ("deepfool", Threat("linf", 0.5))], ids=lambda v: getattr(v, "norm", v))
def test_minimal_perturbation_attacks_break_an_undefended_model(name, threat, tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    params = {"steps": 30, "search_steps": 5, "lr": 0.1} if name == "cw-l2" else {"steps": 30}
    x_adv = ATTACKS.get(name)(threat, **params).perturb(tiny_net, x, y)
    fooled = tiny_net(x_adv).argmax(1) != y
    assert fooled.float().mean() >= 0.5
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if threat.norm == "linf" else delta.norm(dim=1)
    assert (size[fooled] <= threat.eps + 1e-5).all()
    assert size[fooled].mean() < threat.eps  # minimal: well inside the ball, not pushed to its surface


def test_cw_l2_keeps_the_smallest_adversarial_example_inside_the_ball(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    small, large = (ATTACKS.get("cw-l2")(Threat("l2", eps), steps=30, search_steps=5, lr=0.1) for eps in (0.05, 5.0))
    assert (tiny_net(small.perturb(tiny_net, x, y)).argmax(1) != y).sum() <= (tiny_net(large.perturb(tiny_net, x, y)).argmax(1) != y).sum()


def _pixel_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))  # position-sensitive, unlike global pooling


def test_stadv_moves_pixels_within_the_flow_bound_and_breaks_a_model(monkeypatch):
    from attacks import stadv

    model, flows = _pixel_net(), []
    real_warp = stadv.warp
    monkeypatch.setattr(stadv, "warp", lambda x, f: flows.append(f.detach().abs().max()) or real_warp(x, f))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = model(x).argmax(1)
    threat = Threat("stadv", 0.2)
    x_adv = ATTACKS.get("stadv")(threat, steps=20).perturb(model, x, y)
    assert max(flows) <= threat.eps + 1e-6
    assert (model(x_adv).argmax(1) != y).float().mean() >= 0.5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_stadv_warp_and_smoothness_loss():
    from attacks.stadv import flow_smoothness, warp

    x = torch.rand(2, 3, 6, 6)
    assert torch.allclose(warp(x, torch.zeros(2, 2, 6, 6)), x, atol=1e-6)
    shift = torch.zeros(2, 2, 6, 6)
    shift[:, 0] = 2 / 5  # one pixel to the right in normalized coordinates (align_corners=True)
    assert torch.allclose(warp(x, shift)[..., :-1], x[..., 1:], atol=1e-5)
    smooth = flow_smoothness(torch.full((1, 2, 6, 6), 0.3))
    rough = flow_smoothness(torch.rand(1, 2, 6, 6))
    assert smooth.item() < 0.05 < 1.0 < rough.item()  # a constant flow costs only the sqrt(1e-8) floor


def test_stadv_threat_has_no_pixel_ball():
    threat = Threat("stadv", 0.05)
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(threat.project(x + 0.5, x), (x + 0.5).clamp(0, 1))
    with pytest.raises(BenchError, match="needs an lp threat"):
        threat.random_start(x)


class _Blur(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0

    def forward(self, x):
        self.calls += 1
        for _ in range(self.steps):
            x = nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return x


class _WithSurrogate(Defense):
    """A 'costly' purifier (8 blur steps) whose attacker surrogate runs 2."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=_Blur(8))
        self.cheap = Defense(classifier, purifier=_Blur(2))

    def attack_surrogate(self):
        return self.cheap

    def surrogate_config(self):
        return {"blur_steps": 2}


def test_suite_uses_the_attacker_surrogate_for_gradients_only(tiny_net, batch):
    from attacks.suite import AttackSpec, Suite
    from bench.evaluation import evaluate
    from bench.subset import Subset
    import numpy as np

    defense = _WithSurrogate(tiny_net)
    x, _ = batch
    y = defense(x).argmax(1)
    threat = Threat("linf", 8 / 255)
    specs = (AttackSpec("pgd", (("steps", 5),)), AttackSpec("square", (("queries", 20),)))
    suite = Suite("s", "1", "cpu", "", threat, 1, specs, surrogate=True)
    plans = suite.build(threat, False, True, surrogate=defense.attack_surrogate())
    assert [label for label, _ in plans] == ["pgd-5+surrogate", "square"]  # a score-based attack queries the real defense
    subset = Subset("toy", "test", len(y), 0, np.arange(len(y)), x, y, 10, "0" * 64, "0" * 64)
    evaluate(defense, subset, plans[:1], threat, who="surrogate")
    assert defense.cheap.purifier.calls >= 5  # every PGD gradient came from the surrogate...
    assert defense.purifier.calls <= 2 + 1  # ...the real defense only classified: clean pass and final check
    assert defense.describe()["surrogate_config"] == {"blur_steps": 2}
    assert Suite("s", "1", "cpu", "", threat, 1, specs).build(threat, False, True, surrogate=defense.cheap)[0][0] == "pgd-5"


def test_pipeline_bpda_replaces_exact_and_stage_bpda_variants_of_gradient_attacks():
    from attacks.suite import AttackSpec, Suite

    threat = Threat("linf", 8 / 255)
    specs = (AttackSpec("pgd", (("steps", 5),)), AttackSpec("pgd", (("steps", 5),), ("purifier",)),
             AttackSpec("square", (("queries", 10),)))
    suite = Suite("s", "1", "cpu", "", threat, 2, specs)
    assert [label for label, _ in suite.build(threat, True, False)] == [
        "pgd-5+eot2", "pgd-5+bpda+eot2", "pgd-5+bpda[purifier]+eot2", "pgd-5+bpda[purifier]+bpda+eot2", "square+eot2"]
    plans = suite.build(threat, True, False, pipeline_bpda=True)
    assert [label for label, _ in plans] == ["pgd-5+bpda[pipeline]+eot2", "pgd-5+bpda[purifier]+bpda[pipeline]+eot2", "square+eot2"]
    assert all(a.inner.stages == ("pipeline",) for _, a in plans[:2])


def test_auto_budget_falls_back_to_a_single_budget_suite():
    from attacks.suite import load_suite

    assert load_suite("autoattack-rand", "linf", "cpu", fallback=True).budget == "full"
    with pytest.raises(BenchError, match="has no 'cpu' budget"):
        load_suite("autoattack-rand", "linf", "cpu")


def test_transfer_from_the_evaluated_model_itself_is_marked_white_box(tiny_net, batch):
    x, _ = batch
    y = tiny_net(x).argmax(1)
    bare = ATTACKS.get("transfer")(Threat("linf", 8 / 255), steps=2)
    bare.perturb(tiny_net, x, y)
    assert bare.describe()["source_is_target"] is True
    purified = ATTACKS.get("transfer")(Threat("linf", 8 / 255), steps=2)
    purified.perturb(Defense(tiny_net, purifier=nn.AvgPool2d(3, 1, 1)), x, y)
    assert purified.describe()["source_is_target"] is False
