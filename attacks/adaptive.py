"""Adaptive wrappers: ``EOT(attack, n)`` and ``BPDA(attack)``.

They wrap an attack rather than being flags inside it: each replaces the oracle the inner attack sees.
``EOT`` averages the loss gradient over ``n`` random draws of a stochastic defense, running the draws
in chunks of at most ``chunk_images`` images per pass (draws stacked along the batch dimension).
Measured here with ``scripts/eot_chunk_benchmark.py`` (2 CPU cores, ResNet-20 + Gaussian noise, EOT-20
gradient, median of 3), milliseconds by images per step and chunk size in images:

    batch | loop (chunk = batch) | chunk 32 | chunk 128 | all 20 draws at once
        1 |                 183 |       44 |        42 |                   44
        8 |                 397 |      310 |       257 |                  282
       32 |                1063 |     1064 |       985 |                 1777
      128 |                3756 |     3784 |      3776 |                14119

Stacking all draws is 3.7x slower at batch 128, a loop is 4x slower at batch 1; about 128 images per pass
is never worse than either, so that is the CPU default.
``BPDA`` runs the defense's real forward but back-propagates through its declared surrogate.
``Surrogate`` gives the attack a cheaper stand-in model (a defense's ``attack_surrogate``) for its gradients.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from attacks.base import NORMS, Attack, CountingModule, LossFn, Oracle, bpda_call, input_grad
from bench.core.errors import BenchError

CPU_EOT_CHUNK_IMAGES = 128
CUDA_EOT_CHUNK_IMAGES = 4096


def default_chunk_images(device: torch.device | str) -> int:
    return CUDA_EOT_CHUNK_IMAGES if torch.device(device).type == "cuda" else CPU_EOT_CHUNK_IMAGES


def _repeat(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.repeat(k, *([1] * (t.dim() - 1)))


class EOTOracle(Oracle):
    """Expectation over Transformation: mean loss, mean gradient and mean logits over ``n`` draws."""

    def __init__(self, model: nn.Module, n: int, chunk_images: int, judge=None, real: bool = True) -> None:
        super().__init__(model, judge, real)
        self.n, self.chunk_images = n, chunk_images

    def with_model(self, model: nn.Module, real: Optional[bool] = None) -> "EOTOracle":
        return EOTOracle(model, self.n, self.chunk_images, self.judge, self.real if real is None else real)

    @property
    def single_draw(self) -> bool:
        return self.n == 1 and super().single_draw

    def _chunks(self, batch: int):
        per_pass = max(1, min(self.n, self.chunk_images // max(batch, 1)))
        done = 0
        while done < self.n:
            k = min(per_pass, self.n - done)
            yield k
            done += k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=x.device)
        with torch.no_grad():
            for k in self._chunks(x.shape[0]):
                total = total + self.model(_repeat(x, k)).view(k, x.shape[0], -1).sum(0)
        return total / self.n

    def loss_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        loss_sum, grad_sum, logit_sum = torch.zeros(b, device=x.device), torch.zeros_like(x), 0.0
        for k in self._chunks(b):
            xr = x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(_repeat(xr, k))
                loss = loss_fn(logits, _repeat(y, k))
                grad = input_grad(loss, xr)
            loss_sum += loss.detach().view(k, b).sum(0)
            grad_sum += grad
            logit_sum = logit_sum + logits.detach().view(k, b, -1).sum(0)
        return loss_sum / self.n, grad_sum / self.n, logit_sum / self.n


class _Wrapper(Attack):
    """Delegates to an inner attack; subclasses change the oracle it sees."""

    norms = NORMS  # whatever the inner attack works in

    def __init__(self, inner: Attack) -> None:
        if not inner.uses_oracle:
            raise BenchError(f"{inner.name} runs its own model loop and cannot be wrapped by {type(self).__name__}")
        super().__init__(inner.threat)
        self.inner = inner
        self.name = inner.name

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner.run(oracle, x, y)

    def params(self) -> Dict[str, Any]:
        return self.inner.params()

    @property
    def completes(self) -> bool:  # type: ignore[override]
        return self.inner.completes

    @property
    def early_stop(self) -> bool:  # type: ignore[override]
        return self.inner.early_stop

    @early_stop.setter
    def early_stop(self, value: bool) -> None:
        self.inner.early_stop = value


class EOT(_Wrapper):
    """Average the attack's gradients over ``n`` draws of the (stochastic) model."""

    def __init__(self, inner: Attack, n: int, chunk_images: Optional[int] = None) -> None:
        super().__init__(inner)
        if n < 1:
            raise BenchError("EOT needs n >= 1 draws")
        self.n = n
        self.chunk_images = chunk_images

    def make_oracle(self, model: nn.Module) -> Oracle:
        base = self.inner.make_oracle(model)
        if self.chunk_images is None:  # resolved once, then recorded
            device = next(iter(model.parameters()), torch.empty(0)).device
            self.chunk_images = default_chunk_images(device)
        return EOTOracle(base.model, self.n, self.chunk_images, base.judge, base.real)

    def wrapper_settings(self) -> Dict[str, Any]:
        return {**self.inner.wrapper_settings(), "eot": self.n, "eot_chunk_images": self.chunk_images}


class BPDAView(nn.Module):
    """A module whose forward is the model's ``bpda_forward`` (real values, surrogate gradients)."""

    def __init__(self, model: nn.Module, stages: Tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model, self.stages = model, tuple(stages)

    @property
    def stochastic(self) -> bool:
        return bool(getattr(self.model, "stochastic", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bpda_call(self.model, x, self.stages)


class BPDA(_Wrapper):
    """Back-propagate through the defense's declared surrogate for its non-differentiable stages.

    ``stages`` (e.g. ``("purifier",)``) also sends these stages' gradients through their surrogate even
    though they are differentiable: the "purifier skipped in the gradient" evaluation, kept to show how
    much it over-credits a defense, never as a replacement for exact gradients.
    """

    def __init__(self, inner: Attack, stages: Tuple[str, ...] = ()) -> None:
        super().__init__(inner)
        self.stages = tuple(stages)

    def make_oracle(self, model: nn.Module) -> Oracle:
        base = self.inner.make_oracle(model)
        return base.with_model(BPDAView(base.model, self.stages))

    def wrapper_settings(self) -> Dict[str, Any]:
        extra = {"bpda_stages": list(self.stages)} if self.stages else {}
        return {**self.inner.wrapper_settings(), "bpda": True, **extra}


class Surrogate(_Wrapper):
    """The attack differentiates (and judges its progress on) a stand-in model, e.g. a defense with fewer
    purification steps; the evaluation still classifies the final examples with the real defense. Passes
    through the stand-in are counted with the real model's passes."""

    def __init__(self, inner: Attack, model: nn.Module) -> None:
        super().__init__(inner)
        self.model = model

    def make_oracle(self, model: nn.Module) -> Oracle:
        base = self.inner.make_oracle(model)
        counter = getattr(model, "counter", None)
        # the stand-in's logits are not the defense's: the judge classifies candidates with the real model
        return base.with_model(CountingModule(self.model, counter) if counter is not None else self.model, real=False)

    def wrapper_settings(self) -> Dict[str, Any]:
        return {**self.inner.wrapper_settings(), "surrogate": True}
