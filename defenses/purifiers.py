"""Purifier networks for 32x32 inputs, sized for CPU training.

Both take ``cat([x_t, mask], dim=1)`` (4 channels, from ``defenses.transforms``) and return an image in
[0, 1] (sigmoid output).

- ``GatedGenerator``: an inpainting generator in the spirit of DeepFill v2 (Yu et al. 2019): gated
  convolutions (features * sigmoid(gate)) where the mask enters each scale, so the network learns where
  the input is unreliable, dilated convolutions at 8x8 for context, and U-Net skips.
  Trained against ``PatchDiscriminator`` (spectral-norm PatchGAN, hinge loss) plus L1 (AToP's L_df).
- ``MaskedAutoencoder``: a plain convolutional encoder-decoder (no gating, no adversary) trained with a
  reconstruction loss, the AE-based purifier family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class GatedConv(nn.Module):
    """conv -> ELU(features) * sigmoid(gate)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel, stride, dilation * (kernel // 2), dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, gate = self.conv(x).chunk(2, dim=1)
        return F.elu(features) * torch.sigmoid(gate)


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation), nn.ReLU(inplace=True))


class GatedGenerator(nn.Module):
    """4 -> 3 channel inpainting U-Net, 32x32 -> 16x16 -> 8x8 (dilated context) -> back up.

    The first convolution of every scale is gated, so the network learns from the mask channel which
    inputs to trust (DeepFill v2's idea); the rest are plain convolutions, which train much faster on a
    CPU than a fully gated stack (a fully gated 16-wide version stayed near chance accuracy after two
    epochs, see docs/atop.md). Bilinear upsampling and skip connections keep kept pixels sharp.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(GatedConv(4, w, 5), _conv(w, w))
        self.enc2 = nn.Sequential(GatedConv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(GatedConv(2 * w, 4 * w, stride=2), _conv(4 * w, 4 * w, dilation=2),
                                 _conv(4 * w, 4 * w, dilation=4), _conv(4 * w, 4 * w))
        self.dec2 = nn.Sequential(_conv(6 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec1 = nn.Sequential(_conv(3 * w, w), _conv(w, w))
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([_up(self.mid(e2)), e2], dim=1))
        d1 = self.dec1(torch.cat([_up(d2), e1], dim=1))
        return torch.sigmoid(self.out(d1))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class PatchDiscriminator(nn.Module):
    """Spectral-norm PatchGAN on the image: one realness score per 8x8 receptive patch.

    DeepFill v2 also feeds the mask; we do not, because RT3's aggregated output has no single mask.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers = []
        for c_in, c_out in ((3, w), (w, 2 * w), (2 * w, 4 * w)):
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(4 * w, 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class MaskedAutoencoder(nn.Module):
    """4 -> 3 channel convolutional autoencoder: 32x32 -> 8x8 bottleneck -> 32x32, no skips, no gating."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(4, w, 3, 1, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.ReLU(), nn.Conv2d(4 * w, 4 * w, 3, 1, 1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(w, 3, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


PURIFIERS = {"gan": GatedGenerator, "ae": MaskedAutoencoder}


def purifier_from_state(kind: str, state) -> nn.Module:
    """The purifier network of ``kind`` sized for ``state``: the width is read from the first convolution's weights,
    so checkpoints trained at any ``--width`` load without a separate setting."""
    first = state["enc1.0.conv.weight"] if kind == "gan" else state["encoder.0.weight"]
    width = first.shape[0] // 2 if kind == "gan" else first.shape[0]
    return PURIFIERS[kind](width=width)
