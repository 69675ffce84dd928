"""Training PixelDefend's PixelCNN: maximum likelihood over 8-bit pixels (``bench train --defense pixeldefend``).

The PixelCNN models images, not a classifier's decisions, so one model serves every classifier of a dataset; the
``--classifier`` flag is ignored. Every batch: the images' 8-bit levels, the mean per-sub-pixel cross-entropy of
the 256-way conditionals (``PixelCNN.nll``), one Adam step (lr 1e-3, the rate of the PixelCNN paper's
experiments). At the end, the test bits/dim on the first ``test_images`` images of the dataset's test split is
measured and stored in the weights file and the manifest. Output:
``$BENCH_CHECKPOINT_DIR/pixeldefend/<dataset>/pixelcnn.{pt,manifest.json,weights.pt}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from bench.training import TRAINERS, data_config, trainer_settings
from defenses.pixeldefend import PixelCNN, bits_per_dim, pixelcnn_folder, to_levels


@dataclass(frozen=True)
class PixelCNNSettings:
    epochs: int = 3
    channels: int = 32
    layers: int = 5
    output: str = "softmax"  # or "logistic": PixelCNN++'s discretised logistic mixture (see PixelCNN)
    mixtures: int = 10
    residual: bool = False
    lr: float = 1e-3
    test_images: int = 2000

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def test_bits_per_dim(model: PixelCNN, images, device: torch.device, batch_size: int = 250) -> float:
    """Mean negative log2-likelihood per sub-pixel over ``images`` (N, H, W, 3 uint8)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        chunk = torch.tensor(images[start:start + batch_size]).permute(0, 3, 1, 2).long().to(device)
        total += model.nll(chunk).item() * len(chunk)
        count += len(chunk)
    return bits_per_dim(total / count)


class PixelCNNTrainer:
    def __init__(self, settings: PixelCNNSettings, device: torch.device, test_images) -> None:
        self.s, self.device, self.test_images = settings, device, test_images
        self.model = PixelCNN(settings.channels, settings.layers, settings.output, settings.mixtures,
                              settings.residual).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.test_bpd: float | None = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        self.model.train()
        loss = self.model.nll(to_levels(x))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item(), "bits_per_dim": bits_per_dim(loss.item())}

    def state(self, epoch: int) -> Dict[str, Any]:
        return {"pixelcnn": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch}

    def load(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["pixelcnn"])
        self.opt.load_state_dict(state["opt"])

    def weights(self) -> Dict[str, Any]:
        """The inference weights, with the architecture and the test bits/dim measured now."""
        self.test_bpd = test_bits_per_dim(self.model, self.test_images, self.device)
        return {"pixelcnn": self.model.state_dict(),
                "architecture": self.model.architecture(),
                "test_bits_per_dim": self.test_bpd, "test_images": len(self.test_images)}


@TRAINERS.register("pixeldefend")
def train_pixeldefend(options) -> Path:
    """``bench train --defense pixeldefend``: maximum-likelihood training of the PixelCNN; resumable per epoch."""
    import logging

    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import train_epochs, training_subset

    settings = trainer_settings(PixelCNNSettings, options)
    device = resolve_device(options.device)
    train, test = load_dataset(options.dataset, "train"), load_dataset(options.dataset, "test")
    indices = training_subset(len(train), options.train_size, options.seed)
    folder = Path(options.out) if options.out else pixelcnn_folder(options.dataset)
    torch.manual_seed(options.seed)
    trainer = PixelCNNTrainer(settings, device, test.images[:settings.test_images])
    config = {"defense": "pixeldefend", "settings": settings.to_dict(), **data_config(options, indices), "pixelcnn": trainer.model.config()}
    out = train_epochs(options, trainer, folder, "pixelcnn", config, settings.epochs, train, indices)
    logging.getLogger("bench.train.pixelcnn").info("test bits/dim %.3f on %d test images", trainer.test_bpd,
                                                   len(trainer.test_images))
    return out
