"""NRP and JATP: a learned pre-processing network in front of a frozen classifier (``purifier -> classifier``).

- ``nrp``: NRP's purifier trained with self-supervised feature-distortion perturbations (Naseer et al. 2020).
- ``nrp-dynamic``: the same weights with Gaussian noise N(0, 0.05), projected into the 16/255 ball and clipped to
  [0, 1], before purification (NRP's "dynamic" inference); stochastic, so suites attack it with EOT.
- ``jatp``: the same network trained with JATP's joint adversarial training on full adversarial examples.
- ``jatp-obl``: JATP's loss on examples crafted against the bare classifier (the paper's "-obl" setting).

All are exactly differentiable end to end (no BPDA needed). Training: ``bench train --defense nrp|jatp|jatp-obl``
(``defenses/jatp_training.py``). The purifier is looked up for the classifier it was trained with:
``trained_with=NAME`` (a defense option, default = the classifier it now protects) evaluates a purifier trained
in front of one classifier in front of another (JATP Table 2's cross-model setting); the record keeps both.
Weights come from ``checkpoint=PATH``, else ``$BENCH_CHECKPOINT_DIR/<defense>/<trained_with>/purifier.weights.pt``,
else the small files shipped in ``defenses/checkpoints/`` (trained here, each beside its manifest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import nn

from bench.classifiers.base import load_state_dict
from bench.core.errors import BenchError
from bench.core.record import sha256_file
from defenses.base import SHIPPED_DIR, Card, Defense, checkpoint_display, register_defense, resolve_checkpoint
from defenses.jatp_training import preprocessing_checkpoint_folder
from defenses.nrp_network import NRPGenerator

BUNDLED_DIR = SHIPPED_DIR
WEIGHTS_FILE = "purifier.weights.pt"


def load_generator(path: Path) -> Tuple[NRPGenerator, Dict[str, Any]]:
    """The generator the manifest beside ``path`` describes (defaults without one), loaded strictly, and what
    the manifest says about its training."""
    manifest = path.with_name("purifier.manifest.json")
    shape = {"nf": 16, "gc": 8, "blocks": 3, "scale": 2}
    training: Dict[str, Any] = {}
    if manifest.is_file():
        config = json.loads(manifest.read_text())
        shape.update({k: v for k, v in config["config"]["generator"].items() if k in shape})
        training = {"classifier": config["config"].get("classifier"), "feature_layer": config["config"].get("feature_layer"),
                    "settings": config["config"].get("settings"), "epochs_done": len(config.get("history", []))}
    generator = NRPGenerator(**shape)
    try:
        generator.load_state_dict(load_state_dict(path, key="generator"), strict=True)
    except RuntimeError as exc:
        raise BenchError(f"{path} does not fit NRPGenerator{shape}: {str(exc).splitlines()[0][:160]}") from None
    return generator, training


class GaussianNoise(nn.Module):
    """x + N(0, sigma^2), fresh on every call, then (with ``radius``) projected into the linf ball of that radius
    around x and clipped to [0, 1]: NRP's dynamic inference as the authors' ``purify.py`` runs it (sigma 0.05,
    radius 16/255). Differentiable almost everywhere (the clip and projection pass gradients inside)."""

    stochastic = True
    differentiable = True

    def __init__(self, sigma: float, radius: Optional[float] = None) -> None:
        super().__init__()
        self.sigma, self.radius = sigma, radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noisy = x + self.sigma * torch.randn_like(x)
        if self.radius is None:
            return noisy
        return torch.min(torch.max(noisy, x - self.radius), x + self.radius).clamp(0.0, 1.0)


class PreprocessingDefense(Defense):
    """A trained ``NRPGenerator`` purifier in front of the classifier; subclasses name the training recipe."""

    version = "1"
    weights_name: ClassVar[str] = ""  # checkpoint folder of the training recipe
    noise_sigma: ClassVar[Optional[float]] = None
    noise_radius: ClassVar[Optional[float]] = None

    def __init__(self, classifier: nn.Module, checkpoint: Optional[str] = None, trained_with: Optional[str] = None,
                 untrained: bool = False) -> None:
        protected = getattr(getattr(classifier, "info", None), "name", "classifier")
        self.trained_with = trained_with or protected
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256 = "untrained", None
        self.training_info: Dict[str, Any] = {}
        generator = NRPGenerator()
        if not untrained:
            self.checkpoint_path, self.checkpoint_source = self._checkpoint(checkpoint)
            generator, self.training_info = load_generator(self.checkpoint_path)
            self.checkpoint_sha256 = sha256_file(self.checkpoint_path)
        transform = GaussianNoise(self.noise_sigma, self.noise_radius) if self.noise_sigma else None
        super().__init__(classifier, transform, generator.eval())
        self.purifier.requires_grad_(False)

    def _checkpoint(self, explicit: Optional[str]) -> Tuple[Path, str]:
        candidates = [(preprocessing_checkpoint_folder(self.weights_name, self.trained_with, root) / WEIGHTS_FILE, source)
                      for root, source in ((None, "trained"), (BUNDLED_DIR, "shipped"))]
        recipe = "jatp --oblivious" if self.weights_name == "jatp-obl" else self.weights_name
        return resolve_checkpoint(explicit, candidates,
            f"no trained {self.weights_name} purifier for classifier {self.trained_with} at {candidates[0][0]} (nor shipped); "
            f"train it with `bench train --defense {recipe} --classifier {self.trained_with}` or pass "
            f"--defense-option checkpoint=PATH")

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "PreprocessingDefense":
        defense = cls(classifier, untrained=True)
        with torch.no_grad():  # a non-identity purifier, so tests see the network act
            nn.init.normal_(defense.purifier.conv_last.weight, std=0.01)
        return defense

    def config(self) -> Dict[str, Any]:
        return {
            "recipe": self.weights_name, "trained_with": self.trained_with,
            "cross_model": self.trained_with != getattr(getattr(self.classifier, "info", None), "name", self.trained_with),
            "noise_sigma": self.noise_sigma, "noise_radius": self.noise_radius, "purifier": self.purifier.config(),
            "training": self.training_info,
            "checkpoint": checkpoint_display(self.checkpoint_path, self.checkpoint_source), "checkpoint_source": self.checkpoint_source, "checkpoint_sha256": self.checkpoint_sha256,
        }


NRP_CARD = Card(
    title="A Self-supervised Approach for Adversarial Robustness",
    authors="Muzammal Naseer, Salman Khan, Munawar Hayat, Fahad Shahbaz Khan, Fatih Porikli", venue="CVPR", year=2020,
    paper="https://arxiv.org/abs/2006.04924", code="https://github.com/Muzammal-Naseer/NRP",
    weights=("the NRP generator (3 RRDBs, 0.14M parameters) trained here against the PGD-trained ResNet-4b's features; "
             "manifest beside the weights; this project's own work"),
    differences=("a small generator trained for a few CPU epochs on the classifier's own features (NRP: a larger one, "
                 "VGG-16 features, long training); eps 2/255 at the classifier's training eps"),
)
JATP_CARD = Card(
    title="Improving White-box Robustness of Pre-processing Defenses via Joint Adversarial Training",
    authors="Dawei Zhou, Nannan Wang, Xinbo Gao, Bo Han, Jun Yu, Xiaoyu Wang, Tongliang Liu", venue="arXiv", year=2021,
    paper="https://arxiv.org/abs/2106.05453", code=None,
    weights=("NRP-style generators trained here with JATP's loss in front of the PGD-trained ResNet-4b (3 CPU epochs); "
             "manifests beside the weights; this project's own work"),
    differences=("trained at 2/255 in front of a ResNet-4b (the paper: 8/255, TRADES ResNet-18); pixel term as a per-pixel "
                 "mean square (Eq. 6 prints a per-image L2 norm): the shipped jatp and jatp-obl change pixels by 13.3/255 and "
                 "12.3/255 on average"),
)


@register_defense("nrp")
class NRP(PreprocessingDefense):
    """NRP's purifier (self-supervised feature-distortion training), deterministic inference."""

    card = NRP_CARD
    weights_name = "nrp"


@register_defense("nrp-dynamic")
class NRPDynamic(PreprocessingDefense):
    """NRP with dynamic inference: N(0, 0.05) noise, projected into the 16/255 ball around the input and clipped to
    [0, 1], before the purifier (stochastic). Version 2 adds the projection and clip of the authors' code."""

    version = "2"
    card = NRP_CARD
    weights_name = "nrp"
    noise_sigma = 0.05
    noise_radius = 16 / 255
    stochastic = True


@register_defense("jatp")
class JATP(PreprocessingDefense):
    """JATP: the NRP network trained jointly on full adversarial examples (Algorithm 1)."""

    paper_reference = ("JATP, paper Table 1: 43.25% under AutoAttack (TRADES ResNet-18, CIFAR-10, linf 8/255; None 44.10%, "
                       "NRP 18.51%); the purifiers shipped here barely move the image (docs/jatp-nrp.md)")
    card = JATP_CARD
    weights_name = "jatp"


@register_defense("jatp-obl")
class JATPOblivious(PreprocessingDefense):
    """JATP's loss, trained on examples crafted against the bare classifier (JATP Fig. 2a's -obl)."""

    card = JATP_CARD
    weights_name = "jatp-obl"
