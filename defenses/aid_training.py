"""Training AID-Purifier's discriminator with AVmixup (Algorithm 1, App. A.3).

Every batch: PGD examples against the frozen classifier (delta = x_pgd - x; linf eps 8/255, step 2/255, 10 steps,
random start: the paper says only "PGD"), then AVmixup: x_AV = x + gamma * delta (gamma 1.5 for CIFAR-10),
u ~ U(0, 1) per example, x_hat = u x + (1 - u) x_AV, t_hat = 1 - u (clean 0, adversarial 1), and one SGD step on
the BCE of D(h_low(x_hat), h_high(x_hat)) against t_hat. SGD lr 0.01, wd 2e-4, momentum 0.9, 1 epoch.
Output: ``$BENCH_CHECKPOINT_DIR/aid-purifier/<classifier>/discriminator.{pt,manifest.json,weights.pt}``.

Measured (1 epoch on 50k images, docs/aid-purifier.md): on ResNet-20 D separates clean from PGD on 98.8% of held-out
pairs; on the PGD-trained ResNet-4b it stays at chance (53.7%): its pooled features barely move under 8/255 PGD.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from attacks.gradient import plain_pgd
from bench.training import TRAINERS, data_config, trainer_settings
from defenses.aid_purifier import AIDDiscriminator, TwoLayerTap, aid_checkpoint_folder, avmixup, discriminator_loss

@dataclass(frozen=True)
class AIDSettings:
    epochs: int = 1
    gamma: float = 1.5
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    layers: Optional[Tuple[str, str]] = None

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def pgd_delta(classifier, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int) -> torch.Tensor:
    """linf PGD on the classifier's cross-entropy, random start; returns x_adv - x."""
    return plain_pgd(classifier, x, y, eps, step_size, steps) - x


class AIDTrainer:
    def __init__(self, settings: AIDSettings, classifier, device: torch.device) -> None:
        self.s, self.device, self.classifier = settings, device, classifier.eval()
        self.tap = TwoLayerTap(classifier, settings.layers)
        low, high = self.tap.channels()
        self.discriminator = AIDDiscriminator(low, high).to(device)
        self.opt = torch.optim.SGD(self.discriminator.parameters(), lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        s = self.s
        delta = pgd_delta(self.classifier, x, y, s.eps, s.step_size, s.attack_steps)
        u = torch.rand(len(x), device=x.device)
        x_hat, t_hat = avmixup(x, delta, s.gamma, u)
        self.discriminator.train()
        with torch.no_grad():
            _, low, high = self.tap(x_hat)
        logits = self.discriminator(low, high)
        loss = discriminator_loss(logits, t_hat)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # how well D separates the two ends of the path, for the log
            _, lc, hc = self.tap(x)
            _, la, ha = self.tap((x + delta).clamp(0, 1))
            p_clean, p_adv = torch.sigmoid(self.discriminator(lc, hc)), torch.sigmoid(self.discriminator(la, ha))
        return {"loss": loss.item(), "p_adv_clean": p_clean.mean().item(), "p_adv_pgd": p_adv.mean().item(),
                "separation": ((p_adv > 0.5).float().mean() / 2 + (p_clean <= 0.5).float().mean() / 2).item()}

    def state(self, epoch: int) -> Dict[str, object]:
        return {"discriminator": self.discriminator.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch}

    def load(self, state: Dict[str, object]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["opt"])

    def weights(self) -> Dict[str, object]:
        return {"discriminator": self.discriminator.state_dict()}


@TRAINERS.register("aid-purifier")
def train_aid(options) -> Path:
    """``bench train --defense aid-purifier``: AVmixup training of the discriminator; resumable per epoch."""
    from bench.classifiers import load_classifier
    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import train_epochs, training_subset

    layers = options.extra.get("layers")  # text (``--option layers=a,b``) is read by build_settings; a list from Python
    settings = trainer_settings(AIDSettings, options, **({"layers": tuple(layers)} if isinstance(layers, list) else {}))
    device = resolve_device(options.device)
    classifier = load_classifier(options.classifier, device)
    train = load_dataset(options.dataset, "train")
    indices = training_subset(len(train), options.train_size, options.seed)
    folder = Path(options.out) if options.out else aid_checkpoint_folder(options.classifier)
    torch.manual_seed(options.seed)
    trainer = AIDTrainer(settings, classifier, device)
    config = {"defense": "aid-purifier", "settings": settings.to_dict(), "classifier": options.classifier,
              **data_config(options, indices), "layers": list(trainer.tap.layers), "discriminator": trainer.discriminator.config()}
    return train_epochs(options, trainer, folder, "discriminator", config, settings.epochs, train, indices)
