"""PixelDefend (Song et al. 2018): purify an image towards the high-density region of a PixelCNN, pixel by pixel.

The density model (``PixelCNN``) is a small PixelCNN (van den Oord et al. 2016) over 8-bit values:
``layers`` masked 3x3 convolutions (the first excludes the current pixel, mask A; the others include it, mask B),
then two 1x1 convolutions to 256 logits for each of R, G and B. The three channels of one pixel are ordered
R -> G -> B through learned tables added to the logits (``logits_G += E_RG[R]``, ``logits_B += E_RB[R] + E_GB[G]``),
an exact autoregressive factorisation p(R|<i) p(G|R,<i) p(B|R,G,<i) that needs one network pass per pixel, not
three. Deviations from the paper (PixelCNN++ with a discretised logistic mixture, 3.0 bits/dim on CIFAR-10): a
256-way softmax, a much smaller network (trainable on a CPU) and a worse density (its test bits/dim is in the
checkpoint manifest and ``docs/aid-purifier.md``).

Purification (the paper's Algorithm 1): in raster order, each channel of each pixel is set to its most likely value
under the PixelCNN, given the pixels already purified, among the values within ``eps_defend`` (16/255) of the
input's. Each step reads only the PixelCNN's output at one pixel, whose receptive field is the ``layers`` rows
above and ``layers`` columns on either side: ``PixelCNN.window_logits`` computes exactly that window (values
outside the image masked to zero after every layer, as zero padding does on the full image), so one pixel costs
a pass over a (layers+1) x (2 layers+1) window instead of the whole image. A test checks the windowed logits
equal the full-image ones.

The purification is a discrete search: it has no useful gradient (``differentiable = False``); attacks use
BPDA with the identity.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A 3x3 convolution that sees only the rows above and the pixels to the left (and, for mask B, the centre)."""

    def __init__(self, c_in: int, c_out: int, mask: str, kernel: int = 3) -> None:
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        k = kernel // 2
        m = torch.ones(kernel, kernel)
        m[k, k + (mask == "B"):] = 0
        m[k + 1:] = 0
        self.register_buffer("mask", m[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> integer levels 0..255."""
    return (x.clamp(0, 1) * 255).round().long()


class PixelCNN(nn.Module):
    """p(x) = prod_i p(R_i | x_<i) p(G_i | R_i, x_<i) p(B_i | R_i, G_i, x_<i) over 8-bit values."""

    def __init__(self, channels: int = 32, layers: int = 5) -> None:
        super().__init__()
        self.channels, self.layers = channels, layers
        self.convs = nn.ModuleList([MaskedConv2d(3, channels, "A")] +
                                   [MaskedConv2d(channels, channels, "B") for _ in range(layers - 1)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 3 * 256, 1))
        self.rg, self.rb, self.gb = (nn.Embedding(256, 256) for _ in range(3))
        for table in (self.rg, self.rb, self.gb):
            nn.init.zeros_(table.weight)

    @staticmethod
    def scale(levels: torch.Tensor) -> torch.Tensor:
        return levels.float() / 127.5 - 1

    def trunk(self, h: torch.Tensor, inside: Optional[torch.Tensor] = None) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            h = conv(h if i == 0 else F.relu(h))
            if inside is not None:
                h = h * inside
        return self.head(h)

    def context_logits(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, H, W): each channel's logits from the pixels before it in raster order (no intra-pixel term)."""
        out = self.trunk(self.scale(levels))
        b, _, h, w = out.shape
        return out.view(b, 3, 256, h, w)

    def logits(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, H, W): the full conditional logits, with the R -> G -> B terms of the pixel's own values."""
        out = self.context_logits(levels)
        r, g = levels[:, 0], levels[:, 1]
        extra_g = self.rg(r).permute(0, 3, 1, 2)
        extra_b = (self.rb(r) + self.gb(g)).permute(0, 3, 1, 2)
        return torch.stack([out[:, 0], out[:, 1] + extra_g, out[:, 2] + extra_b], dim=1)

    def nll(self, levels: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per sub-pixel, in nats."""
        return F.cross_entropy(self.logits(levels).flatten(3).transpose(2, 3).reshape(-1, 256),
                               levels.flatten(2).reshape(-1))

    def window_logits(self, padded: torch.Tensor, inside: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """(B, 3, 256) context logits at image pixel (row, col), from the window of its receptive field.

        ``padded`` is the scaled image zero-padded by ``layers`` on the top, left and right, ``inside`` the
        matching 0/1 map of real pixels (both from ``pad``). Each layer is computed only where the next one reads
        it: unpadded convolutions shrink the window by one row (top) and one column (each side) per layer, down to
        the single pixel the head needs."""
        k = self.layers
        h = padded[:, :, row:row + k + 1, col:col + 2 * k + 1]
        mask = inside[:, :, row:row + k + 1, col:col + 2 * k + 1]
        for i, conv in enumerate(self.convs):
            h = h if i == 0 else F.relu(h)
            # the kernel's bottom row is masked out: the zero row below only keeps the output's height
            h = F.conv2d(F.pad(h, (0, 0, 0, 1)), conv.weight * conv.mask, conv.bias)
            h = h * mask[:, :, i + 1:, i + 1:mask.shape[3] - i - 1]
        return self.head(h).view(-1, 3, 256)

    def pad(self, levels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k = self.layers
        padded = F.pad(self.scale(levels), (k, k, k, 0))
        inside = F.pad(torch.ones_like(levels[:, :1], dtype=padded.dtype), (k, k, k, 0))
        return padded, inside

    def config(self) -> Dict[str, Any]:
        return {"channels": self.channels, "layers": self.layers, "parameters": sum(p.numel() for p in self.parameters())}


def bits_per_dim(nll_nats: float) -> float:
    return nll_nats / math.log(2)


class PixelDefendPurification(nn.Module):
    """Algorithm 1 of PixelDefend: greedy per-channel argmax within eps_defend, in raster order."""

    differentiable = False  # discrete search; the BPDA surrogate is the identity (no ``surrogate`` attribute)

    def __init__(self, pixelcnn: PixelCNN, eps_defend: float = 16 / 255) -> None:
        super().__init__()
        self.pixelcnn, self.eps_defend = pixelcnn, eps_defend
        self.radius = int(round(eps_defend * 255))

    @torch.no_grad()
    def purify_levels(self, levels: torch.Tensor) -> torch.Tensor:
        net, k = self.pixelcnn, self.pixelcnn.layers
        values = torch.arange(256, device=levels.device)
        low, high = (levels - self.radius).clamp(0, 255), (levels + self.radius).clamp(0, 255)
        out = levels.clone()
        padded, inside = net.pad(out)
        _, _, height, width = levels.shape

        def choose(logit: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
            allowed = (values[None] >= lo[:, None]) & (values[None] <= hi[:, None])
            return logit.masked_fill(~allowed, float("-inf")).argmax(1)

        for r in range(height):
            for c in range(width):
                base = net.window_logits(padded, inside, r, c)
                lo, hi = low[:, :, r, c], high[:, :, r, c]
                red = choose(base[:, 0], lo[:, 0], hi[:, 0])
                green = choose(base[:, 1] + net.rg(red), lo[:, 1], hi[:, 1])
                blue = choose(base[:, 2] + net.rb(red) + net.gb(green), lo[:, 2], hi[:, 2])
                pixel = torch.stack([red, green, blue], 1)
                out[:, :, r, c] = pixel
                padded[:, :, r + k, c + k] = net.scale(pixel)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify_levels(to_levels(x.detach())).float().div(255)

    def config(self) -> Dict[str, Any]:
        return {"eps_defend": self.eps_defend, "eps_defend_levels": self.radius, "pixelcnn": self.pixelcnn.config()}


# --- the defense ---------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from bench.classifiers.base import load_state_dict  # noqa: E402
from bench.training import sha256_file  # noqa: E402
from defenses.base import (  # noqa: E402
    SHIPPED_DIR, Card, Defense, checkpoint_display, manifest_training, register_defense, resolve_checkpoint)

WEIGHTS_FILE = "pixelcnn.weights.pt"


def pixelcnn_folder(dataset: str = "cifar10-jpeg", root: Optional[Path] = None) -> Path:
    """Where ``bench train --defense pixeldefend`` writes the PixelCNN (one per training set, not per classifier)."""
    from bench.core.paths import checkpoint_dir

    return (checkpoint_dir() if root is None else root) / "pixeldefend" / dataset


@register_defense("pixeldefend")
class PixelDefend(Defense):
    """PixelDefend in front of any classifier (its PixelCNN does not depend on the classifier)."""

    version = "1"
    card = Card(
        title="PixelDefend: Leveraging Generative Models to Understand and Defend against Adversarial Examples",
        authors="Yang Song, Taesup Kim, Sebastian Nowozin, Stefano Ermon, Nate Kushman", venue="ICLR", year=2018,
        paper="https://arxiv.org/abs/1710.10766", code="https://github.com/microsoft/PixelDefend",
        weights=("a gated PixelCNN (32 channels, 5 layers) trained here for one CPU epoch on 40k cifar10-jpeg training "
                 "images; manifest beside the weights; this project's own work"),
        differences=("a small PixelCNN (6.13 bits/dim on the test images; the paper: PixelCNN++, 2.92); the greedy "
                     "purification is the paper's (eps_defend 16/255)"),
    )
    paper_reference = ("PixelDefend (Song et al. 2018); about 9% under BPDA on CIFAR-10 at 8/255 (Athalye et al. 2018); "
                       "the PixelCNN shipped here is small (6.13 bits/dim, PixelCNN++ reports 2.92)")

    def __init__(self, classifier: nn.Module, checkpoint: Optional[str] = None, eps_defend: float = 16 / 255,
                 dataset: str = "cifar10-jpeg", untrained: bool = False, channels: int = 32, layers: int = 5) -> None:
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256, self.test_bits_per_dim = "untrained", None, None
        if untrained:
            pixelcnn = PixelCNN(int(channels), int(layers))
        else:
            candidates = [(pixelcnn_folder(dataset) / WEIGHTS_FILE, "trained"),
                          (pixelcnn_folder(dataset, SHIPPED_DIR) / WEIGHTS_FILE, "shipped")]
            self.checkpoint_path, self.checkpoint_source = resolve_checkpoint(checkpoint, candidates, (
                f"no trained PixelCNN for {dataset} at {candidates[0][0]} (nor shipped); train it with "
                f"`bench train --defense pixeldefend --dataset {dataset}` or pass --defense-option checkpoint=PATH"))
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            pixelcnn = PixelCNN(**state["architecture"])
            pixelcnn.load_state_dict(load_state_dict(self.checkpoint_path, key="pixelcnn"), strict=True)
            self.checkpoint_sha256 = sha256_file(self.checkpoint_path)
            self.test_bits_per_dim = state.get("test_bits_per_dim")
        pixelcnn = pixelcnn.to(next(iter(classifier.buffers()), torch.zeros(0)).device).eval().requires_grad_(False)
        super().__init__(classifier, purifier=PixelDefendPurification(pixelcnn, float(eps_defend)))

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "PixelDefend":
        return cls(classifier, untrained=True, channels=8, layers=2)

    def config(self) -> Dict[str, Any]:
        return {**self.purifier.config(), "checkpoint": checkpoint_display(self.checkpoint_path, self.checkpoint_source),
                "checkpoint_source": self.checkpoint_source, "checkpoint_sha256": self.checkpoint_sha256,
                "test_bits_per_dim": self.test_bits_per_dim, "training": manifest_training(self.checkpoint_path)}
