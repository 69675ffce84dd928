"""Tests of ``bench.datasets``: each on-disk format with tiny files, the decode cache, errors, real data.

Every test except the last group writes its own files into ``tmp_path``. The real-data tests read the
shared CIFAR-10 JPEG bundle from ``$BENCH_DATA_DIR`` and are skipped when it is not there.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from bench.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES, ArrayDataset, clear_memory_cache, load_dataset
from bench.errors import BenchError
from bench.paths import data_dir
from tests.conftest import shared_missing

N = 6
LABELS = np.array([3, 0, 9, 1, 9, 5], dtype=np.int64)


def pattern(n: int = N, size: int = 32) -> np.ndarray:
    """Known uint8 NHWC pixels, different in every image, row, column and channel."""
    i, h, w, c = np.meshgrid(np.arange(n), np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    return ((i * 40 + h * 3 + w * 5 + c * 70) % 256).astype(np.uint8)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("BENCH_DATA_DIR", str(data))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield data
    clear_memory_cache()


# ------------------------------------------------------------------------------- tiny file writers


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, key: bytes = b"labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # row-major CHW, as in the real batches
    entry = {b"batch_label": b"tiny", key: [int(v) for v in labels], b"data": data}
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_jpeg_bundle(path: Path, images: np.ndarray, labels: np.ndarray) -> List[bytes]:
    blobs = [jpeg_bytes(image) for image in images]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    np.savez_compressed(path, jpeg=jpeg, offsets=offsets, labels=labels)
    return blobs


IMAGENETTE_COLORS: Dict[str, Tuple[int, int, int]] = {
    "n01440764": (200, 30, 30),
    "n02102040": (30, 200, 30),
    "n03888605": (30, 30, 200),
}


def write_imagenette(root: Path, folder: str = "val") -> None:
    """Three classes (created out of order), images of several sizes in one solid colour per class."""
    sizes = {"n03888605": [(320, 240), (240, 320)], "n01440764": [(500, 375)], "n02102040": [(256, 256), (300, 200)]}
    for wnid, shapes in sizes.items():
        (root / "imagenette2" / folder / wnid).mkdir(parents=True)
        for k, (width, height) in enumerate(shapes):
            image = Image.new("RGB", (width, height), IMAGENETTE_COLORS[wnid])
            image.save(root / "imagenette2" / folder / wnid / f"img_{k}.JPEG", quality=95)
    (root / "imagenette2" / folder / "n01440764" / "notes.txt").write_text("not an image")


def check_tensors(ds: ArrayDataset) -> None:
    x, y = ds.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.is_contiguous()
    assert x.shape == (len(ds), 3) + ds.images.shape[1:3]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, torch.from_numpy(ds.images.astype(np.float32) / 255).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.tensor(ds.labels.tolist(), dtype=torch.int64))


# ------------------------------------------------------------------------------------------ formats


def test_cifar10_pickles(root: Path) -> None:
    images = pattern()
    write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", images, LABELS)
    ds = load_dataset("cifar10", "test")
    assert ds.images.shape == (N, 32, 32, 3) and ds.images.dtype == np.uint8
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, LABELS)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 10 and ds.classes[3] == "cat" and len(ds) == N
    check_tensors(ds)
    x, y = ds.tensors(np.array([4, 1]))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [9, 0]
    assert x[0, 2, 7, 11].item() == pytest.approx(images[4, 7, 11, 2] / 255)


def test_cifar10_train_concatenates_five_batches(root: Path) -> None:
    images = pattern(10)
    labels = np.arange(10, dtype=np.int64)
    for b in range(5):
        rows = slice(2 * b, 2 * b + 2)
        write_cifar_batch(root / "cifar-10-batches-py" / f"data_batch_{b + 1}", images[rows], labels[rows])
    ds = load_dataset("cifar10", "train")
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, labels)


def test_cifar100_fine_labels(root: Path) -> None:
    images = pattern()
    fine = np.array([0, 99, 42, 7, 7, 58], dtype=np.int64)
    write_cifar_batch(root / "cifar-100-python" / "test", images, fine, key=b"fine_labels")
    ds = load_dataset("cifar100")
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, fine)
    assert ds.num_classes == 100 and len(ds.classes) == 100 and ds.classes[0] == "apple" and ds.classes[99] == "worm"
    assert list(CIFAR100_CLASSES) == sorted(set(CIFAR100_CLASSES))
    check_tensors(ds)


def test_svhn_mat_maps_10_to_0(root: Path) -> None:
    images = pattern()
    raw = np.array([10, 1, 2, 10, 9, 5], dtype=np.uint8).reshape(-1, 1)
    (root / "svhn").mkdir()
    savemat(str(root / "svhn" / "test_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": raw})
    ds = load_dataset("svhn", "test")
    assert ds.images.shape == (N, 32, 32, 3) and np.array_equal(ds.images, images)
    assert ds.labels.tolist() == [0, 1, 2, 0, 9, 5] and ds.labels.dtype == np.int64
    check_tensors(ds)


def test_cifar10_jpeg_bundle(root: Path) -> None:
    images = pattern()
    blobs = write_jpeg_bundle(root / "cifar10-jpeg" / "test.npz", images, LABELS)
    ds = load_dataset("cifar10-jpeg", "test")
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    assert ds.images.shape == (N, 32, 32, 3) and np.array_equal(ds.images, decoded)
    assert np.array_equal(ds.labels, LABELS) and ds.source.endswith("test.npz")
    check_tensors(ds)


def test_cifar10_lossless300_layout(root: Path) -> None:
    images = pattern()
    (root / "cifar10-test-lossless300").mkdir()
    np.savez_compressed(root / "cifar10-test-lossless300" / "cifar10_test_lossless300.npz", x=images, y=LABELS)
    ds = load_dataset("cifar10-lossless300")
    assert np.array_equal(ds.images, images) and np.array_equal(ds.labels, LABELS)


def test_imagenette_resize_crop_and_class_order(root: Path) -> None:
    write_imagenette(root, "val")
    ds = load_dataset("imagenette", "test")
    assert ds.classes == ("n01440764", "n02102040", "n03888605") and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 1, 1, 2, 2]
    assert ds.images.shape == (5, 256, 256, 3) and ds.images.dtype == np.uint8
    for image, label in zip(ds.images, ds.labels):
        color = np.array(IMAGENETTE_COLORS[ds.classes[label]])
        assert np.abs(image.astype(int) - color).max() <= 3
    check_tensors(ds)
    with pytest.raises(BenchError, match="imagenette2"):
        load_dataset("imagenette", "train")


def test_imagenette_center_crop_exact(root: Path) -> None:
    folder = root / "imagenette2" / "train" / "n01440764"
    folder.mkdir(parents=True)
    tall = np.zeros((512, 256, 3), dtype=np.uint8)  # short side already 256: no resize, crop rows 128..383
    tall[:256, :, 0] = 255
    tall[256:, :, 2] = 255
    Image.fromarray(tall).save(folder / "tall.png")
    ds = load_dataset("imagenette", "train")
    assert np.array_equal(ds.images[0], tall[128:384])


# --------------------------------------------------------------------------------------------- cache


def write_any(name: str, root: Path) -> None:
    if name == "cifar10-jpeg":
        write_jpeg_bundle(root / "cifar10-jpeg" / "test.npz", pattern(), LABELS)
    elif name == "cifar10":
        write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", pattern(), LABELS)
    else:
        write_imagenette(root, "val")


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("decoded again although the cache should have been used")


@pytest.mark.parametrize("name", ["cifar10-jpeg", "cifar10", "imagenette"])
def test_second_load_uses_disk_cache(root: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write_any(name, root)
    first = load_dataset(name)
    cached = list((Path(os.environ["BENCH_CACHE_DIR"]) / "datasets" / name).iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temp file left behind
    assert load_dataset(name).images is first.images  # in-process memo
    assert not first.images.flags.writeable
    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    clear_memory_cache()
    second = load_dataset(name)
    assert second.images is not first.images
    assert np.array_equal(second.images, first.images) and np.array_equal(second.labels, first.labels)
    assert second.classes == first.classes


def test_changed_source_is_decoded_again(root: Path) -> None:
    path = root / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(path, pattern(), LABELS)
    assert np.array_equal(load_dataset("cifar10").images, pattern())
    write_cifar_batch(path, pattern()[::-1], LABELS[::-1])
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    clear_memory_cache()
    ds = load_dataset("cifar10")
    assert np.array_equal(ds.images, pattern()[::-1]) and np.array_equal(ds.labels, LABELS[::-1])


def test_corrupt_cache_file_is_ignored(root: Path) -> None:
    write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", pattern(), LABELS)
    load_dataset("cifar10")
    (cache_file,) = (Path(os.environ["BENCH_CACHE_DIR"]) / "datasets" / "cifar10").iterdir()
    cache_file.write_bytes(b"not a zip")
    clear_memory_cache()
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        ds = load_dataset("cifar10")
    assert np.array_equal(ds.images, pattern())


# -------------------------------------------------------------------------------------------- errors


def test_unknown_name_suggests_close_names(root: Path) -> None:
    with pytest.raises(BenchError, match="Did you mean") as info:
        load_dataset("cifar-10")
    assert "cifar10" in str(info.value)


@pytest.mark.parametrize("name", ["cifar10-jpeg", "cifar10-lossless300", "cifar10", "cifar100", "svhn", "imagenette"])
def test_missing_data_dir_names_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(BenchError, match="BENCH_DATA_DIR") as info:
        load_dataset(name)
    assert "\n" not in str(info.value)
    if name in ("cifar10", "cifar100", "svhn"):
        assert "--download" in str(info.value)


@pytest.mark.parametrize("name, split", [("cifar10-lossless300", "train"), ("cifar10", "validation"), ("svhn", "val")])
def test_unsupported_split(root: Path, name: str, split: str) -> None:
    with pytest.raises(BenchError, match="no split"):
        load_dataset(name, split)


def test_download_goes_through_torchvision(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: List[Dict[str, object]] = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append({"root": root, "train": train, "download": download})
            write_cifar_batch(Path(root) / "cifar-10-batches-py" / "test_batch", pattern(), LABELS)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_dataset("cifar10", "test", download=True)
    assert calls == [{"root": str(root), "train": False, "download": True}]
    assert np.array_equal(ds.images, pattern())


def test_failed_download_is_a_bench_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(**kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    with pytest.raises(BenchError, match="network unreachable"):
        load_dataset("svhn", "test", download=True)


# ----------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ArrayDataset]]:
    if not (data_dir() / "cifar10-jpeg" / "test.npz").is_file():
        shared_missing(f"no CIFAR-10 JPEG bundle under {data_dir()} (set BENCH_DATA_DIR)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENCH_CACHE_DIR", str(tmp_path_factory.mktemp("real-cache")))
        clear_memory_cache()
        yield lambda name: load_dataset(name, "test")
    clear_memory_cache()


def test_real_cifar10_jpeg_test(real_data: Callable[[str], ArrayDataset]) -> None:
    ds = real_data("cifar10-jpeg")
    assert len(ds) == 10_000 and ds.images.shape == (10_000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert int(ds.labels[0]) == 3 and ds.classes[3] == "cat" == CIFAR10_CLASSES[3]
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    x, y = ds.tensors(np.arange(4))
    assert x.shape == (4, 3, 32, 32) and y[0].item() == 3


def test_real_lossless300_matches_jpeg_order(real_data: Callable[[str], ArrayDataset]) -> None:
    lossless = real_data("cifar10-lossless300")
    assert len(lossless) == 300 and lossless.images.shape == (300, 32, 32, 3)
    jpeg = real_data("cifar10-jpeg")  # the first 100 lossless rows are test images 0..99
    assert np.array_equal(lossless.labels[:100], jpeg.labels[:100])
    error = np.abs(lossless.images[:100].astype(int) - jpeg.images[:100].astype(int)).mean()
    assert error < 12.0
