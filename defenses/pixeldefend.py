"""PixelDefend (Song et al. 2018): purify an image towards the high-density region of a PixelCNN, pixel by pixel.

The density model (``PixelCNN``) is a small PixelCNN (van den Oord et al. 2016) over 8-bit values:
``layers`` masked 3x3 convolutions (the first excludes the current pixel, mask A; the others include it, mask B;
optionally residual), then two 1x1 convolutions to the pixel's ``context``. Two outputs read it:

- ``softmax`` (the shipped network): 256 logits for each of R, G and B, the three channels of one pixel ordered
  R -> G -> B through learned tables added to the logits (``logits_G += E_RG[R]``, ``logits_B += E_RB[R] +
  E_GB[G]``);
- ``logistic``: PixelCNN++'s discretised logistic mixture (the paper's output), G's and B's means shifted by the
  pixel's R (and G).

Either is an exact autoregressive factorisation p(R|<i) p(G|R,<i) p(B|R,G,<i) that needs one network pass per
pixel, not three. Deviations from the paper (PixelCNN++, 3.0 bits/dim on CIFAR-10): a much smaller network
(trainable on a CPU) and a worse density (its test bits/dim is in the checkpoint manifest and
``docs/pixeldefend.md``).

Purification (the paper's Algorithm 1): in raster order, each channel of each pixel is set to its most likely value
under the PixelCNN, given the pixels already purified, among the values within ``eps_defend`` (16/255) of the
input's. Each step reads only the PixelCNN's output at one pixel, and every layer's output at a pixel depends only on
pixels before it in raster order, which are final by then: ``IncrementalContext`` computes each layer once per pixel
and keeps it (the caching of Ramachandran et al. 2017, "Fast generation for convolutional autoregressive models"),
so one pixel costs one column of the network instead of a pass over its receptive field. A test checks it equals
the full-image context at every pixel.

The purification is a discrete search: it has no useful gradient (``differentiable = False``); attacks use
BPDA with the identity.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

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


OUTPUTS = ("softmax", "logistic")


class PixelCNN(nn.Module):
    """p(x) = prod_i p(R_i | x_<i) p(G_i | R_i, x_<i) p(B_i | R_i, G_i, x_<i) over 8-bit values.

    ``output`` chooses how each pixel's three conditionals come from the network's ``context`` at that pixel:

    - ``softmax``: 3 x 256 logits, plus learned 256 x 256 tables for the R -> G -> B terms (see the module docstring);
    - ``logistic``: PixelCNN++'s discretised logistic mixture (Salimans et al. 2017), the paper's output: ``mixtures``
      components shared by the three channels, each with a mean and a log-scale per channel, the means of G and B
      shifted linearly by the pixel's R (and G) values. 10 numbers per component instead of 768 logits, so training
      costs far less per step; the conditionals of G and B follow exactly from the joint (the component weights
      given the earlier channels' values).

    ``residual``: every layer after the first adds its input (``h + conv(relu(h))``), which lets deeper stacks train.
    """

    def __init__(self, channels: int = 32, layers: int = 5, output: str = "softmax", mixtures: int = 10,
                 residual: bool = False) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"PixelCNN output must be one of {OUTPUTS}, got {output!r}")
        self.channels, self.layers, self.output, self.mixtures, self.residual = channels, layers, output, mixtures, residual
        self.convs = nn.ModuleList([MaskedConv2d(3, channels, "A")] +
                                   [MaskedConv2d(channels, channels, "B") for _ in range(layers - 1)])
        width = 3 * 256 if output == "softmax" else 10 * mixtures
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, width, 1))
        if output == "softmax":
            self.rg, self.rb, self.gb = (nn.Embedding(256, 256) for _ in range(3))
            for table in (self.rg, self.rb, self.gb):
                nn.init.zeros_(table.weight)

    @staticmethod
    def scale(levels: torch.Tensor) -> torch.Tensor:
        return levels.float() / 127.5 - 1

    def _layer(self, i: int, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s output ``out`` (its convolution of ``h``) with the residual added where it applies."""
        return out + h if self.residual and i else out

    def trunk(self, h: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            h = self._layer(i, h, conv(h if i == 0 else F.relu(h)))
        return self.head(h)

    def context(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W): what the network says at each pixel from the pixels before it in raster order."""
        return self.trunk(self.scale(levels))

    def conditional_logits(self, context: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """(N, 3, 256) logits of R, G and B at N pixels from their ``context`` (N, D) and their values ``pixel`` (N, 3),
        each channel given the channels before it (``channel_logits``); ``logistic`` gives log-probabilities."""
        return torch.stack([self.channel_logits(context, pixel, k) for k in range(3)], dim=1)

    def channel_logits(self, context: torch.Tensor, pixel: torch.Tensor, k: int,
                       values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, 256) logits of channel ``k`` at N pixels, or (N, V) at the levels ``values`` (N, V) only (what a
        purifier searching a window of levels needs). They read only ``pixel[:, :k]`` (the channels before it), so
        a purifier may pass zeros for the channels it has not chosen yet."""
        if self.output == "softmax":
            out = context.view(-1, 3, 256)[:, k]
            if k == 1:
                out = out + self.rg(pixel[:, 0])
            elif k == 2:
                out = out + self.rb(pixel[:, 0]) + self.gb(pixel[:, 1])
            return out if values is None else out.gather(1, values)
        log_weights, means, log_scales = self._mixture(context, pixel)
        if k:  # each component's weight given the values of the channels before k
            log_weights = log_weights + _discretised_logistic(pixel[:, None, :k], means[..., :k], log_scales[..., :k]).sum(-1)
        if values is None:
            values = torch.arange(256, device=context.device).expand(len(context), 256)
        per_component = _discretised_logistic(values[:, None, :], means[..., k, None], log_scales[..., k, None])  # (N, K, V)
        return torch.logsumexp(F.log_softmax(log_weights, dim=1)[..., None] + per_component, dim=1)

    def mixture_parts(self, context: torch.Tensor):
        """What the context says before any channel is known: component log-weights (N, K), means and log-scales
        (N, K, 3) without the channel coupling, and the coupling's three coefficients a, b, c (N, K each)."""
        k = self.mixtures
        weights, means, log_scales, coupling = context.split([k, 3 * k, 3 * k, 3 * k], dim=1)
        means, log_scales = means.view(-1, 3, k).transpose(1, 2), log_scales.view(-1, 3, k).transpose(1, 2).clamp(min=-7)
        return F.log_softmax(weights, dim=1), means, log_scales, torch.tanh(coupling).view(-1, 3, k).unbind(1)

    def coupled_mean(self, means: torch.Tensor, coupling, x: torch.Tensor, k: int) -> torch.Tensor:
        """(N, K) means of channel ``k``, shifted by the scaled values ``x`` (N, 3) of the channels before it."""
        a, b, c = coupling
        if k == 0:
            return means[..., 0]
        if k == 1:
            return means[..., 1] + a * x[:, :1]
        return means[..., 2] + b * x[:, :1] + c * x[:, 1:2]

    def _mixture(self, context: torch.Tensor, pixel: torch.Tensor):
        """Component log-weights (N, K), means and log-scales (N, K, 3) with the channel coupling applied."""
        log_weights, means, log_scales, coupling = self.mixture_parts(context)
        x = self.scale(pixel)
        means = torch.stack([self.coupled_mean(means, coupling, x, k) for k in range(3)], -1)
        return log_weights, means, log_scales

    def logits(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, H, W): the full conditional logits at every pixel, given its own earlier channels."""
        ctx = self.context(levels)
        b, d, h, w = ctx.shape
        out = self.conditional_logits(ctx.permute(0, 2, 3, 1).reshape(-1, d), levels.permute(0, 2, 3, 1).reshape(-1, 3))
        return out.view(b, h, w, 3, 256).permute(0, 3, 4, 1, 2)

    def nll(self, levels: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per sub-pixel, in nats."""
        if self.output == "softmax":
            return F.cross_entropy(self.logits(levels).flatten(3).transpose(2, 3).reshape(-1, 256),
                                   levels.flatten(2).reshape(-1))
        ctx = self.context(levels)
        d = ctx.shape[1]
        pixel = levels.permute(0, 2, 3, 1).reshape(-1, 3)
        log_weights, means, log_scales = self._mixture(ctx.permute(0, 2, 3, 1).reshape(-1, d), pixel)
        per_channel = _discretised_logistic(pixel[:, None, :], means, log_scales)  # (N, K, 3)
        return -torch.logsumexp(log_weights + per_channel.sum(-1), dim=1).mean() / 3

    def architecture(self) -> Dict[str, Any]:
        """The constructor's arguments (what a weights file stores to rebuild the network); the original softmax
        network's keeps its two keys, so files written before the other options existed still load and compare."""
        arch: Dict[str, Any] = {"channels": self.channels, "layers": self.layers}
        if self.output != "softmax" or self.residual:
            arch.update(output=self.output, mixtures=self.mixtures, residual=self.residual)
        return arch

    def config(self) -> Dict[str, Any]:
        return {**self.architecture(), "parameters": sum(p.numel() for p in self.parameters())}


_HALF_BIN = 1 / 255  # half the width of one 8-bit level on the [-1, 1] scale


class IncrementalContext:
    """``PixelCNN.context`` one pixel at a time, in raster order, for a purifier that changes each pixel as it goes.

    A masked 3x3 layer's output at (r, c) reads its input at row r - 1 (columns c - 1 .. c + 1) and at (r, c - 1)
    and, after the first layer, (r, c): all computed before (r, c)'s turn, from pixels already final. So each
    layer's output is computed once, when its pixel comes, and kept; ``at`` returns the context there. Zeros
    around the image stand for the convolutions' zero padding. Everything is stored channels-last, so a layer's
    2 x 3 input patch is two contiguous runs per image."""

    def __init__(self, net: PixelCNN, levels: torch.Tensor) -> None:
        b, _, height, width = levels.shape
        self.net = net
        # (B, H + 1, W + 2, 3): a zero row on top, a zero column on each side
        self.image = F.pad(net.scale(levels), (1, 1, 1, 0)).permute(0, 2, 3, 1).contiguous()
        # what each layer after the first reads: the ReLU of the layer before, kept as it is computed
        self.relu_outputs = [self.image.new_zeros(b, height + 1, width + 2, net.channels) for _ in net.convs[:-1]]
        # each kernel's two upper rows (its bottom row is masked out) as one (2 * 3 * C_in, C_out) matrix
        self.weights = [(conv.weight * conv.mask)[:, :, :2].permute(0, 2, 3, 1).flatten(1).t() for conv in net.convs]
        self.head = [(m.weight.flatten(1), m.bias) if isinstance(m, nn.Conv2d) else m for m in net.head]

    def at(self, row: int, col: int) -> torch.Tensor:
        """(B, D): the context at (row, col). Every pixel before it in raster order must be final in ``image`` (see
        ``set``), and ``at`` must have been called at every pixel before it."""
        inputs, value = self.image, None
        for i, (conv, weight) in enumerate(zip(self.net.convs, self.weights)):
            out = torch.addmm(conv.bias, inputs[:, row:row + 2, col:col + 3].flatten(1), weight)
            value = out + value if self.net.residual and i else out  # the residual adds the layer's input
            if i < len(self.relu_outputs):
                inputs = self.relu_outputs[i]
                inputs[:, row + 1, col + 1] = F.relu(value)
        for layer in self.head:  # the 1x1 convolutions at one pixel, as matrix products
            value = F.linear(value, *layer) if isinstance(layer, tuple) else layer(value)
        return value

    def set(self, row: int, col: int, pixel: torch.Tensor) -> None:
        """Fix the pixel at (row, col) to the levels ``pixel`` (B, 3)."""
        self.image[:, row + 1, col + 1] = self.net.scale(pixel)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)), stably, from ``exp`` and ``log``: within 1e-7 of ``F.softplus`` (the float32 rounding of
    1 + exp(-|x|)), and on this CPU 5x faster (``F.softplus``'s kernel, like ``log1p``'s, is not vectorised), which the
    purifier's inner loop feels."""
    return x.clamp(min=0) + torch.log(1 + torch.exp(-x.abs()))


def _discretised_logistic(levels: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(level) under a logistic(mean, exp(log_scale)) discretised to the 256 levels on [-1, 1], the two end
    levels taking the tails; ``levels`` broadcasts against ``means`` and ``log_scales``."""
    centred = levels.float() / 127.5 - 1 - means
    inv_scale = torch.exp(-log_scales)
    upper, lower = inv_scale * (centred + _HALF_BIN), inv_scale * (centred - _HALF_BIN)
    log_cdf_upper = upper - _softplus(upper)  # log sigmoid(upper): level 0 takes everything below
    log_survival_lower = -_softplus(lower)  # log (1 - sigmoid(lower)): level 255 takes everything above
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    # where the bin's mass underflows, its density at the centre times the bin width
    mid = inv_scale * centred
    log_density_mid = mid - log_scales - 2 * _softplus(mid)
    middle = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-12)), log_density_mid + math.log(2 * _HALF_BIN))
    return torch.where(levels == 0, log_cdf_upper, torch.where(levels == 255, log_survival_lower, middle))


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
        net = self.pixelcnn
        low, high = (levels - self.radius).clamp(0, 255), (levels + self.radius).clamp(0, 255)
        out = levels.clone()
        cache = IncrementalContext(net, out)
        _, _, height, width = levels.shape
        window = torch.arange(2 * self.radius + 1, device=levels.device)

        choose = self._choose_logistic if net.output == "logistic" else self._choose_per_channel
        for r in range(height):
            for c in range(width):
                # the allowed levels per channel in ascending order (repeats of the top one where [0, 255] cuts the
                # window): the first best is the lowest most likely level, as an argmax over all 256 would pick
                allowed = (low[:, :, r, c, None] + window).clamp(max=high[:, :, r, c, None])  # (B, 3, V)
                pixel = choose(cache.at(r, c), allowed)
                out[:, :, r, c] = pixel
                cache.set(r, c, pixel)
        return out

    def _choose_per_channel(self, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The pixel (B, 3) whose channels are, in turn, the most likely of their ``allowed`` levels (B, 3, V)."""
        pixel = allowed.new_zeros(allowed.shape[:2])  # channel k's logits read only the channels chosen before it
        for channel in range(3):
            best = self.pixelcnn.channel_logits(context, pixel, channel, allowed[:, channel]).argmax(1, keepdim=True)
            pixel[:, channel] = allowed[:, channel].gather(1, best).squeeze(1)
        return pixel

    def _choose_logistic(self, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``_choose_per_channel`` for the logistic mixture, the same arithmetic with the mixture split once per pixel:
        the components' log-probabilities at a channel's chosen level (already computed for its argmax) condition the
        weights of the channels after it. About 1.5x faster at batch 1, and the same pixels bit for bit."""
        net = self.pixelcnn
        log_weights, means, log_scales, coupling = net.mixture_parts(context)
        pixel = allowed.new_zeros(allowed.shape[:2])
        chosen = []  # (B, K) log-probability of each channel's chosen level under each component
        for channel in range(3):
            mean = net.coupled_mean(means, coupling, net.scale(pixel), channel)
            per_component = _discretised_logistic(allowed[:, None, channel], mean[..., None],
                                                  log_scales[..., channel, None])  # (B, K, V)
            conditioned = log_weights + sum(chosen) if chosen else log_weights
            logits = torch.logsumexp(F.log_softmax(conditioned, dim=1)[..., None] + per_component, dim=1)
            best = logits.argmax(1, keepdim=True)
            pixel[:, channel] = allowed[:, channel].gather(1, best).squeeze(1)
            chosen.append(per_component.gather(2, best[:, None].expand(-1, per_component.shape[1], 1)).squeeze(2))
        return pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify_levels(to_levels(x.detach())).float().div(255)

    def config(self) -> Dict[str, Any]:
        return {"eps_defend": self.eps_defend, "eps_defend_levels": self.radius, "pixelcnn": self.pixelcnn.config()}


# --- the defense ---------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from bench.classifiers.base import load_state_dict  # noqa: E402
from bench.core.record import sha256_file  # noqa: E402
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
        weights=("a PixelCNN with PixelCNN++'s discretised logistic-mixture output (64 channels, 8 residual masked layers, "
                 "10 mixtures) trained here for 3 CPU epochs on 49k cifar10-jpeg training images; manifest beside the "
                 "weights; this project's own work"),
        differences=("a small PixelCNN (3.60 bits/dim on the test images; the paper: PixelCNN++, 2.92); the greedy "
                     "purification is the paper's (eps_defend 16/255)"),
    )
    paper_reference = ("PixelDefend (Song et al. 2018); about 9% under BPDA on CIFAR-10 at 8/255 (Athalye et al. 2018); "
                       "the PixelCNN shipped here is small (3.60 bits/dim, PixelCNN++ reports 2.92)")

    def __init__(self, classifier: nn.Module, checkpoint: Optional[str] = None, eps_defend: float = 16 / 255,
                 dataset: str = "cifar10-jpeg", untrained: bool = False, channels: int = 32, layers: int = 5,
                 output: str = "softmax") -> None:
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256, self.test_bits_per_dim = "untrained", None, None
        if untrained:
            pixelcnn = PixelCNN(int(channels), int(layers), output)
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
