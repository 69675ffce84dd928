"""Image datasets by name, decoded once into uint8 arrays and cached.

``load_dataset(name, split)`` looks ``name`` up in ``DATASETS`` and returns an ``ArrayDataset``: uint8
images (N, H, W, 3) in RGB plus int64 labels. Files are read below ``$BENCH_DATA_DIR`` in these layouts:

- ``cifar10-jpeg``: ``cifar10-jpeg/{train,test}.npz`` (JPEG bytes + offsets + labels), decoded with Pillow.
- ``cifar10-lossless300``: ``cifar10-test-lossless300/cifar10_test_lossless300.npz`` (test split only).
- ``cifar10`` / ``cifar100``: torchvision's python pickles in ``cifar-10-batches-py/`` and
  ``cifar-100-python/`` (pickles execute code when read: use files from a trusted source).
- ``svhn``: torchvision's ``svhn/{train,test,extra}_32x32.mat``.
- ``imagenette``: ``imagenette2/{train,val}/<wnid>/*.JPEG`` (``test`` reads ``val``); the short side is
  resized to 256 and the centre cropped to 256x256.

Decoded arrays are memoised in the process and cached on disk as an uncompressed ``.npz`` under
``$BENCH_CACHE_DIR/datasets/<name>/``, keyed by split and a fingerprint (path, size, mtime_ns) of every
source file, so a changed source is decoded again. The arrays are read-only: they are shared by every
dataset returned for the same files.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from bench.core.errors import BenchError
from bench.core.paths import DATA_ENV, cache_dir, data_dir, require_file
from bench.core.registry import Registry

Arrays = Tuple[np.ndarray, np.ndarray]

CIFAR10_CLASSES: Tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR100_CLASSES: Tuple[str, ...] = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
    telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm""".split()
)
SVHN_CLASSES: Tuple[str, ...] = tuple(str(digit) for digit in range(10))
IMAGENETTE_SIZE = 256
IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz"
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_CACHE_VERSION = "1"  # bump when a decoder changes its output
_MEMO: Dict[Tuple[str, str, str], Arrays] = {}


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A whole split in memory: uint8 NHWC RGB images and int64 labels (read-only arrays)."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    classes: Tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        shape = self.images.shape
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or shape[3] != 3:
            raise ValueError(f"{self.name}: images must be uint8 (N, H, W, 3), got {self.images.dtype} {shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != shape[:1]:
            got = f"{self.labels.dtype} {self.labels.shape}"
            raise ValueError(f"{self.name}: labels must be int64 ({shape[0]},), got {got}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self, indices: np.ndarray | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images as contiguous float32 NCHW in [0, 1] and int64 labels (new tensors; all or ``indices``)."""
        images, labels = self.images, self.labels
        if indices is not None:
            index = np.asarray(indices)
            if index.ndim != 1:
                raise ValueError(f"indices must be one-dimensional, got shape {index.shape}")
            images, labels = images[index], labels[index]
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        x /= 255.0
        return torch.from_numpy(x), torch.from_numpy(np.array(labels, dtype=np.int64))


Loader = Callable[[str, bool], ArrayDataset]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(name: str, split: str = "test", download: bool = False) -> ArrayDataset:
    """Return split ``split`` of dataset ``name`` (``download`` lets torchvision fetch missing files)."""
    return DATASETS.get(name)(split, download)


def clear_memory_cache() -> None:
    """Forget the in-process memo (the on-disk cache stays)."""
    _MEMO.clear()


# ----------------------------------------------------------------------------------------- caching


def _fingerprint(sources: Sequence[Path]) -> str:
    """Hash of the path, size and mtime_ns of every source file (plus the decoder version)."""
    digest = hashlib.sha256(f"bench-datasets-v{_CACHE_VERSION}\n".encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _cached(name: str, split: str, sources: Sequence[Path], decode: Callable[[], Arrays]) -> Arrays:
    """Arrays from the memo, else from the disk cache, else from ``decode`` (then stored in both)."""
    key = (name, split, _fingerprint(sources))
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / "datasets" / name / f"{split}-{key[2]}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = decode()
        _write_cache(path, arrays)
    for array in arrays:
        array.setflags(write=False)
    _MEMO[key] = arrays
    return arrays


def _read_cache(path: Path) -> Optional[Arrays]:
    """The cached (images, labels), or None when absent, unreadable or malformed."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=2)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64 or labels.shape != images.shape[:1]:
        return None
    return images, labels


def _write_cache(path: Path, arrays: Arrays) -> None:
    """Write atomically (temp file + ``os.replace``); a failure only costs a decode next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, images=arrays[0], labels=arrays[1])
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=2)


# ----------------------------------------------------------------------------------------- helpers


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise BenchError(f"Dataset {name!r} has no split {split!r}; available: {', '.join(allowed)}.")


def _require_or_download(what: str, paths: Sequence[Path], download: bool, tv_class: str, **kwargs: object) -> None:
    """Raise a one-line error for missing files, or let ``torchvision.datasets.<tv_class>`` fetch them."""
    missing = [path for path in paths if not path.is_file()]
    if not missing:
        return
    if not download:
        raise BenchError(
            f"{what} not found at {missing[0]}. Put torchvision's files there, or point ${DATA_ENV} at the folder "
            f"that holds them (currently {os.environ.get(DATA_ENV) or 'unset'}); --download fetches them when a "
            "network is available."
        )
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, tv_class)(download=True, **kwargs)
    except (OSError, RuntimeError) as exc:
        raise BenchError(f"Downloading {what} with torchvision failed: {exc}") from None
    for path in paths:
        require_file(path, what, DATA_ENV)


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _decode_jpeg_npz(path: Path) -> Arrays:
    """Decode every JPEG of a ``jpeg`` + ``offsets`` + ``labels`` bundle to RGB uint8."""
    with np.load(path, allow_pickle=False) as npz:
        blob, offsets, labels = npz["jpeg"], npz["offsets"], npz["labels"]
    if offsets.shape != (labels.shape[0] + 1,):
        raise BenchError(f"{path}: {offsets.shape[0]} offsets for {labels.shape[0]} labels")
    images: List[np.ndarray] = []
    for i in range(labels.shape[0]):
        try:
            images.append(_decode_image(blob[offsets[i] : offsets[i + 1]].tobytes()))
        except (OSError, ValueError) as exc:
            raise BenchError(f"{path}: image {i} does not decode ({exc})") from None
    return np.stack(images), labels.astype(np.int64)


def _read_cifar_pickles(paths: Sequence[Path], label_key: bytes) -> Arrays:
    """Concatenate torchvision CIFAR batches: ``b"data"`` (N, 3072) row-major CHW and labels."""
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(np.asarray(entry[label_key], dtype=np.int64).reshape(-1))
        except (KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise BenchError(f"{path} is not a torchvision CIFAR batch ({type(exc).__name__}: {exc})") from None
        images.append(data.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_svhn(path: Path) -> Arrays:
    """torchvision's SVHN ``.mat``: ``X`` (32, 32, 3, N), ``y`` (N, 1) where 10 stands for digit 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
        images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise BenchError(f"{path} is not a torchvision SVHN file ({type(exc).__name__}: {exc})") from None
    labels[labels == 10] = 0
    return images, labels


def _list_image_folder(folder: Path) -> Tuple[Tuple[str, ...], List[Path], np.ndarray]:
    """ImageFolder order: sorted class folders, then sorted image files within each."""
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    files: List[Path] = []
    labels: List[int] = []
    for index, wnid in enumerate(classes):
        found = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        files += found
        labels += [index] * len(found)
    if not files:
        raise BenchError(f"No images found in class folders under {folder}.")
    return classes, files, np.asarray(labels, dtype=np.int64)


def _load_square(path: Path, size: int) -> np.ndarray:
    """RGB image resized (bilinear) so its short side is ``size``, then centre-cropped to size x size."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise BenchError(f"Cannot read image {path} ({exc})") from None
    width, height = rgb.size
    if min(width, height) != size:
        width, height = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _decode_folder(files: Sequence[Path], size: int) -> np.ndarray:
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        images[i] = _load_square(path, size)
    return images


# ----------------------------------------------------------------------------------------- loaders


@DATASETS.register("cifar10-jpeg")
def _load_cifar10_jpeg(split: str, download: bool) -> ArrayDataset:
    """The offline CIFAR-10 bundle (original JPEG files, quality 75); nothing to download."""
    _check_split("cifar10-jpeg", split, ("train", "test"))
    path = require_file(data_dir() / "cifar10-jpeg" / f"{split}.npz", f"CIFAR-10 JPEG {split} bundle", DATA_ENV)
    images, labels = _cached("cifar10-jpeg", split, [path], lambda: _decode_jpeg_npz(path))
    return ArrayDataset("cifar10-jpeg", split, images, labels, 10, CIFAR10_CLASSES, str(path))


@DATASETS.register("cifar10-lossless300")
def _load_cifar10_lossless300(split: str, download: bool) -> ArrayDataset:
    """300 CIFAR-10 test images with their original lossless pixels (arrays ``x``, ``y``)."""
    _check_split("cifar10-lossless300", split, ("test",))
    where = data_dir() / "cifar10-test-lossless300" / "cifar10_test_lossless300.npz"
    path = require_file(where, "CIFAR-10 lossless-300 test set", DATA_ENV)

    def read() -> Arrays:
        with np.load(path, allow_pickle=False) as npz:
            return np.ascontiguousarray(npz["x"], dtype=np.uint8), npz["y"].astype(np.int64)

    images, labels = _cached("cifar10-lossless300", split, [path], read)
    return ArrayDataset("cifar10-lossless300", split, images, labels, 10, CIFAR10_CLASSES, str(path))


@DATASETS.register("cifar10")
def _load_cifar10(split: str, download: bool) -> ArrayDataset:
    """Lossless CIFAR-10 in torchvision's ``cifar-10-batches-py`` format."""
    _check_split("cifar10", split, ("train", "test"))
    root = data_dir()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [root / "cifar-10-batches-py" / name for name in names]
    what = "CIFAR-10 (torchvision format)"
    _require_or_download(what, paths, download, "CIFAR10", root=str(root), train=split == "train")
    images, labels = _cached("cifar10", split, paths, lambda: _read_cifar_pickles(paths, b"labels"))
    return ArrayDataset("cifar10", split, images, labels, 10, CIFAR10_CLASSES, str(paths[0].parent))


@DATASETS.register("cifar100")
def _load_cifar100(split: str, download: bool) -> ArrayDataset:
    """CIFAR-100 (fine labels) in torchvision's ``cifar-100-python`` format."""
    _check_split("cifar100", split, ("train", "test"))
    root = data_dir()
    path = root / "cifar-100-python" / split
    what = "CIFAR-100 (torchvision format)"
    _require_or_download(what, [path], download, "CIFAR100", root=str(root), train=split == "train")
    images, labels = _cached("cifar100", split, [path], lambda: _read_cifar_pickles([path], b"fine_labels"))
    return ArrayDataset("cifar100", split, images, labels, 100, CIFAR100_CLASSES, str(path))


@DATASETS.register("svhn")
def _load_svhn(split: str, download: bool) -> ArrayDataset:
    """SVHN cropped digits in torchvision's ``svhn/<split>_32x32.mat`` format (label 10 becomes 0)."""
    _check_split("svhn", split, ("train", "test", "extra"))
    root = data_dir() / "svhn"
    path = root / f"{split}_32x32.mat"
    _require_or_download("SVHN (torchvision format)", [path], download, "SVHN", root=str(root), split=split)
    images, labels = _cached("svhn", split, [path], lambda: _read_svhn(path))
    return ArrayDataset("svhn", split, images, labels, 10, SVHN_CLASSES, str(path))


@DATASETS.register("imagenette")
def _load_imagenette(split: str, download: bool) -> ArrayDataset:
    """fastai's Imagenette (10 ImageNet classes) at 256x256; ``test`` is the ``val`` folder. No download."""
    _check_split("imagenette", split, ("train", "test"))
    folder = data_dir() / "imagenette2" / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise BenchError(
            f"Imagenette not found at {folder}. Download the fastai imagenette2 archive ({IMAGENETTE_URL}) and "
            f"extract it in ${DATA_ENV} (currently {os.environ.get(DATA_ENV) or 'unset'}) to get "
            "imagenette2/{train,val}/<wnid>/*.JPEG; --download cannot fetch it."
        )
    classes, files, listed = _list_image_folder(folder)
    images, labels = _cached("imagenette", split, files, lambda: (_decode_folder(files, IMAGENETTE_SIZE), listed))
    return ArrayDataset("imagenette", split, images, labels, len(classes), classes, str(folder))


__all__ = [
    "ArrayDataset",
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "DATASETS",
    "SVHN_CLASSES",
    "clear_memory_cache",
    "load_dataset",
]
