"""The fixed subset: same (dataset, n, seed) -> same indices, pixels and hashes; hashes are recomputable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.plugins import load_plugin
from bench.subset import load_subset, subset_indices
from tests.conftest import needs_data

load_plugin(Path(__file__).with_name("plugin_examples.py"))  # registers the generated "tiny-test" dataset


def test_indices_follow_the_documented_rule():
    expected = np.random.RandomState(0).choice(10000, 512, replace=False)
    assert np.array_equal(subset_indices(10000, 512, 0), expected)
    assert len(set(subset_indices(10000, 512, 0).tolist())) == 512


def test_same_arguments_same_subset_and_hash():
    a, b = load_subset("tiny-test", 16, 3), load_subset("tiny-test", 16, 3)
    assert np.array_equal(a.indices, b.indices) and a.subset_hash == b.subset_hash
    assert (a.x == b.x).all() and (a.y == b.y).all()
    c = load_subset("tiny-test", 16, 4)
    assert c.indices_sha256 != a.indices_sha256 and c.subset_hash != a.subset_hash


def test_hashes_are_recomputable_from_indices_and_pixels():
    s = load_subset("tiny-test", 10, 0)
    assert s.indices_sha256 == hashlib.sha256(s.indices.astype("<i8").tobytes()).hexdigest()
    pixels = np.round(s.x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    expected = hashlib.sha256(pixels.tobytes() + s.y.numpy().astype("<i8").tobytes()).hexdigest()
    assert s.pixels_sha256 == expected
    assert s.x.dtype.is_floating_point and s.x.shape == (10, 3, 32, 32) and 0 <= s.x.min() and s.x.max() <= 1


def test_bad_sizes_are_user_errors():
    with pytest.raises(BenchError):
        subset_indices(100, 101, 0)
    with pytest.raises(BenchError):
        subset_indices(100, 10, -1)


@needs_data
def test_cifar10_jpeg_subset_is_pinned():
    """These hashes identify the default subset on every machine; a change here splits every board."""
    s = load_subset("cifar10-jpeg", 512, 0)
    assert s.indices[:5].tolist() == np.random.RandomState(0).choice(10000, 512, replace=False)[:5].tolist()
    assert s.subset_hash.startswith("513cc8fd8fe4")


def test_a_pinned_subset_with_other_pixels_stops_the_run(monkeypatch):
    from bench import subset as subset_module

    real = load_subset("tiny-test", 16, 3)
    monkeypatch.setattr(subset_module, "pinned_hashes", lambda: {("tiny-test", 16, 3): "f" * 64})
    with pytest.raises(BenchError, match=r"subset tiny-test n=16 seed=3 hashes to .* not the pinned ffffffffffff"):
        load_subset("tiny-test", 16, 3)
    monkeypatch.setattr(subset_module, "pinned_hashes", lambda: {("tiny-test", 16, 3): real.subset_hash})
    assert load_subset("tiny-test", 16, 3).subset_hash == real.subset_hash


def test_every_board_subset_is_pinned():
    import json

    from bench.subset import pinned_hashes
    from leaderboards.render import load_boards

    pinned = set(pinned_hashes().values())
    boards = json.loads((Path(__file__).resolve().parent.parent / "leaderboards" / "boards.json").read_text())["boards"]
    assert {b["subset_hash"] for b in boards if b.get("subset_hash")} <= pinned
    assert load_boards()
