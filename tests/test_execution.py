"""Execution options (channels-last, autocast, compile) and out-of-memory back-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks import ATTACKS, Threat
from bench.evaluation import evaluate
from bench.execution import Executed, Execution, auto_batch_size, executed, largest_fitting
from bench.subset import Subset
from bench.errors import BenchError
from tests.helpers import NearestColor


class RunsOutOfMemory(nn.Module):
    """A model that raises ``torch.OutOfMemoryError`` on batches larger than ``limit`` (what CUDA would do)."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.refused = model, limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (a test stand-in, batch {x.shape[0]})")
        return self.model(x)


def _toy_subset(n: int = 32) -> Subset:
    model = NearestColor()
    x = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(2)).expand(n, 3, 8, 8).contiguous()
    return Subset("toy", "test", n, 0, np.arange(n), x, model(x).argmax(1), 10, "0" * 64, "0" * 64)


def test_a_batch_that_runs_out_of_memory_is_split_and_gives_the_same_result():
    subset, threat = _toy_subset(), Threat("linf", 0.03)
    plans = lambda: [("fgsm", ATTACKS.get("fgsm")(threat)), ("pgd", ATTACKS.get("pgd")(threat, steps=5, random_start=False))]
    whole = evaluate(NearestColor(), subset, plans(), threat, who="toy", batch_size=16)
    small = RunsOutOfMemory(NearestColor(), limit=4)
    split = evaluate(small, subset, plans(), threat, who="toy", batch_size=16)
    assert small.refused > 0
    assert (split.robust == whole.robust).all() and (split.clean_pred == whole.clean_pred).all()
    assert 0 < whole.robust.sum() < 32  # the comparison is not trivial
    # 16 -> 8 + 8 -> 4 x 4: three splits per batch of 16, two batches for FGSM on the 32 clean-correct points
    assert split.attacks[0]["oom_splits"] == 6 and "oom_splits" not in whole.attacks[0]
    assert split.attacks[0]["cost"]["forward_images"] == whole.attacks[0]["cost"]["forward_images"]


def test_a_model_that_fails_for_another_reason_is_not_retried():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    subset, threat = _toy_subset(8), Threat("linf", 0.03)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(Broken(), subset, [("fgsm", ATTACKS.get("fgsm")(threat))], threat, who="broken", batch_size=8)


def test_auto_batch_size_halves_until_it_fits_and_is_128_on_cpu():
    tried = []

    def probe(size: int) -> None:
        tried.append(size)
        if size > 300:
            raise torch.OutOfMemoryError("out of memory")

    assert largest_fitting(probe, 1000) == 256 and tried == [512, 256]
    x = torch.rand(4, 3, 8, 8)
    assert auto_batch_size(NearestColor(), x, torch.zeros(4, dtype=torch.long), "cpu") == 128


def _logits_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), xg)
    return logits.detach(), grad


@pytest.fixture
def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_execution_options_keep_predictions_and_gradients_on_cpu(conv_net):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ref_logits, ref_grad = _logits_and_grad(conv_net, x, y)
    assert executed(conv_net, Execution()) is conv_net  # all off: nothing wrapped
    logits, grad = _logits_and_grad(Executed(conv_net, Execution(channels_last=True)), x, y)
    assert torch.allclose(logits, ref_logits, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-6)
    logits, grad = _logits_and_grad(Executed(conv_net, Execution(autocast="bf16")), x, y)
    assert logits.dtype == torch.float32 and grad.dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.05 and nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), 0) > 0.95
    with pytest.raises(BenchError, match="autocast"):
        Execution(autocast="int8")


def test_compiled_model_gives_the_same_logits_and_gradients(conv_net):
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ref_logits, ref_grad = _logits_and_grad(conv_net, x, y)
    logits, grad = _logits_and_grad(Executed(conv_net, Execution(compile=True)), x, y)
    assert torch.allclose(logits, ref_logits, atol=1e-4) and torch.allclose(grad, ref_grad, atol=1e-5)
