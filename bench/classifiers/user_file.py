"""``file:<arch>:<path>``: a user's own state dict for one of the registered architectures.

The architecture fixes the input normalization (the statistics its registered checkpoints use, e.g.
ImageNet statistics for ``resnet20``), so a user's checkpoint must have been trained with the same.
"""

from __future__ import annotations

from pathlib import Path

from bench.classifiers.base import ARCHITECTURES, Classifier, ClassifierInfo, build_strict, load_state_dict
from bench.core.errors import BenchError


def load_user_file(spec: str) -> Classifier:
    arch_name, sep, path_text = spec.partition(":")
    if not sep or not path_text:
        raise BenchError(
            f"file classifiers are written file:<arch>:<path>, got 'file:{spec}'. "
            f"Architectures: {', '.join(ARCHITECTURES.names())}."
        )
    arch = ARCHITECTURES.get(arch_name)
    path = Path(path_text).expanduser()
    net = build_strict(arch.build(), load_state_dict(path, key="state_dict"), path)
    info = ClassifierInfo(
        name=f"file:{arch_name}:{path.name}", architecture=arch_name, dataset="cifar10", num_classes=10,
        mean=arch.mean, std=arch.std, training="unknown", train_eps=None, weights=str(path), source="user file",
    )
    return Classifier(net, info)
