"""PixelDefend: the PixelCNN is causal, the context computed one pixel at a time equals the full-image one, and the
purification is the greedy per-channel argmax within eps_defend, on the 8-bit grid."""

from __future__ import annotations

import pytest
import torch

from defenses.pixeldefend import (
    IncrementalContext, PixelCNN, PixelDefend, PixelDefendPurification, _softplus, to_levels)
from defenses.pixeldefend_training import PixelCNNTrainer, PixelCNNSettings
from tests.helpers import TinyNet


NETWORKS = [{}, {"output": "logistic", "mixtures": 3}, {"output": "logistic", "mixtures": 3, "residual": True}]


def _net(channels: int = 8, layers: int = 3, **options) -> PixelCNN:
    torch.manual_seed(0)
    net = PixelCNN(channels, layers, **options).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # every weight nonzero, the R -> G -> B tables included
        if net.output == "logistic":  # narrow components (scale 0.05, about 6 levels): no near-ties between levels
            k, last = net.mixtures, net.head[-1]
            last.weight[4 * k:7 * k] = 0
            last.bias[4 * k:7 * k] = -3
    return net


@pytest.mark.parametrize("options", NETWORKS)
def test_the_pixelcnn_is_causal_in_raster_and_channel_order(options):
    net = _net(**options)
    levels = torch.randint(0, 256, (2, 3, 7, 7))
    with torch.no_grad():
        before = net.logits(levels)
    height, width = levels.shape[2:]
    for r, c in [(0, 0), (3, 4), (6, 6), (2, 0)]:
        i = r * width + c
        for k in range(3):
            changed = levels.clone().view(2, 3, -1)
            changed[:, :, i + 1:] = torch.randint(0, 256, changed[:, :, i + 1:].shape)  # every later pixel
            changed[:, k:, i] = torch.randint(0, 256, changed[:, k:, i].shape)  # this channel and the later ones
            with torch.no_grad():
                after = net.logits(changed.view_as(levels))
            assert torch.allclose(after[:, k, :, r, c], before[:, k, :, r, c], atol=1e-5), (r, c, k)
    # and it does read the past: the pixel to the left, the row above and the earlier channels of its own pixel
    for r, c, k, src in [(3, 4, 0, (3, 3)), (3, 4, 0, (2, 4)), (3, 4, 2, (3, 4))]:
        changed = levels.clone()
        changed[:, 0, src[0], src[1]] = (changed[:, 0, src[0], src[1]] + 128) % 256
        with torch.no_grad():
            after = net.logits(changed)
        assert not torch.allclose(after[:, k, :, r, c], before[:, k, :, r, c]), (r, c, k, src)


@pytest.mark.parametrize("options", NETWORKS)
def test_the_incremental_context_equals_the_full_image_context_as_pixels_change(options):
    net = _net(layers=3, **options)
    levels = torch.randint(0, 256, (2, 3, 9, 9))
    final = torch.randint(0, 256, levels.shape)  # what each pixel becomes once its turn has passed
    with torch.no_grad():
        full = net.context(final)
        cache = IncrementalContext(net, levels)  # starts from the other image: only pixels already set may count
        for r in range(9):
            for c in range(9):
                assert torch.allclose(cache.at(r, c), full[:, :, r, c], atol=1e-5), (r, c)
                cache.set(r, c, final[:, :, r, c])


def test_the_logistic_mixture_is_a_normalised_distribution_whose_conditionals_give_its_likelihood():
    net = _net(output="logistic", mixtures=4)
    levels = torch.randint(0, 256, (2, 3, 6, 6))
    levels[0, :, 0, 0], levels[1, :, 0, 0] = 0, 255  # the two tail levels
    with torch.no_grad():
        conditionals = net.logits(levels)  # (B, 3, 256, H, W) log-probabilities
        assert torch.allclose(conditionals.logsumexp(dim=2), torch.zeros(2, 3, 6, 6), atol=1e-4)
        chosen = conditionals.gather(2, levels[:, :, None]).squeeze(2)  # log p(R) + log p(G|R) + log p(B|R,G)
        assert torch.allclose(-chosen.mean(), net.nll(levels), atol=1e-4)  # = the joint the training minimises


def test_the_fast_softplus_matches_torch():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e4, 1e4, 0.0])])
    assert torch.allclose(_softplus(x), torch.nn.functional.softplus(x), rtol=1e-6, atol=2e-7)
    assert torch.isfinite(_softplus(x)).all()


def _reference_purify(net: PixelCNN, levels: torch.Tensor, radius: int) -> torch.Tensor:
    """Algorithm 1 of PixelDefend written directly: a full-image pass for every channel of every pixel."""
    out = levels.clone()
    values = torch.arange(256)
    for r in range(levels.shape[2]):
        for c in range(levels.shape[3]):
            for k in range(3):
                with torch.no_grad():
                    logit = net.logits(out)[:, k, :, r, c]
                lo, hi = (levels[:, k, r, c] - radius).clamp(0, 255), (levels[:, k, r, c] + radius).clamp(0, 255)
                allowed = (values[None] >= lo[:, None]) & (values[None] <= hi[:, None])
                out[:, k, r, c] = logit.masked_fill(~allowed, float("-inf")).argmax(1)
    return out


@pytest.mark.parametrize("options", NETWORKS)
def test_purification_is_the_greedy_argmax_within_eps_defend(options):
    net = _net(layers=3, **options)
    purify = PixelDefendPurification(net, eps_defend=16 / 255)
    x = torch.rand(3, 3, 5, 5)
    x[0, :, 0, 0] = 0.0  # clipped at the bottom of the range
    out = purify(x)
    levels = to_levels(x)
    assert torch.equal(to_levels(out), _reference_purify(net, levels, 16))
    assert torch.equal(out * 255, (out * 255).round())  # on the 8-bit grid
    assert (to_levels(out) - levels).abs().max() <= 16 and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(to_levels(out), levels)


def test_pixeldefend_declares_bpda_and_has_no_gradient_path():
    defense = PixelDefend.for_testing(TinyNet()).eval()
    assert not defense.differentiable
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    assert not defense(x).requires_grad or torch.autograd.grad(defense(x).sum(), x, allow_unused=True)[0] is None
    defense.bpda_forward(x).sum().backward()  # the identity surrogate carries the classifier's gradient
    assert x.grad.abs().sum() > 0


def test_a_few_training_steps_lower_the_bits_per_dim():
    torch.manual_seed(0)
    images = (torch.rand(16, 8, 8, 3) * 64).to(torch.uint8).numpy()  # a narrow, learnable distribution
    trainer = PixelCNNTrainer(PixelCNNSettings(channels=8, layers=2, lr=1e-2), torch.device("cpu"), images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    first = trainer.step(x, None)["bits_per_dim"]
    for _ in range(30):
        last = trainer.step(x, None)["bits_per_dim"]
    assert first > 7.5 and last < first - 1.5
    weights = trainer.weights()
    assert weights["architecture"] == {"channels": 8, "layers": 2} and weights["test_bits_per_dim"] < first


def test_the_logistic_mixture_trains_and_its_weights_name_the_architecture():
    torch.manual_seed(0)
    images = (torch.rand(16, 8, 8, 3) * 64).to(torch.uint8).numpy()
    settings = PixelCNNSettings(channels=8, layers=2, lr=1e-2, output="logistic", mixtures=3, residual=True)
    trainer = PixelCNNTrainer(settings, torch.device("cpu"), images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    first = trainer.step(x, None)["bits_per_dim"]
    for _ in range(30):
        last = trainer.step(x, None)["bits_per_dim"]
    assert last < first - 1.5
    weights = trainer.weights()
    assert weights["architecture"] == {"channels": 8, "layers": 2, "output": "logistic", "mixtures": 3, "residual": True}
    rebuilt = PixelCNN(**weights["architecture"])
    rebuilt.load_state_dict(weights["pixelcnn"])  # what PixelDefend does with a weights file
    levels = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).long()
    with torch.no_grad():
        assert torch.allclose(rebuilt.nll(levels), trainer.model.eval().nll(levels))


def test_the_logistic_fast_path_chooses_the_same_levels_as_the_per_channel_logits():
    """The mixture split once per pixel is the same arithmetic as ``channel_logits`` per channel: the same levels,
    near-ties included (wide components, random contexts)."""
    torch.manual_seed(1)
    net = PixelCNN(8, 2, output="logistic", mixtures=5).eval()
    purify = PixelDefendPurification(net, eps_defend=16 / 255)
    context = torch.randn(256, net.head[-1].out_channels)
    low = torch.randint(0, 256, (256, 3, 1)).clamp(max=255 - 32)
    allowed = low + torch.arange(33)
    fast = purify._choose_logistic(context, allowed)
    assert torch.equal(fast, purify._choose_per_channel(context, allowed))
    assert len(fast.unique()) > 50  # the levels chosen differ from pixel to pixel
