"""AID-Purifier (Hwang et al., ``papers/002_41b00f17c167c020.txt``): a light discriminator on two layers of a frozen
classifier, trained with AVmixup, that purifies by iterative sign-gradient descent on its own p_adv.

- ``AIDDiscriminator`` (Sec. 3.1, App. A.2): global-average-pooled features of the classifier's first convolution
  (h_low) and its last residual block (h_high), taken with forward hooks; per branch Linear 1024-ReLU x 3 (Table 5's
  two plus the extra CIFAR layer), concatenation (2048), Linear 1024-ReLU x 2 (Table 5's one plus the extra CIFAR
  layer), Linear 512-ReLU, Linear 1; sigmoid gives p_adv. Trained with BCE (Eq. 1).
- ``AIDPurification`` (Algorithm 2, Table 6): N = 10 steps of ``x <- clip(x - alpha * sign(grad p_adv))`` within
  the eps-ball of the input and [0, 1]; eps 8/255, alpha 2/255 for CIFAR-10. Applied to every input.
  ``sign`` makes it not usefully differentiable: it declares ``differentiable = False`` and the identity as its
  BPDA surrogate. ``unrolled=True`` (the ``aid-purifier-unrolled`` defense) instead keeps the whole loop in the
  autograd graph (``create_graph=True``), so attacks get the exact gradient of the purification as computed.
  Since ``sign`` has zero derivative, that exact Jacobian is a 0/1 diagonal (0 where a pixel was clamped to
  [0, 1]) and the second-order terms vanish: measured, the unrolled and the BPDA input gradients have cosine 0.997.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import BenchError
from defenses.nrp_network import _resolve


def aid_layers(classifier: nn.Module) -> Tuple[str, str]:
    """(h_low, h_high) module names: the first convolution and the last residual stage of the classifier's net."""
    net = getattr(classifier, "net", classifier)
    stages: List[str] = [n for n in ("layer1", "layer2", "layer3", "layer4") if getattr(net, n, None) is not None]
    if hasattr(net, "conv1") and stages:
        return "conv1", stages[-1]
    raise BenchError(f"no default AID-Purifier layers for {type(net).__name__}; pass layers=(low, high) module names")


class TwoLayerTap:
    """Runs the classifier and returns the globally average-pooled outputs of two of its modules."""

    def __init__(self, classifier: nn.Module, layers: Optional[Tuple[str, str]] = None) -> None:
        self.classifier = classifier
        self.layers = tuple(layers) if layers else aid_layers(classifier)
        net = getattr(classifier, "net", classifier)
        self.modules = [_resolve(net, name) for name in self.layers]

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, pooled h_low, pooled h_high)."""
        captured: Dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i, out))
                   for i, m in enumerate(self.modules)]
        try:
            logits = self.classifier(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, captured[0].mean(dim=(2, 3)), captured[1].mean(dim=(2, 3))

    def channels(self, shape=(1, 3, 32, 32)) -> Tuple[int, int]:
        with torch.no_grad():
            _, low, high = self(torch.zeros(shape, device=next(iter(self.classifier.buffers()), torch.zeros(0)).device))
        return low.shape[1], high.shape[1]


def _mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for c_in, c_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(c_in, c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class AIDDiscriminator(nn.Module):
    """D(h_low, h_high) -> logit of p_adv (App. A.2, CIFAR variant with the extra layer before and after concat)."""

    def __init__(self, low_channels: int, high_channels: int, width: int = 1024, cifar: bool = True) -> None:
        super().__init__()
        depth = 3 if cifar else 2
        self.low = _mlp([low_channels] + [width] * depth)
        self.high = _mlp([high_channels] + [width] * depth)
        self.head = nn.Sequential(_mlp([2 * width] + [width] * (2 if cifar else 1) + [512]), nn.Linear(512, 1))
        self.low_channels, self.high_channels, self.width, self.cifar = low_channels, high_channels, width, cifar
        # He initialisation (the paper does not say): PyTorch's default Linear init shrinks the signal's variance
        # about 6x per ReLU layer, so after these 6 layers D's output was the same for every input and SGD at
        # lr 0.01 did not move it in 60 steps on ResNet-4b features (measured).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, h_low: torch.Tensor, h_high: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.low(h_low), self.high(h_high)], dim=1)).squeeze(1)

    def config(self) -> Dict[str, Any]:
        return {"low_channels": self.low_channels, "high_channels": self.high_channels, "width": self.width,
                "cifar": self.cifar, "parameters": sum(p.numel() for p in self.parameters())}


class AIDPurification(nn.Module):
    """Algorithm 2 as a purifier stage; ``unrolled`` keeps the loop differentiable (second-order autograd).

    ``surrogate`` says what the unrolled loop differentiates in place of sign(g), whose derivative is zero: ``"sign"``
    (exact, so the loop's gradient is the projection's alone and equals BPDA's) or ``"tanh"`` (a straight-through
    smooth sign: the forward still steps by sign(g), the backward by d tanh(g / tau) with tau = ``tau`` times the
    example's mean |g|, so the attack sees how the purification's steps move with the input)."""

    def __init__(self, tap: TwoLayerTap, discriminator: AIDDiscriminator, steps: int = 10, eps: float = 8 / 255,
                 step_size: float = 2 / 255, unrolled: bool = False, surrogate: str = "sign", tau: float = 1.0) -> None:
        super().__init__()
        if surrogate not in ("sign", "tanh") or tau <= 0:
            raise BenchError(f"aid-purifier: surrogate must be sign or tanh and tau > 0, got {surrogate}, {tau}")
        self.tap, self.discriminator = tap, discriminator
        self.steps, self.eps, self.step_size, self.unrolled = steps, eps, step_size, unrolled
        self.sign_surrogate, self.tau = surrogate, tau  # not ``surrogate``: that names a stage's BPDA stand-in
        self.differentiable = unrolled

    def p_adv_logit(self, x: torch.Tensor) -> torch.Tensor:
        _, low, high = self.tap(x)
        return self.discriminator(low, high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep_graph = self.unrolled and torch.is_grad_enabled() and x.requires_grad
        if keep_graph:
            return self._purify(x, x, True)
        # the loop needs input gradients even when the caller evaluates under no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            x0 = x.detach().clone()
            return self._purify(x0, x0, False).detach()

    def _purify(self, x0: torch.Tensor, x_pur: torch.Tensor, keep_graph: bool) -> torch.Tensor:
        for _ in range(self.steps):
            if not keep_graph:
                x_pur = x_pur.detach().requires_grad_(True)
            p_adv = torch.sigmoid(self.p_adv_logit(x_pur))
            (grad,) = torch.autograd.grad(p_adv.sum(), x_pur, create_graph=keep_graph)
            x_pur = x_pur - self.step_size * self._sign(grad, keep_graph)
            x_pur = torch.min(torch.max(x_pur, x0 - self.eps), x0 + self.eps).clamp(0, 1)
        return x_pur

    def _sign(self, grad: torch.Tensor, keep_graph: bool) -> torch.Tensor:
        """sign(g) in the forward; in an unrolled graph with the tanh surrogate, d tanh(g / tau) in the backward."""
        if not keep_graph or self.sign_surrogate == "sign":
            return grad.sign()
        tau = self.tau * grad.detach().abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        smooth = torch.tanh(grad / tau)
        return grad.sign().detach() + smooth - smooth.detach()

    def config(self) -> Dict[str, Any]:
        return {"steps": self.steps, "eps": self.eps, "step_size": self.step_size, "unrolled": self.unrolled,
                "layers": list(self.tap.layers),
                **({"surrogate": f"tanh (tau {self.tau:g} x mean |g|)" if self.sign_surrogate == "tanh" else "sign"}
                   if self.unrolled else {})}


def avmixup(x: torch.Tensor, delta: torch.Tensor, gamma: float, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, lines 6-9: x_AV = x + gamma * delta; x_hat = u x + (1 - u) x_AV; t_hat = u * 0 + (1 - u) * 1.

    ``u`` holds one draw per example. x_AV may leave [0, 1] and the gamma-ball, as in AVmixup.
    """
    x_av = x + gamma * delta
    view = u.view(-1, *([1] * (x.dim() - 1)))
    return view * x + (1 - view) * x_av, 1 - u


def discriminator_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with soft targets: BCE between sigmoid(logits) = p_adv and t_hat."""
    return F.binary_cross_entropy_with_logits(logits, targets)


# --- the defenses ------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from bench.classifiers.base import load_state_dict  # noqa: E402
from bench.core.record import sha256_file  # noqa: E402
from defenses.base import (  # noqa: E402
    SHIPPED_DIR, Card, Defense, checkpoint_display, manifest_training, register_defense, resolve_checkpoint)

WEIGHTS_FILE = "discriminator.weights.pt"
#: Below this clean-vs-PGD separation on its training data (the manifest's last epoch) a discriminator is near chance:
#: records made with it are marked unreliable (``AIDPurifier.known_problems``).
MIN_SEPARATION = 0.6


def read_manifest(weights: Optional[Path]) -> Dict[str, Any]:
    """The training manifest beside ``<name>.weights.pt`` (or a ``.pt`` checkpoint), or {} when there is none."""
    if weights is None:
        return {}
    import json

    for name in (weights.name.replace(".weights.pt", ".manifest.json"), weights.with_suffix(".manifest.json").name):
        path = weights.with_name(name)
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def aid_checkpoint_folder(classifier: str, root: Optional[Path] = None) -> Path:
    from bench.core.paths import checkpoint_dir

    return (checkpoint_dir() if root is None else root) / "aid-purifier" / classifier.replace(":", "-")


@register_defense("aid-purifier")
class AIDPurifier(Defense):
    """AID-Purifier in front of (and reading from) the classifier; BPDA identity for attacks (not differentiable)."""

    version = "1"
    card = Card(
        title="AID-Purifier: A Light Auxiliary Network for Boosting Adversarial Defense",
        authors="Duhun Hwang, Eunjung Lee, Wonjong Rhee", venue="ICML Workshop on Adversarial Machine Learning", year=2021,
        paper="https://arxiv.org/abs/2107.06456", code=None,
        weights=("discriminators (7.9M parameters) trained here for one CPU epoch with AVmixup on the cifar10-jpeg "
                 "training images, one per classifier; manifests beside the weights; this project's own work"),
        differences=("the bases are the shared standard ResNet-20, a ResNet-4b PGD-trained at 2/255 and resnet20-at8, "
                     "PGD-trained here at 8/255 like the paper's bases; the discriminators on both adversarially trained "
                     "bases are near chance (53.6% and 52.5% separation; records say so); "
                     "the implementation follows the ICLR 2022 submission's text"),
    )
    paper_reference = ("AID-Purifier, paper Table 3: 52.65% worst white-box robust on CIFAR-10 (Madry base, 51.64% alone); "
                       "the discriminators shipped here were trained for one CPU epoch")
    unrolled = False
    sign_surrogate = "sign"

    def __init__(self, classifier: nn.Module, checkpoint: Optional[str] = None, steps: int = 10, eps: float = 8 / 255,
                 step_size: float = 2 / 255, layers: Optional[Tuple[str, str]] = None, untrained: bool = False,
                 tau: float = 1.0) -> None:
        tap = TwoLayerTap(classifier, layers)
        low, high = tap.channels()
        discriminator = AIDDiscriminator(low, high)
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256 = "untrained", None
        self._manifest: Dict[str, Any] = {}
        if not untrained:
            self.checkpoint_path, self.checkpoint_source = self._checkpoint(classifier, checkpoint)
            self._manifest = read_manifest(self.checkpoint_path)
            trained_on = self._manifest.get("config", {}).get("layers")
            if trained_on and list(trained_on) != list(tap.layers):
                raise BenchError(f"aid-purifier: the discriminator at {self.checkpoint_path} was trained on layers "
                                 f"{trained_on}, not {list(tap.layers)}; drop the layers option or train one for those")
            discriminator.load_state_dict(load_state_dict(self.checkpoint_path, key="discriminator"), strict=True)
            self.checkpoint_sha256 = sha256_file(self.checkpoint_path)
        purification = AIDPurification(tap, discriminator.eval(), int(steps), float(eps), float(step_size), self.unrolled,
                                       self.sign_surrogate, float(tau))
        super().__init__(classifier, purifier=purification)
        self.purifier.requires_grad_(False)

    def known_problems(self) -> List[str]:
        """A discriminator that barely separates clean from PGD inputs on its own training data purifies by noise."""
        last = (self._manifest.get("history") or [{}])[-1]
        separation = last.get("separation")
        if separation is not None and separation < MIN_SEPARATION:
            return [f"its discriminator separates clean from PGD inputs on {100 * separation:.1f}% of its training pairs "
                    f"(manifest; below {100 * MIN_SEPARATION:.0f}%, near chance): its purification steps follow noise"]
        return []

    @staticmethod
    def _checkpoint(classifier: nn.Module, explicit: Optional[str]) -> Tuple[Path, str]:
        name = getattr(getattr(classifier, "info", None), "name", "classifier")
        candidates = [(aid_checkpoint_folder(name) / WEIGHTS_FILE, "trained"),
                      (aid_checkpoint_folder(name, SHIPPED_DIR) / WEIGHTS_FILE, "shipped")]
        return resolve_checkpoint(explicit, candidates, (
            f"no trained AID-Purifier discriminator for {name} at {candidates[0][0]} (nor shipped); train it with "
            f"`bench train --defense aid-purifier --classifier {name}` or pass --defense-option checkpoint=PATH"))

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "AIDPurifier":
        net = getattr(classifier, "net", classifier)
        layers = None if hasattr(net, "conv1") else ("conv", "conv")  # tests' TinyNet has a single convolution
        return cls(classifier, untrained=True, layers=layers)

    def config(self) -> Dict[str, Any]:
        shown = checkpoint_display(self.checkpoint_path, self.checkpoint_source)
        return {**self.purifier.config(), "discriminator": self.purifier.discriminator.config(), "checkpoint": shown,
                "checkpoint_source": self.checkpoint_source, "checkpoint_sha256": self.checkpoint_sha256,
                "training": manifest_training(self.checkpoint_path)}


@register_defense("aid-purifier-unrolled")
class AIDPurifierUnrolled(AIDPurifier):
    """The same purifier and forward, with its 10-step loop kept in the autograd graph and sign(g) differentiated as
    tanh(g / tau) (straight-through): the exact derivative of sign is zero, which would make the unrolled gradient
    BPDA's; the smooth surrogate lets the attack see how the purification's steps move with its input."""

    unrolled = True
    sign_surrogate = "tanh"
