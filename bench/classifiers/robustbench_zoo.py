"""``robustbench:<Name>``: a CIFAR-10 Linf model from the RobustBench zoo through ``robustbench.load_model``.

Offline by design: the weight file must already be at ``$BENCH_WEIGHTS_DIR/robustbench/cifar10/Linf/<Name>.pt``
(RobustBench's own layout); we never let it download. Since torch 2.6, ``torch.load`` inside robustbench
defaults to ``weights_only=True``, so the file is read as weights only. RobustBench imports a module named
``autoattack``; the reference code is installed as ``pyautoattack`` and aliased here before the import.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from bench.classifiers.base import Classifier, ClassifierInfo
from bench.core.errors import BenchError
from bench.core.paths import weights_dir


def import_robustbench():
    """Import robustbench with ``autoattack`` aliased to ``pyautoattack``; quiet its deprecation noise."""
    if "autoattack" not in sys.modules:
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import robustbench.utils  # noqa: F401
        from robustbench.model_zoo import model_dicts
    return robustbench.utils, model_dicts


def load_robustbench(name: str, dataset: str = "cifar10", threat: str = "Linf") -> Classifier:
    utils, model_dicts = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)]
    if name not in zoo:
        raise BenchError(f"Unknown robustbench model {name!r} for {dataset}/{threat}; see robustbench's model zoo for names.")
    root = weights_dir() / "robustbench"
    path = root / dataset / threat / f"{name}.pt"
    if not path.is_file():
        raise BenchError(f"robustbench weights for {name} not found: put {name}.pt at {path} (robustbench.load_model downloads it there when online).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = utils.load_model(model_name=name, model_dir=str(root), dataset=dataset, threat_model=threat)
    info = ClassifierInfo(
        name=f"robustbench:{name}", architecture=type(net).__name__, dataset=dataset, num_classes=10,
        mean=None, std=None, training=f"robustbench-{threat}", train_eps=None,
        weights=f"robustbench/{dataset}/{threat}/{name}.pt", source="RobustBench model zoo",
    )
    return Classifier(net, info)  # zoo models normalize internally; inputs are [0, 1]
