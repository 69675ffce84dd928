"""The pre-processing network shared by NRP (Naseer et al. 2020) and JATP, and the feature taps both train with.

``NRPGenerator`` follows NRP's purifier: a first convolution, a trunk of *basic blocks* (Residual-in-Residual
Dense Blocks, RRDB, from ESRGAN: three dense blocks of five convolutions with growth ``gc``, LeakyReLU 0.2,
residuals scaled by 0.2), a trunk convolution with a long skip, then two output convolutions, all at full
resolution. JATP (Sec. 4.1) uses "the basic block in the original paper", three of them; so do we.

Deviations, sized for a CPU (see docs/jatp-nrp.md): width ``nf=16`` and growth ``gc=8`` instead of 64/32,
and the trunk runs at half resolution (a stride-2 first convolution, a pixel-shuffle output) -- together about
60x fewer multiply-adds; at full resolution one forward+backward of batch 128 took 1.65 s here, 125x the
PGD-trained ResNet-4b behind it, too slow to attack with AutoAttack on 2 cores. The output is a residual on
the input, ``clamp(x + g(x), 0, 1)``, with the last convolution initialised to zero, so an untrained purifier
is the identity and short training starts from the bare classifier's behaviour, not from a random image.

``feature_layer`` names the internal layer whose output both methods use: JATP's "end of the third stage" of
a ResNet-18 (its 3rd of 4 residual stages, the second to last). Every classifier family maps to the stage at
the same relative place: the second-to-last residual stage, or the stem when there is only one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import BenchError


class DenseBlock(nn.Module):
    """Residual dense block: five 3x3 convolutions, each seeing all earlier outputs; residual scaled by 0.2."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(features, dim=1))
            if i < 4:
                features.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, residual scaled by 0.2 (NRP's basic block)."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class NRPGenerator(nn.Module):
    """3 -> 3 channel purifier on images in [0, 1]: ``clamp(x + g(x), 0, 1)``, identity when untrained.

    ``scale`` is the trunk's downsampling (1 = NRP's full resolution, 2 = the CPU default).
    """

    def __init__(self, nf: int = 16, gc: int = 8, blocks: int = 3, scale: int = 2) -> None:
        super().__init__()
        self.nf, self.gc, self.n_blocks, self.scale = nf, gc, blocks, scale
        self.conv_first = nn.Conv2d(3, nf, 3, scale, 1)
        self.trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(blocks)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.hr_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1)
        self.shuffle = nn.PixelShuffle(scale)
        nn.init.zeros_(self.conv_last.weight)
        nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.trunk(fea))
        residual = self.shuffle(self.conv_last(F.leaky_relu(self.hr_conv(fea), 0.2)))
        return (x + residual).clamp(0, 1)

    def config(self) -> dict:
        return {"architecture": "NRPGenerator (RRDB trunk, residual output)", "nf": self.nf, "gc": self.gc,
                "blocks": self.n_blocks, "scale": self.scale, "parameters": sum(p.numel() for p in self.parameters())}


class RelativisticDiscriminator(nn.Module):
    """A small strided CNN giving one realness logit per image; used in pairs, relativistically (RaGAN)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(w, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def relativistic_losses(real_logits: torch.Tensor, fake_logits: torch.Tensor):
    """(discriminator loss, generator loss) of the relativistic average GAN (ESRGAN, used by NRP).

    D_ra(a, b) = sigmoid(C(a) - mean C(b)). The discriminator wants D_ra(real, fake) = 1 and
    D_ra(fake, real) = 0; the generator wants the opposite.
    """
    real_rel = real_logits - fake_logits.mean()
    fake_rel = fake_logits - real_logits.mean()
    ones, zeros = torch.ones_like(real_rel), torch.zeros_like(fake_rel)
    d_loss = (F.binary_cross_entropy_with_logits(real_rel, ones) + F.binary_cross_entropy_with_logits(fake_rel, zeros)) / 2
    g_loss = (F.binary_cross_entropy_with_logits(real_rel, zeros) + F.binary_cross_entropy_with_logits(fake_rel, ones)) / 2
    return d_loss, g_loss


def _resolve(net: nn.Module, dotted: str) -> nn.Module:
    module = net
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise BenchError(f"feature layer {dotted!r}: {type(net).__name__} has no submodule {part!r}")
        module = getattr(module, part)
    return module


def default_feature_layer(classifier: nn.Module) -> str:
    """The second-to-last residual stage of the classifier's network (ResNet-18: ``layer3``, JATP's choice)."""
    net = getattr(classifier, "net", classifier)
    stages: List[str] = [name for name in ("layer1", "layer2", "layer3", "layer4") if getattr(net, name, None) is not None]
    if len(stages) >= 2:
        return stages[-2]
    if stages:
        return "conv1" if hasattr(net, "conv1") else stages[0]
    blocks = [name for name in ("block1", "block2", "block3") if getattr(net, name, None) is not None]  # WideResNet
    if len(blocks) >= 2:
        return blocks[-2]
    raise BenchError(f"no default feature layer for {type(net).__name__}; pass feature_layer=<dotted module name>")


class FeatureTap:
    """Run the classifier and capture the output of one internal layer (a forward hook on ``net.<layer>``).

    ``layer="logits"`` uses the output itself, for classifiers without named internal stages.
    """

    def __init__(self, classifier: nn.Module, layer: Optional[str] = None) -> None:
        self.classifier = classifier
        self.layer = layer or default_feature_layer(classifier)
        self.module = None if self.layer == "logits" else _resolve(getattr(classifier, "net", classifier), self.layer)

    @contextmanager
    def _hook(self) -> Iterator[list]:
        captured: list = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            yield captured
        finally:
            handle.remove()

    def __call__(self, x: torch.Tensor):
        """(logits, features) of ``x``."""
        if self.module is None:
            logits = self.classifier(x)
            return logits, logits
        with self._hook() as captured:
            logits = self.classifier(x)
        return logits, captured[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[1]
