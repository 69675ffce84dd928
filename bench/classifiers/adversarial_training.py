"""Adversarially trained classifiers made here: ``bench train --defense adversarial-training`` and ``resnet20-at8``.

PGD adversarial training (Madry et al. 2018) of a CIFAR ResNet from scratch on the cifar10-jpeg training images:
each batch is attacked with linf PGD (``attack_steps`` steps of ``step_size``, random start, crafted with the network
in eval mode), then the network takes one SGD step on the cross-entropy of the adversarial batch. SGD with Nesterov
momentum 0.9 and weight decay 5e-4, the learning rate following one cosine cycle (a linear warm-up over the first 5%
to ``lr``, then down to 0), random crops (4-pixel padding) and horizontal flips, eps ramped up linearly over the
first ``eps_ramp`` fraction of training (0: none). A run writes ``classifier.pt``, its manifest and learning curve
(clean and PGD-10 accuracy on held-out training images) and, at the end, ``classifier.weights.pt``.

``resnet20-at8`` is the ResNet-20 trained this way at 8/255: it loads the weights you trained (under
``$BENCH_CHECKPOINT_DIR/classifiers/resnet20-at8/``) or the ones shipped in ``bench/classifiers/checkpoints/``. It is
the adversarially trained base that AID-Purifier's Table 3 needs (the paper's bases are trained at 8/255).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.classifiers.base import CLASSIFIERS, Classifier, ClassifierInfo, build_strict, load_state_dict
from bench.classifiers.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD, CifarResNet
from bench.core.errors import BenchError
from bench.training import TRAINERS, data_config, trainer_settings

SHIPPED = Path(__file__).with_name("checkpoints")
WEIGHTS_FILE = "classifier.weights.pt"
ARCHITECTURES = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


@dataclass(frozen=True)
class ATSettings:
    epochs: int = 30
    eps: float = 8 / 255
    attack_steps: int = 3
    step_size: Optional[float] = None  # default 2.5 * eps / attack_steps (Madry et al.'s ratio)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of training with a linear learning-rate warm-up
    eps_ramp: float = 0.0  # fraction of training over which eps grows from 0 to eps

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.attack_steps


class Normalized(nn.Module):
    """A network behind the ImageNet mean/std normalization the registered CIFAR ResNets use (trainable)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class ATTrainer:
    """PGD adversarial training of one network (the ``bench.training.train_epochs`` trainer interface)."""

    def __init__(self, settings: ATSettings, architecture: str, device: torch.device) -> None:
        if architecture not in ARCHITECTURES:
            raise BenchError(f"adversarial-training trains {', '.join(ARCHITECTURES)} from scratch, not {architecture!r}")
        self.s, self.device = settings, device
        self.model = Normalized(CifarResNet(ARCHITECTURES[architecture])).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay, nesterov=True)
        self.eps = settings.eps

    @property
    def eval_eps(self) -> float:
        """The learning curve's PGD-10 radius: the training eps, which is the threat this trainer defends against."""
        return self.s.eps

    def set_progress(self, progress: float) -> float:
        s = self.s
        if progress < s.warmup:
            lr = s.lr * progress / s.warmup
        else:
            lr = s.lr * 0.5 * (1 + math.cos(math.pi * (progress - s.warmup) / (1 - s.warmup)))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.eps = s.eps * min(1.0, progress / s.eps_ramp) if s.eps_ramp > 0 else s.eps
        return lr

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """linf PGD with a random start on the cross-entropy, crafted with the network in eval mode."""
        self.model.eval()
        alpha = self.s.alpha * self.eps / self.s.eps
        x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.s.attack_steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(self.model(x_adv), y), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - self.eps), x + self.eps).clamp(0, 1)
        return x_adv.detach()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        x_adv = self.attack(x, y)
        self.model.train()
        logits = self.model(x_adv)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item(), "adv_acc": (logits.argmax(1) == y).float().mean().item(), "eps": self.eps * 255}

    def state(self, epoch: int) -> Dict[str, object]:
        return {"model": self.model.net.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch}

    def load(self, state: Dict[str, object]) -> None:
        self.model.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])

    def weights(self) -> Dict[str, object]:
        return {"state_dict": self.model.net.state_dict()}

    def eval_model(self) -> nn.Module:
        self.model.eval()
        return self.model


def at_checkpoint_folder(name: str, root: Optional[Path] = None) -> Path:
    from bench.core.paths import checkpoint_dir

    return (checkpoint_dir() / "classifiers" if root is None else root) / name


def trained_name(architecture: str, eps: float) -> str:
    """``resnet20-at8`` for a ResNet-20 trained at 8/255."""
    return f"{architecture}-at{round(eps * 255):g}"


@TRAINERS.register("adversarial-training")
def train_adversarial(options) -> Path:
    """``bench train --defense adversarial-training --classifier resnet20 --eps 8/255``: a classifier trained from
    scratch with PGD adversarial training (``--classifier`` names the architecture; its pretrained weights are not
    used)."""
    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import train_epochs, training_subset
    from defenses.jatp_training import augment

    settings = trainer_settings(ATSettings, options)
    device = resolve_device(options.device)
    train = load_dataset(options.dataset, "train")
    indices = training_subset(len(train), options.train_size, options.seed)
    name = trained_name(options.classifier, settings.eps)
    folder = Path(options.out) if options.out else at_checkpoint_folder(name)
    torch.manual_seed(options.seed)
    trainer = ATTrainer(settings, options.classifier, device)
    config = {"defense": "adversarial-training", "classifier": name, "architecture": options.classifier,
              "settings": settings.to_dict(), **data_config(options, indices)}
    return train_epochs(options, trainer, folder, "classifier", config, settings.epochs, train, indices, augment)


def _trained(name: str, architecture: str, eps: float) -> Classifier:
    from bench.core.paths import CHECKPOINT_ENV, require_file

    candidates = [at_checkpoint_folder(name) / WEIGHTS_FILE, SHIPPED / name / WEIGHTS_FILE]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        require_file(candidates[0], f"{name} weights (train them with `bench train --defense adversarial-training "
                                    f"--classifier {architecture} --eps {round(eps * 255)}/255`)", CHECKPOINT_ENV)
    net = build_strict(CifarResNet(ARCHITECTURES[architecture]), load_state_dict(path, key="state_dict"), path)
    shown = path.relative_to(SHIPPED.parent.parent.parent).as_posix() if SHIPPED in path.parents else str(path)
    info = ClassifierInfo(name=name, architecture=architecture, dataset="cifar10", num_classes=10, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, training="pgd-linf", train_eps=eps, weights=shown,
                          source="trained here: bench train --defense adversarial-training (manifest beside the weights)")
    return Classifier(net, info)


CLASSIFIERS.add("resnet20-at8", lambda: _trained("resnet20-at8", "resnet20", 8 / 255))
