"""DiffPure (Nie et al., ICML 2022): diffuse the input a little under the VP-SDE, then run the reverse SDE back to t = 0
with a learned score model. Stochastic: every call draws the forward noise and the reverse path anew.

The VP-SDE (Song et al. 2021) with beta(t) = beta_min + t (beta_max - beta_min), beta_min 0.1, beta_max 20, on images
scaled to [-1, 1]: x_t = a(t) x_0 + s(t) eps with a(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2) / 2) and
s(t)^2 = 1 - a(t)^2. Purification: x_{t*} from x (t* = 0.1 for CIFAR-10, DiffPure's setting), then the reverse SDE
dx = [-beta(t) x / 2 - beta(t) score(x, t)] dt + sqrt(beta(t)) dw-bar from t* to 0, score = -eps_theta(x, t) / s(t),
integrated with Euler-Maruyama in ``steps`` equal steps (DiffPure: torchsde's Euler with dt = 1e-3, i.e. 100 steps).

Gradients for the attacker (``gradient=``, recorded in the config; the forward is the same in all three):

- ``exact``: back-propagation through every solver step, each step recomputed in the backward pass
  (``torch.utils.checkpoint``) so memory stays that of one step;
- ``adjoint``: the adjoint SDE of ``torchsde.sdeint_adjoint`` (DiffPure's own route), same Euler grid, same Brownian
  path as the forward;
- ``bpda``: the identity through the purification (the forward's value, the gradient of the classifier alone).

An attacker surrogate (PROTOCOL rule 5; ``attack_surrogate``): the same score model, t* and gradient route with
``surrogate_steps`` solver steps (default 10) instead of ``steps``. Only a suite budget with ``"surrogate": true``
differentiates it (``diffpure-routes`` on a CPU); the real ``steps``-step defense classifies every example.

The score model is ``defenses.score_network.ScoreUNet``, trained here (``bench train --defense diffpure``,
``defenses/diffpure_training.py``); its weights load from ``$BENCH_CHECKPOINT_DIR/diffpure/<dataset>/`` or the
package's ``defenses/checkpoints/diffpure/``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.classifiers.base import load_state_dict
from bench.core.errors import BenchError
from bench.core.record import sha256_file
from defenses.base import SHIPPED_DIR, Card, Defense, checkpoint_display, manifest_training, register_defense, resolve_checkpoint
from defenses.score_network import ScoreUNet

BETA_MIN, BETA_MAX = 0.1, 20.0
T_MIN = 1e-4  # the earliest time the score is asked for (s(0) = 0)
GRADIENTS = ("exact", "adjoint", "bpda")
WEIGHTS_FILE = "score.weights.pt"


def beta(t: torch.Tensor | float) -> torch.Tensor | float:
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def alpha(t: torch.Tensor | float):
    """a(t): the signal's scale at time t (the VP-SDE's mean coefficient)."""
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t
    return torch.exp(-0.5 * integral) if isinstance(t, torch.Tensor) else math.exp(-0.5 * integral)


def sigma(t: torch.Tensor | float):
    """s(t): the noise's scale at time t, sqrt(1 - a(t)^2)."""
    a = alpha(t)
    return torch.sqrt(1 - a * a) if isinstance(t, torch.Tensor) else math.sqrt(1 - a * a)


def diffuse(y: torch.Tensor, t: float | torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_t = a(t) y + s(t) eps for images y in [-1, 1] scale."""
    noise = torch.randn_like(y) if noise is None else noise
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        return alpha(t).view(-1, 1, 1, 1) * y + sigma(t).view(-1, 1, 1, 1) * noise
    return alpha(t) * y + sigma(t) * noise


class ReverseSDE(nn.Module):
    """The reverse-time VP-SDE as a forward SDE in tau = t* - t (torchsde's convention: f and g of (tau, y)), on
    flattened images. Diagonal noise."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, score: nn.Module, t_star: float, shape) -> None:
        super().__init__()
        self.score, self.t_star, self.shape = score, t_star, tuple(shape)

    def drift(self, tau: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """dy/dtau = beta(t) y / 2 + beta(t) score(y, t) with t = t* - tau (the reverse drift, time flipped)."""
        t = max(self.t_star - float(tau), T_MIN)  # the adjoint evaluates the end point t = 0, where s(t) = 0
        eps = self.score(y, torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype))
        return 0.5 * beta(t) * y - beta(t) * eps / sigma(t)

    def f(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(tau, y.view(-1, *self.shape)).flatten(1)

    def g(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, math.sqrt(beta(max(self.t_star - float(tau), T_MIN))))


class DiffPurification(nn.Module):
    """Diffuse to t*, then Euler-Maruyama through the reverse SDE to 0; images in [0, 1] in and out."""

    def __init__(self, score: nn.Module, t_star: float = 0.1, steps: int = 100, gradient: str = "exact") -> None:
        super().__init__()
        if not 0 < t_star < 1 or steps < 1 or gradient not in GRADIENTS:
            raise BenchError(f"diffpure: needs 0 < t_star < 1, steps >= 1 and gradient in {GRADIENTS}, got "
                             f"{t_star}, {steps}, {gradient!r}")
        self.score, self.t_star, self.steps, self.gradient = score, float(t_star), int(steps), gradient
        self.surrogate = nn.Identity()  # the stand-in of a suite's "bpda": ["purifier"] spec
        # every route passes a gradient (bpda: the identity, straight through), so suites add no BPDA variant

    @property
    def gradient_route(self) -> str:
        return self.gradient

    def _step(self, y: torch.Tensor, tau: float, dt: float, dw: torch.Tensor, sde: ReverseSDE) -> torch.Tensor:
        return y + sde.drift(tau, y) * dt + math.sqrt(beta(self.t_star - tau)) * dw

    def reverse(self, y: torch.Tensor, brownian=None, exact_grad: bool = False) -> torch.Tensor:
        """Euler-Maruyama from t* to 0; ``brownian(tau0, tau1)`` gives the increments (fresh Gaussians without it);
        ``exact_grad`` recomputes each step in the backward pass (checkpointing)."""
        sde, dt = ReverseSDE(self.score, self.t_star, y.shape[1:]), self.t_star / self.steps
        for k in range(self.steps):
            tau = k * dt
            dw = brownian(tau, tau + dt).view_as(y) if brownian is not None else math.sqrt(dt) * torch.randn_like(y)
            if exact_grad:
                y = checkpoint(self._step, y, tau, dt, dw, sde, use_reentrant=False)
            else:
                y = self._step(y, tau, dt, dw, sde)
        return y

    def reverse_adjoint(self, y: torch.Tensor, brownian) -> torch.Tensor:
        import torchsde

        sde = ReverseSDE(self.score, self.t_star, y.shape[1:])
        ts = torch.tensor([0.0, self.t_star], device=y.device, dtype=y.dtype)
        out = torchsde.sdeint_adjoint(sde, y.flatten(1), ts, bm=brownian, method="euler", dt=self.t_star / self.steps,
                                      adjoint_method="euler", adjoint_params=tuple(self.score.parameters()))
        return out[-1].view_as(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        y = diffuse(2 * x - 1, self.t_star)
        if grad and self.gradient == "bpda":
            with torch.no_grad():
                out = self.reverse(y.detach())
            return x + (((out + 1) / 2).clamp(0, 1) - x).detach()
        if grad and self.gradient == "adjoint":
            out = self.reverse_adjoint(y, brownian_for(y, self.t_star))
        else:
            out = self.reverse(y, exact_grad=grad)
        return ((out + 1) / 2).clamp(0, 1)

    def config(self) -> Dict[str, Any]:
        return {"t_star": self.t_star, "steps": self.steps, "solver": "euler-maruyama", "gradient": self.gradient,
                "sde": f"VP, beta {BETA_MIN:g}-{BETA_MAX:g}", "score": self.score.config()}


def brownian_for(y: torch.Tensor, t_star: float):
    """A Brownian path over [0, t*] for ``y``'s flattened shape, seeded from torch's generator (reproducible)."""
    import torchsde

    entropy = int(torch.randint(0, 2**31 - 1, ()).item())
    # the solver's end time is t* rounded to y's dtype (0.1 in float32 is 0.10000000149): the path must reach it
    t1 = float(torch.tensor(t_star, dtype=y.dtype))
    return torchsde.BrownianInterval(t0=0.0, t1=max(t_star, t1), size=y.flatten(1).shape, dtype=y.dtype, device=y.device,
                                     entropy=entropy)


def diffpure_checkpoint_folder(dataset: str, root: Optional[Path] = None) -> Path:
    from bench.core.paths import checkpoint_dir

    return (checkpoint_dir() if root is None else root) / "diffpure" / dataset


def load_score(path: Path) -> ScoreUNet:
    """A ScoreUNet sized from its weights (width from the first convolution, blocks from the down path)."""
    state = load_state_dict(path, key="score")
    width = state["inp.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in state if k.startswith("down.") and k.endswith("conv1.weight")}) // 3
    net = ScoreUNet(width, max(1, blocks))
    net.load_state_dict(state, strict=True)
    return net


class _AttackerProcess(Defense):
    """DiffPure's attacker surrogate: the pipeline with a coarser reverse process (as random as the defense)."""

    stochastic = True


@register_defense("diffpure")
class DiffPure(Defense):
    """DiffPure: VP-SDE diffusion to t* and the reverse SDE back, in front of the frozen classifier."""

    version = "1"
    stochastic = True
    card = Card(
        title="Diffusion Models for Adversarial Purification",
        authors="Weili Nie, Brandon Guo, Yujia Huang, Chaowei Xiao, Arash Vahdat, Anima Anandkumar", venue="ICML",
        year=2022, paper="https://arxiv.org/abs/2205.07460", code="https://github.com/NVlabs/DiffPure",
        weights=("a score U-Net (ScoreUNet width 32, 1.0M parameters) trained here on the cifar10-jpeg training images "
                 "for 8 epochs x 45,000 (bench train --defense diffpure, 1.3 CPU-hours; "
                 "defenses/checkpoints/diffpure/cifar10-jpeg/score.manifest.json)"),
        differences=("a small score model trained for under an hour on small diffusion times only (the paper: the "
                     "pretrained Score SDE, ~60M parameters), so the purified images lose much of what the classifier "
                     "reads (clean accuracy far below the bare classifier's); the classifier is the shared ResNet-20 on "
                     "JPEG CIFAR-10 (the paper: WRN-28-10 and ResNet-50)"),
    )
    paper_reference = ("DiffPure (Nie et al. 2022), AToP's Table 6 row: 88.2% clean, 70.0% AutoAttack linf 8/255, 70.9% l2, "
                       "55.0% StAdv (ResNet-50, CIFAR-10); full-gradient attacks with EOT report far lower (Lee & Kim "
                       "2023, DiffHammer); the score model here is small and trained for hours on a CPU")

    def __init__(self, classifier: nn.Module, t_star: float = 0.1, steps: int = 100, gradient: str = "exact",
                 checkpoint: Optional[str] = None, untrained: bool = False, dataset: str = "cifar10-jpeg",
                 surrogate_steps: int = 10) -> None:
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256 = "untrained", None
        if untrained:
            score = ScoreUNet(16, 1)
        else:
            candidates = [(diffpure_checkpoint_folder(dataset) / WEIGHTS_FILE, "trained"),
                          (diffpure_checkpoint_folder(dataset, SHIPPED_DIR) / WEIGHTS_FILE, "shipped")]
            self.checkpoint_path, self.checkpoint_source = resolve_checkpoint(checkpoint, candidates, (
                f"no trained DiffPure score model for {dataset} at {candidates[0][0]} (nor shipped); train it with "
                f"`bench train --defense diffpure` or pass --defense-option checkpoint=PATH"))
            score = load_score(self.checkpoint_path)
            self.checkpoint_sha256 = sha256_file(self.checkpoint_path)
        super().__init__(classifier, purifier=DiffPurification(score.eval(), t_star, steps, gradient))
        self.purifier.requires_grad_(False)
        # the attacker's cheaper process: same score model, t* and route, fewer solver steps (a submodule, so it
        # follows the defense to its device and into eval mode)
        self.cheap = _AttackerProcess(classifier, purifier=DiffPurification(score, t_star, surrogate_steps, gradient))

    def attack_surrogate(self) -> nn.Module:
        return self.cheap

    def surrogate_config(self) -> Dict[str, Any]:
        return {"steps": self.cheap.purifier.steps, "t_star": self.cheap.purifier.t_star,
                "gradient": self.cheap.purifier.gradient, "solver": "euler-maruyama"}

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "DiffPure":
        return cls(classifier, untrained=True, steps=2, surrogate_steps=1)

    def config(self) -> Dict[str, Any]:
        return {**self.purifier.config(), "checkpoint": checkpoint_display(self.checkpoint_path, self.checkpoint_source),
                "checkpoint_source": self.checkpoint_source, "checkpoint_sha256": self.checkpoint_sha256,
                "training": manifest_training(self.checkpoint_path)}
