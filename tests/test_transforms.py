"""AToP's random transforms and the purifier networks: shapes, ranges, fresh randomness, RT3 partition."""

from __future__ import annotations

import pytest
import torch

from defenses.purifiers import PURIFIERS, PatchDiscriminator
from defenses.transforms import RT1, RT2, RT3, MaskedEnsemble, partition_masks, random_patch_mask


def test_patch_mask_missing_rate_and_patches():
    mask = random_patch_mask(8, 32, 4, 0.25)
    assert mask.shape == (8, 1, 32, 32)
    assert torch.allclose(1 - mask.mean(dim=(1, 2, 3)), torch.full((8,), 0.25))  # 16 of 64 patches missing
    blocks = mask[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # (8, 8, 8, 4, 4): each patch constant
    assert (blocks.amax(dim=(-1, -2)) == blocks.amin(dim=(-1, -2))).all()


@pytest.mark.parametrize("transform", [RT1(), RT2(), RT3()], ids=["rt1", "rt2", "rt3"])
def test_fresh_randomness_per_call_and_per_image(transform):
    x = torch.rand(1, 3, 32, 32).repeat(6, 1, 1, 1)  # six copies of one image
    a, b = transform(x), transform(x)
    assert not torch.equal(a, b)  # two calls differ
    masks = a[:, 3::4]
    assert not all(torch.equal(masks[0], masks[i]) for i in range(1, 6))  # masks not shared across the batch
    assert (masks == 0).any()  # never the identity


def test_rt1_masks_without_noise_and_rt2_adds_noise():
    x = torch.rand(4, 3, 32, 32)
    out1 = RT1()(x)
    mask = out1[:, 3:]
    assert torch.equal(out1[:, :3], mask * x)
    out2 = RT2(sigma=0.25)(x)
    kept = out2[:, 3:].expand(-1, 3, -1, -1) == 1
    noise = (out2[:, :3] - x)[kept]
    assert 0.2 < noise.std() < 0.3
    assert (out2[:, :3][~kept] == 0).all()


def test_rt3_masks_partition_the_image():
    masks = partition_masks(5, 32, 4, 4)
    assert masks.shape == (4, 5, 1, 32, 32)
    assert torch.equal((1 - masks).sum(dim=0), torch.ones(5, 1, 32, 32))  # every pixel missing exactly once
    out = RT3()(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, 16, 32, 32)


class Marker(torch.nn.Module):
    """A 'purifier' that paints every pixel of input row k with the value k."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return torch.arange(n, dtype=t.dtype).view(n, 1, 1, 1).expand(n, 3, *t.shape[2:])


def test_rt3_aggregation_uses_only_generated_pixels():
    b, n = 2, 4
    stacked = RT3(n_masks=n)(torch.rand(b, 3, 32, 32))
    out = MaskedEnsemble(Marker(), n)(stacked)
    masks = stacked[:, 3::4]  # (B, N, H, W)
    for i in range(n):  # copy i (rows i*B..i*B+B-1) fills exactly the pixels its own mask removed
        region = masks[:, i] == 0
        expected = (i * b + torch.arange(b)).float().view(b, 1, 1).expand_as(masks[:, i])
        assert torch.equal(out[:, 0][region], expected[region])


@pytest.mark.parametrize("name", sorted(PURIFIERS))
def test_purifiers_map_transformed_images_into_the_box(name):
    purifier = PURIFIERS[name]()
    out = purifier(RT2()(torch.rand(3, 3, 32, 32)))
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    MaskedEnsemble(purifier, 4)(RT3()(x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the input through the transform


def test_discriminator_scores_patches():
    assert PatchDiscriminator()(torch.rand(2, 3, 32, 32)).shape == (2, 1, 4, 4)
