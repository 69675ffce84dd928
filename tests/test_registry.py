"""The generic registry and the defense registry (every registered defense is checked here)."""

from __future__ import annotations

import pytest
import torch

from bench.errors import BenchError
from bench.registry import Registry
from defenses import DEFENSES, Defense, build_defense, register_defense
from tests.helpers import TinyNet


def test_duplicate_names_are_refused():
    reg: Registry[object] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)


def test_unknown_name_suggests_the_closest():
    reg: Registry[object] = Registry("thing")
    reg.add("resnet20", 1)
    reg.add("resnet56", 2)
    with pytest.raises(BenchError, match=r"Unknown thing 'resnet2'\. Did you mean: resnet20"):
        reg.get("resnet2")


def test_base_class_is_enforced():
    reg: Registry[type] = Registry("defense", base=Defense)
    with pytest.raises(TypeError, match="must subclass Defense"):
        reg.add("bad", int)
    with pytest.raises(TypeError):
        register_defense("not-a-defense")(int)


def test_unknown_defense_names_the_closest():
    with pytest.raises(BenchError, match="Did you mean: none"):
        DEFENSES.get("nonee")


def test_builtin_defenses_are_discovered():
    assert "none" in DEFENSES.names()


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_keeps_its_declarations(name):
    """Output shape, declared randomness observed, and gradients flow (or a BPDA path exists)."""
    cls = DEFENSES.get(name)
    # Defenses with trained parts offer an untrained instance for structural tests.
    defense = (cls.for_testing(TinyNet()) if hasattr(cls, "for_testing") else build_defense(name, TinyNet())).eval()
    x = torch.rand(4, 3, 8, 8)
    out1, out2 = defense(x), defense(x)
    assert out1.shape == (4, 10)
    assert torch.isfinite(out1).all()
    assert defense.stochastic == (not torch.equal(out1, out2))
    xg = x.clone().requires_grad_(True)
    forward = defense if defense.differentiable else defense.bpda_forward
    forward(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    described = defense.describe()
    assert described["name"] == name and described["version"]


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_builtin_defense_has_a_complete_card(name):
    """A reader of a board finds the paper, the authors' code (or that there is none), where the weights come from and
    what differs from the paper; a stack's card names every member."""
    from defenses.base import card_of

    card = card_of(DEFENSES.get(name))
    assert card is not None, f"{name} has no card"
    assert card.title and card.weights and card.differences
    if name != "none":
        assert card.paper.startswith("https://") and card.authors and card.venue
    members = getattr(DEFENSES.get(name), "members", ())
    for member in members:
        assert card_of(DEFENSES.get(member)).title in card.title


def test_every_tracked_file_over_20_mib_has_a_reason_in_its_manifest():
    """House rule: checkpoints live in git; a file over 20 MiB says why in the manifest beside it (size_reason)."""
    import json
    import subprocess

    from tests.conftest import REPO

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    missing = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size <= 20 * 2**20:
            continue
        manifest = path.with_name(path.name.split(".")[0] + ".manifest.json")
        reason = json.loads(manifest.read_text()).get("size_reason") if manifest.is_file() else None
        if not reason:
            missing.append(f"{name} ({path.stat().st_size / 2**20:.1f} MiB)")
    assert missing == [], missing
