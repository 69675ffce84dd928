"""The classifier wrapper and the two registries behind ``load_classifier``.

``ARCHITECTURES`` maps an architecture name to a constructor (used by ``file:`` checkpoints);
``CLASSIFIERS`` maps a classifier name to a loader returning a ready ``Classifier``. The wrapper takes
images in [0, 1], applies the checkpoint's normalization itself and stays frozen in eval mode.
"""

from __future__ import annotations

import hashlib

import pickle
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from bench.core.errors import BenchError
from bench.core.registry import Registry

ARCHITECTURES: Registry["Architecture"] = Registry("architecture", packages=["bench.classifiers"])
CLASSIFIERS: Registry[Callable[[], "Classifier"]] = Registry("classifier", packages=["bench.classifiers"])

Stats = Tuple[float, float, float]
IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
CIFAR10_MEAN: Stats = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Stats = (0.2471, 0.2435, 0.2616)


@dataclass(frozen=True)
class Architecture:
    """A network constructor and the input normalization its checkpoints expect."""

    build: Callable[[], nn.Module]
    mean: Optional[Stats]
    std: Optional[Stats]


@dataclass(frozen=True)
class ClassifierInfo:
    """What a record needs to know about a classifier."""

    name: str
    architecture: str
    dataset: str
    num_classes: int
    mean: Optional[Stats]
    std: Optional[Stats]
    training: str  # "standard" or e.g. "pgd-linf"
    train_eps: Optional[float]  # on the [0, 1] scale; None for standard training
    weights: str  # file the weights came from
    source: str
    # sha256 of the network's state dict (names and tensors), so weights replaced at the same path make another run
    # id and never join old boards or resume old state; filled by ``load_classifier``
    weights_sha256: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        if out["weights_sha256"] is None:
            out.pop("weights_sha256")
        return out


class Classifier(nn.Module):
    """A frozen network behind its own input normalization; inputs in [0, 1], NCHW, outputs logits."""

    def __init__(self, net: nn.Module, info: ClassifierInfo) -> None:
        super().__init__()
        self.net = net
        self.info = info
        shape = (1, 3, 1, 1)
        mean = torch.tensor(info.mean if info.mean else (0.0, 0.0, 0.0)).view(shape)
        std = torch.tensor(info.std if info.std else (1.0, 1.0, 1.0)).view(shape)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Classifier":
        """The classifier stays in eval mode: defenses train around it, never through its statistics."""
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load_state_dict(path: Path, key: Optional[str] = None) -> Mapping[str, torch.Tensor]:
    """Load a tensor-only checkpoint (``weights_only=True``), unwrap ``key`` and a ``module.`` prefix."""
    if not path.is_file():
        raise BenchError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"{path} is not a loadable weights-only checkpoint ({first[:160]})") from None
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if isinstance(obj, list) and len(obj) == 1:  # ERAN checkpoints wrap the state dict in a list
        obj = obj[0]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def half_precision(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors stored as float16 (integer buffers untouched), for shipping a file
    that loads into float32 modules at half the size."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def build_strict(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """Strict load with a one-line error when the checkpoint does not fit the architecture."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BenchError(f"{path} does not match architecture {type(net).__name__}: {first[:200]}") from None
    return net


def load_classifier(name: str, device: str | torch.device = "cpu") -> Classifier:
    """Return the frozen classifier called ``name`` on ``device``."""
    if name.startswith("robustbench:"):
        from bench.classifiers.robustbench_zoo import load_robustbench

        model = load_robustbench(name.removeprefix("robustbench:"))
    elif name.startswith("file:"):
        from bench.classifiers.user_file import load_user_file

        model = load_user_file(name.removeprefix("file:"))
    else:
        model = CLASSIFIERS.get(name)()
    if model.info.weights_sha256 is None:
        model.info = replace(model.info, weights_sha256=state_dict_sha256(model.net))
    return model.to(device)


def state_dict_sha256(net: nn.Module) -> str:
    """sha256 over a network's state dict, names and tensor bytes in key order (the same file gives the same hash on
    every machine; a changed tensor gives another)."""
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
