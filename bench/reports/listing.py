"""``bench list`` and ``bench show-card``: what can be named, which defenses have weights, and a defense's card."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from attacks.base import format_eps
from bench.core.errors import BenchError

LIST_KINDS = ("defenses", "attacks", "suites", "classifiers", "datasets")


def _registries() -> Dict[str, object]:
    from attacks import ATTACKS, SUITES
    from bench.classifiers import CLASSIFIERS
    from bench.data.datasets import DATASETS
    from defenses import DEFENSES

    return {"defenses": DEFENSES, "attacks": ATTACKS, "suites": SUITES, "classifiers": CLASSIFIERS, "datasets": DATASETS}


def cmd_list(what: Optional[str], long: bool = False) -> None:
    registries = _registries()
    for kind in [what] if what else LIST_KINDS:
        registry = registries[kind]
        print(f"{kind}:")
        if kind == "suites":
            for name, budgets in registry.items():
                for budget, suite in budgets.items():
                    attacks = ", ".join(_describe_spec(spec) for spec in suite.attacks)
                    mode = ", independent" if suite.independent else ""
                    norm = suite.threat.norm
                    also = "".join(f", --eps {format_eps(norm, e)}" for e in suite.standard_eps if e != suite.threat.eps)
                    print(f"  {name} v{suite.version} {budget} [{norm} eps={format_eps(norm, suite.threat.eps)}{also}, "
                          f"EOT {suite.eot_draws}{mode}]: {attacks}")
        elif kind == "defenses":
            from defenses.base import card_of

            status = weights_status(registry.names())
            width = max(len(name) for name in registry.names())
            for name in registry.names():
                print(f"  {name:{width}}  {status.get(name, '')}".rstrip())
                if long:
                    card = card_of(registry.get(name))
                    print(f"  {'':{width}}  {card.summary() if card else 'no card'}")
        else:
            for name in registry.names():
                print(f"  {name}")
        if kind == "suites":
            print("  (name vVERSION BUDGET [threat eps, other standard eps, EOT draws for a stochastic defense, independent:"
                  " every attack on every point]: the attacks in order; +bpda[stage] back-propagates through that stage"
                  " as the identity)")
        if kind == "classifiers":
            print("  robustbench:<Name>   (RobustBench zoo, weights under $BENCH_WEIGHTS_DIR/robustbench)")
            print("  file:<arch>:<path>   (your state dict for a registered architecture)")


#: Classifiers the shipped checkpoints are made for: ``bench list`` says for which of them each defense has weights.
SHIPPED_FOR = ("resnet20", "resnet4b")


def weights_status(names: Sequence[str]) -> Dict[str, str]:
    """Per defense: the classifiers it has weights for (shipped or trained), "no weights yet" with the error's hint
    when it has none, or nothing when it needs none. Empty when the shared classifiers are not available."""
    from bench.classifiers import load_classifier
    from defenses.base import build_defense

    try:
        classifiers = {c: load_classifier(c) for c in SHIPPED_FOR}
    except BenchError:
        return {}
    status = {}
    for name in names:
        ready, needs = [], False
        for label, classifier in classifiers.items():
            try:
                defense = build_defense(name, classifier)
            except BenchError:
                needs = True
                continue
            needs = needs or _names_a_checkpoint(defense.config())
            ready.append(label)
        if ready and needs:
            status[name] = "weights for " + ", ".join(ready)
        elif not ready:
            status[name] = "no weights yet (bench train makes them; docs/ per defense)"
    return status


def _names_a_checkpoint(config) -> bool:
    """Whether a defense's config (stages included) names a checkpoint it loaded."""
    if isinstance(config, dict):
        return bool(config.get("checkpoint")) or any(_names_a_checkpoint(v) for v in config.values())
    if isinstance(config, (list, tuple)):
        return any(_names_a_checkpoint(v) for v in config)
    return False


def cmd_show_card(name: str) -> None:
    from defenses.base import DEFENSES, card_of

    card = card_of(DEFENSES.get(name))
    if card is None:
        print(f"{name}: no card (a plug-in may omit it; its records say so)")
        return
    rows = [("defense", name), ("paper", card.title), ("authors", card.authors or "-"),
            ("venue", f"{card.venue} {card.year}".strip() if card.year else card.venue or "-"), ("link", card.paper or "-"),
            ("code", card.code or "none released that we know of"), ("weights here", card.weights),
            ("differs from the paper", card.differences)]
    for key, value in rows:
        print(f"{key + ':':24} {value}")


def _describe_spec(spec) -> str:
    params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.params)
    return f"{spec.attack}({params})" + (f"+bpda[{','.join(spec.bpda)}]" if spec.bpda else "")
