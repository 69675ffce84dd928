"""Core attack API: the threat model, the gradient oracle, pass counting and the attack base class.

An attack takes ``(model, x, y)`` and returns ``x_adv`` inside the threat ball and [0, 1]. It reads the
model only through an ``Oracle`` (logits, and loss + input gradient), which is what the adaptive wrappers
replace: ``EOT`` averages gradients over random draws, ``BPDA`` swaps in the declared surrogate on the
backward pass. ``CountingModule`` counts every forward and backward pass (and the images in it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from attacks.verdict import Judge, current_judge
from bench.core.errors import BenchError
from bench.core.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample loss


#: Threat norms. ``stadv`` bounds a spatial flow field, not a pixel difference: eps is the largest
#: displacement of any pixel in grid_sample's normalized coordinates (1.0 = half the image side; 0.05 is 0.8
#: pixels on a 32x32 image), as in Laidlaw et al. (2021), whose setting AToP's Table 6 follows.
NORMS = ("linf", "l2", "stadv")
PIXEL_NORMS = ("linf", "l2")


def canonical_norm(text: str) -> str:
    """A threat norm as the harness names it, from its own or RobustBench's spelling (``Linf``, ``L2``)."""
    norm = str(text).strip().lower().replace("_", "")
    if norm not in NORMS:
        raise BenchError(f"unknown threat norm {text!r}; use one of {', '.join(NORMS)} (RobustBench's Linf and L2 work too)")
    return norm


def format_eps(norm: str, eps: float) -> str:
    """eps as people write it: ``8/255`` where it is a whole number of 255ths (linf), else the number."""
    scaled = eps * 255
    if norm == "linf" and abs(scaled - round(scaled)) < 1e-6 and round(scaled) > 0:
        return f"{round(scaled)}/255"
    return f"{eps:.6g}"


@dataclass(frozen=True)
class Threat:
    """An lp ball around the clean image intersected with the [0, 1] box, or (``stadv``) a bounded flow field."""

    norm: str  # "linf", "l2" or "stadv"
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise BenchError(f"unknown threat norm {self.norm!r}; use one of {', '.join(NORMS)}")
        limit = {"linf": 1.0, "l2": math.sqrt(3 * 32 * 32) * 8, "stadv": 2.0}[self.norm]
        if not (0.0 < self.eps <= limit) or not math.isfinite(self.eps):
            in_255ths = f" ({self.eps * 255:.4g}/255)" if self.norm == "linf" and math.isfinite(self.eps) else ""
            raise BenchError(f"eps {self.eps:.6g}{in_255ths} is out of range for {self.norm} (0 < eps <= {limit:g})")

    @property
    def pixel(self) -> bool:
        """True for the lp balls (the perturbation is a pixel difference that can be projected and checked)."""
        return self.norm in PIXEL_NORMS

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Into the ball and [0, 1]; for ``stadv`` only into [0, 1] (the attack bounds its own flow)."""
        if not self.pixel:
            return x_adv.clamp(0.0, 1.0)
        if self.norm == "linf":  # clamp to [x - eps, x + eps]: a point already inside is returned unchanged
            return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        delta = x_adv - x
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        scaled = x + delta * (self.eps / norms).clamp(max=1.0)
        inside = norms <= self.eps * (1 + 1e-6)  # a point inside comes back unchanged (bit for bit)
        return torch.where(inside, x_adv, scaled).clamp(0.0, 1.0)

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        self._needs_pixel("a random start")
        if self.norm == "linf":
            noise = (2 * torch.rand_like(x) - 1) * self.eps
        else:
            direction = torch.randn_like(x)
            norms = direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            radius = torch.rand(x.shape[0], 1, 1, 1, device=x.device) * self.eps
            noise = direction / norms * radius
        return self.project(x + noise, x)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, size: torch.Tensor | float) -> torch.Tensor:
        """Steepest-ascent step of the given size (sign for linf, normalized gradient for l2)."""
        self._needs_pixel("a pixel step")
        if self.norm == "linf":
            return x_adv + _expand(size, x_adv) * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return x_adv + _expand(size, x_adv) * grad / norms

    def _needs_pixel(self, what: str) -> None:
        if not self.pixel:
            raise BenchError(f"{what} needs an lp threat (linf or l2), not {self.norm}")

    def to_dict(self) -> Dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps}


def _expand(size: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    return size.view(-1, 1, 1, 1) if isinstance(size, torch.Tensor) else size


@dataclass
class PassCounter:
    """Passes through the model and the images in them (an EOT chunk of k draws x B images is one pass)."""

    forward: int = 0
    backward: int = 0
    forward_images: int = 0
    backward_images: int = 0

    def snapshot(self) -> Dict[str, int]:
        return dict(self.__dict__)


def bpda_call(model: nn.Module, x: torch.Tensor, stages: Tuple[str, ...] = ()) -> torch.Tensor:
    """``model.bpda_forward`` on ``x`` (with ``stages`` when given): the real forward with the surrogate's gradients;
    an error when the model declares no BPDA surrogate. Wrappers (execution options, the chaos correction) pass
    their transformed input through it."""
    inner = getattr(model, "bpda_forward", None)
    if inner is None:
        raise BenchError(f"{type(model).__name__} declares no BPDA surrogate (no bpda_forward)")
    return inner(x, stages=stages) if stages else inner(x)


class CountingModule(nn.Module):
    """Wraps a model and counts forward/backward passes, also through ``bpda_forward``. With ``record_sizes`` it
    also keeps the batch size of every pass (``forward_sizes``, ``backward_sizes``; ``bench perf`` uses them)."""

    def __init__(self, model: nn.Module, counter: PassCounter | None = None, record_sizes: bool = False) -> None:
        super().__init__()
        self.model = model
        self.counter = counter if counter is not None else PassCounter()
        self.forward_sizes: Optional[List[int]] = [] if record_sizes else None
        self.backward_sizes: Optional[List[int]] = [] if record_sizes else None

    def _count(self, out: torch.Tensor, n: int) -> torch.Tensor:
        self.counter.forward += 1
        self.counter.forward_images += n
        if self.forward_sizes is not None:
            self.forward_sizes.append(n)
        if out.requires_grad:
            out.register_hook(self._on_backward(n))
        return out

    def _on_backward(self, n: int):
        def hook(grad: torch.Tensor) -> None:
            self.counter.backward += 1
            self.counter.backward_images += n
            if self.backward_sizes is not None:
                self.backward_sizes.append(n)

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._count(self.model(x), x.shape[0])

    def bpda_forward(self, x: torch.Tensor, stages: Tuple[str, ...] = ()) -> torch.Tensor:
        inner = getattr(self.model, "bpda_forward", None)
        if inner is None:
            if stages:
                raise BenchError(f"{type(self.model).__name__} has no stages to pass through BPDA")
            return self._count(self.model(x), x.shape[0])
        return self._count(inner(x, stages=stages) if stages else inner(x), x.shape[0])

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.model, "stochastic", False))


#: Rows an attack runs side by side when it has several runs (restarts, target classes) for few points: runs are
#: stacked until about this many rows, so finishing 3 points with 9 targets costs one run of 27 rows, not 9 runs of 3.
PARALLEL_ROWS = {"cpu": 32, "cuda": 1024}


def run_groups(points: int, runs: int, device: torch.device | str) -> int:
    """How many of ``runs`` runs to stack side by side for ``points`` points (at least 1)."""
    limit = PARALLEL_ROWS.get(torch.device(device).type, PARALLEL_ROWS["cpu"])
    return max(1, min(runs, limit // max(points, 1)))


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss.sum() / d x, and zeros (not an exception) where the model cut ``x`` out of the graph.

    A defense with a hard non-differentiable step (argmax, ``.detach()``, integer indexing) gives no gradient
    path at all; attacks then see the zero gradient it really has and the integrity checks flag it.
    """
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


class Oracle:
    """What an attack may ask of the model: logits, a per-sample loss with its input gradient, and the verdict on
    candidates (``judge_candidates``, see ``attacks.verdict``).

    ``judge`` is the evaluation's judge when an attack runs inside ``attacks.verdict.judging`` (the runner does
    that), else one for ``model`` itself. ``real`` says whether this oracle's logits come from the real forward of
    the evaluated model (True for plain, BPDA and EOT oracles; False for a stand-in ``Surrogate`` model).
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], judge: Optional[Judge] = None,
                 real: bool = True) -> None:
        self.model = model
        self.judge = judge if judge is not None else (current_judge() or Judge.for_model(model))
        self.real = real

    def with_model(self, model: Callable[[torch.Tensor], torch.Tensor], real: Optional[bool] = None) -> "Oracle":
        """The same kind of oracle around another model (how wrappers compose); the judge stays."""
        return Oracle(model, self.judge, self.real if real is None else real)

    @property
    def single_draw(self) -> bool:
        """True when each answer is one random draw of a stochastic model (no averaging)."""
        return bool(getattr(self.model, "stochastic", False))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def loss_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (per-sample loss, d loss / d x, logits) for one forward and one backward pass."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            loss = loss_fn(logits, y)
            grad = input_grad(loss, x)
        return loss.detach(), grad.detach(), logits.detach()

    def judge_candidates(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Broken mask under the verdict rule for candidates ``x`` the attack saw ``logits`` for."""
        return self.judge(x, y, logits, real=self.real)


class Attack:
    """Base class: subclasses implement ``run(oracle, x, y)``; wrappers override ``make_oracle``."""

    name: ClassVar[str] = ""
    #: False for attacks that need an ``nn.Module`` rather than an oracle (e.g. pyautoattack).
    uses_oracle: ClassVar[bool] = True
    #: False for score-based attacks: they never ask for a gradient, so a BPDA variant would repeat them.
    uses_gradients: ClassVar[bool] = True
    #: True when ``early_stop = False`` makes the attack optimise every point to its last step and return each
    #: point's best candidate: only such attacks give mean and majority over the draws that mean something. A
    #: plug-in attack opts in by setting it.
    completes: ClassVar[bool] = False
    #: The threat norms the attack can work in.
    norms: ClassVar[Tuple[str, ...]] = PIXEL_NORMS
    #: Early stop: a point leaves the attack once the judge confirms it broken (``attacks.verdict``). False runs
    #: every step on every point and returns each point's best candidate: evaluations turn it off for a stochastic
    #: defense in an independent suite (mean and majority over the draws need completed attacks), ``Transfer`` for
    #: its source, and ``bench perf`` to measure what early stop saves.
    early_stop: bool = True

    def __init__(self, threat: Threat) -> None:
        if threat.norm not in self.norms:
            raise BenchError(f"attack {self.name or type(self).__name__} works in {', '.join(self.norms)}, "
                             f"not in the {threat.norm} threat")
        self.threat = threat

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's examples, projected into the threat; inside ``attacks.verdict.judging`` its verdicts are the
        evaluation's."""
        x_adv = self.run(self.make_oracle(model), x, y)
        return self.threat.project(x_adv.detach(), x)

    def make_oracle(self, model: nn.Module) -> Oracle:
        return Oracle(model)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement run(oracle, x, y)")

    def params(self) -> Dict[str, Any]:
        """Every setting that changes the result (stored in records)."""
        return {}

    def wrapper_settings(self) -> Dict[str, Any]:
        """Settings of adaptive wrappers around this attack (none for a plain attack)."""
        return {}

    def describe(self) -> Dict[str, Any]:
        return {"attack": self.name, "params": self.params(), **self.wrapper_settings()}


ATTACKS: Registry[type] = Registry("attack", base=Attack, packages=["attacks"], entry_point_group="bench.attacks")


def register_attack(name: str):
    """Class decorator: register an ``Attack`` subclass under ``name``."""

    def decorator(cls: type) -> type:
        cls.name = name
        ATTACKS.add(name, cls)
        return cls

    return decorator
