"""A third-party plug-in file used by the CLI tests: registers a tiny dataset, a tiny classifier and
three defenses (one well-behaved, two broken) exactly as a user's ``--plugin`` file would."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from bench.classifiers import CLASSIFIERS, Classifier, ClassifierInfo
from bench.datasets import DATASETS, ArrayDataset
from defenses import Defense, register_defense
from tests.helpers import CoinOfTheLowBits, NearestColor


def _tiny_dataset(split: str, download: bool) -> ArrayDataset:
    rng = np.random.RandomState(0)
    colours = rng.uniform(0.25, 0.75, size=(40, 1, 1, 3))
    images = np.round(255 * np.clip(colours + rng.uniform(-0.1, 0.1, size=(40, 32, 32, 3)), 0, 1)).astype(np.uint8)
    with torch.no_grad():  # label the images with the tiny classifier's own predictions: all clean-correct
        labels = NearestColor()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    return ArrayDataset("tiny-test", split, images, labels, 10, tuple(str(i) for i in range(10)), "generated")


def _tiny_classifier() -> Classifier:
    info = ClassifierInfo("tiny", "nearest-colour", "tiny-test", 10, None, None, "fixed", None, "none", "tests")
    return Classifier(NearestColor(), info)


if "tiny-test" not in DATASETS:
    DATASETS.add("tiny-test", _tiny_dataset)
    CLASSIFIERS.add("tiny", _tiny_classifier)


@register_defense("plugin-blur")
class PluginBlur(Defense):
    """A deterministic, differentiable toy purifier (3x3 average blur)."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False))


@register_defense("plugin-slow")
class PluginSlow(PluginBlur):
    """The blur defense, 20 ms slower per call: makes a run long enough to be killed mid-way."""

    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)


@register_defense("plugin-traced")
class PluginTraced(PluginBlur):
    """The blur defense, appending the batch size of every forward pass to ``$BENCH_TRACE_DIR/rank<RANK>.txt``: shows
    which process of a torchrun run did which work."""

    def forward(self, x):
        folder = os.environ.get("BENCH_TRACE_DIR")
        if folder:
            with open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.txt"), "a") as trace:
                trace.write(f"{x.shape[0]}\n")
        return super().forward(x)


@register_defense("plugin-dies-once")
class PluginDiesOnce(PluginBlur):
    """The blur defense, whose process kills itself (SIGKILL, as an OOM killer or a preempted node would) the first
    time it runs after a batch of its run was saved: the first batch file under ``$BENCH_DIE_STATE`` (a folder) is the
    cue, ``$BENCH_DIE_MARKER`` (a file) records that it died, so a retried run lives."""

    def forward(self, x):
        state, marker = os.environ.get("BENCH_DIE_STATE"), os.environ.get("BENCH_DIE_MARKER")
        if state and marker and not os.path.exists(marker):
            import glob
            import signal

            if glob.glob(os.path.join(state, ".state", "*", "*.json")):
                with open(marker, "w") as handle:
                    handle.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


@register_defense("plugin-nan")
class PluginNaN(Defense):
    def forward(self, x):
        return super().forward(x) * float("nan")


@register_defense("plugin-wrong-shape")
class PluginWrongShape(Defense):
    def forward(self, x):
        return super().forward(x)[:, :3]


# Planted broken defenses (issue 4): each hides something the integrity checks must find, and each must be
# driven by the adaptive suite (with its corrections) to the bare classifier's robust accuracy.


class _Round8(torch.nn.Module):
    def forward(self, x):
        return torch.round(x * 7) / 7


@register_defense("planted-quantize")
class PlantedQuantize(Defense):
    """Rounding to 8 levels per channel: zero gradients, nothing declared."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=_Round8())


class _HeavyNoise(torch.nn.Module):
    def forward(self, x):
        return (x + 0.08 * torch.randn_like(x)).clamp(0, 1)


@register_defense("planted-noise")
class PlantedNoise(Defense):
    """Gaussian noise (sigma 0.08) on every call, randomness not declared (stochastic stays False)."""

    def __init__(self, classifier):
        super().__init__(classifier, transform=_HeavyNoise())


@register_defense("planted-slow-noise")
class PlantedSlowNoise(PlantedNoise):
    """``planted-noise``, 20 ms slower per call: a run long enough to be killed in its correction stage."""

    def forward(self, x):
        time.sleep(0.02)
        return super().forward(x)


class _ArgmaxPalette(torch.nn.Module):
    """Each value snapped to the nearest of 16 grey levels through an argmax: no gradient path at all."""

    def forward(self, x):
        levels = torch.linspace(0, 1, 16, device=x.device)
        nearest = (-(x.unsqueeze(-1) - levels).abs()).argmax(dim=-1)
        return levels[nearest]


@register_defense("planted-argmax")
class PlantedArgmax(Defense):
    """An argmax step before the classifier, declared differentiable (the default)."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=_ArgmaxPalette())


# Plants for the checks of issue 17: each hides one failure a check must name.


@register_defense("planted-chaos")
class PlantedChaos(Defense):
    """Deterministic on paper (two passes agree), but a sub-quantization nudge flips half its predictions."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=CoinOfTheLowBits())


class _SharedNoise(torch.nn.Module):
    def forward(self, x):
        return (x + 0.03 * torch.randn(1, *x.shape[1:], device=x.device)).clamp(0, 1)  # one draw for the whole batch


@register_defense("planted-shared-noise")
class PlantedSharedNoise(Defense):
    """Declared stochastic, but its noise is drawn once per batch: stacked EOT draws collapse into one draw."""

    stochastic = True

    def __init__(self, classifier):
        super().__init__(classifier, transform=_SharedNoise())


class _Shatter(torch.nn.Module):
    """x + a sin(w x): a forward almost the identity (|a sin| <= 2.6/255), a gradient scaled per pixel by
    1 + a w cos(w x), a factor of +-20 that changes sign every 1.6/255: gradients that exist and point nowhere."""

    def forward(self, x):
        return (x + 0.01 * torch.sin(2000.0 * x)).clamp(0, 1)


@register_defense("planted-shattered")
class PlantedShattered(Defense):
    """Shattered gradients (Athalye et al. 2018), declared differentiable."""

    def __init__(self, classifier):
        super().__init__(classifier, transform=_Shatter())


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _Reversed(torch.nn.Module):
    def forward(self, x):
        return _ReverseGradient.apply(x)


@register_defense("planted-reversed")
class PlantedReversed(Defense):
    """The identity whose backward pass negates the gradient: every gradient attack walks the wrong way, while a
    score-based or transfer attack breaks it as it breaks the bare classifier."""

    def __init__(self, classifier):
        super().__init__(classifier, transform=_Reversed())
