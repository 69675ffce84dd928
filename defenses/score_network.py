"""A small time-conditioned U-Net that predicts the noise of a VP-SDE sample (DDPM's epsilon-parameterisation), sized
for CPU training: DiffPure's score model at this scale.

32x32 -> 16x16 -> 8x8 and back, two residual blocks per scale (GroupNorm, SiLU, the time embedding added after the
first convolution), self-attention at 8x8, skip connections; the time enters as a sinusoidal embedding of 1000 t
through a two-layer MLP (Ho et al. 2020's design, smaller). Inputs and outputs are images in [-1, 1] scale.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous times t in [0, 1] (scaled by 1000 as in DDPM's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(t_emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv, self.out = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)  # (b, c, hw) each
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, hw, hw)
        return x + self.out((v @ weights.transpose(1, 2)).view(b, c, h, w))


class ScoreUNet(nn.Module):
    """epsilon_theta(x_t, t) for 3x32x32 images; ``width`` channels at 32x32, 2x at 16x16 and 8x8."""

    def __init__(self, width: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.width, self.blocks = width, blocks
        t_dim = 4 * width
        self.t_mlp = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        chans = [width, 2 * width, 2 * width]
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.ModuleList()
        skips: List[int] = [width]
        c = width
        for level, c_out in enumerate(chans):
            for _ in range(blocks):
                self.down.append(ResBlock(c, c_out, t_dim))
                c = c_out
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim), Attention(c), ResBlock(c, c, t_dim)])
        self.up = nn.ModuleList()
        for level, c_out in reversed(list(enumerate(chans))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), c_out, t_dim))
                c = c_out
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_mlp(timestep_embedding(t.expand(x.shape[0]) if t.dim() == 0 else t, self.width))
        h = self.inp(x)
        stack = [h]
        for layer in self.down:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
            stack.append(h)
        for layer in self.mid:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, stack.pop()], dim=1), t_emb)
            else:
                h = layer(h)
        return self.out(h)

    def config(self) -> Dict[str, object]:
        return {"architecture": "ScoreUNet (32-16-8, residual blocks, attention at 8x8)", "width": self.width,
                "blocks": self.blocks, "parameters": sum(p.numel() for p in self.parameters())}
