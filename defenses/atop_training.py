"""Training AToP purifiers: pre-training under the random transform, then AToP fine-tuning (Algorithm 1).

Pre-training (the "without AToP" purifier): the generator reconstructs clean training images from their
transformed versions. GAN purifier: L_df = hinge adversarial term against a PatchGAN discriminator
(weight ``gan_weight``) + L1 to the clean image; AE purifier: mean squared error.

Fine-tuning (Eq. 5/9): the classifier stays frozen; every step builds FGSM examples x' (eps 8/255)
against the bare classifier (``adv_target="classifier"``, as the released code) or the whole pipeline
(``"pipeline"``), and minimizes L_org(reconstruction of ``rec_target``) + lambda * CE(y, f(g(t(x')))).
Eq. 9 as printed reconstructs x' itself (``rec_target="adv"``, the default); ``"clean"`` reconstructs x.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import BenchError
from bench.core.record import sha256_file, write_json_atomic
from bench.training import TRAINERS, data_config
from defenses.purifiers import PURIFIERS, PatchDiscriminator
from defenses.transforms import RT2, RT3


@dataclass(frozen=True)
class AToPSettings:
    transform: str = "rt2"
    purifier: str = "gan"
    pretrain_epochs: int = 8
    finetune_epochs: int = 2
    pretrain_lr: float = 2e-3  # Adam, cosine decay to 1% over the stage
    finetune_lr: float = 5e-4
    gan_weight: float = 0.1
    lam: float = 0.1
    fgsm_eps: float = 8 / 255
    adv_target: str = "classifier"
    rec_target: str = "adv"
    pretrained: Optional[str] = None  # start fine-tuning from this pre-trained purifier instead of pre-training
    width: int = 32  # channels of the purifier's first scale (x2, x4 deeper); the shipped ones are 32 wide

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


class AToPTrainer:
    """Holds generator, optional discriminator and optimizers; one method per training step."""

    def __init__(self, settings: AToPSettings, classifier: nn.Module, device: torch.device) -> None:
        from defenses.atop import TRANSFORMS, build_purifier

        self.s, self.device, self.classifier = settings, device, classifier.eval()
        self.generator = PURIFIERS[settings.purifier](width=settings.width).to(device)
        self.transform = TRANSFORMS[settings.transform]()
        # RT3 copies are single masks with missing rate 1/N: pre-train on exactly that distribution.
        n = getattr(self.transform, "n_masks", 4)
        self.pretrain_transform = RT2(self.transform.sigma, self.transform.patch_fraction, 1.0 / n) if isinstance(self.transform, RT3) else self.transform
        self.purify = build_purifier(self.transform, self.generator)
        self.discriminator = PatchDiscriminator().to(device) if settings.purifier == "gan" else None
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=settings.pretrain_lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=settings.pretrain_lr, betas=(0.5, 0.999)) if self.discriminator else None

    def set_lr(self, stage: str, progress: float) -> float:
        """Cosine decay from the stage's base rate to 1% of it; ``progress`` in [0, 1] over the stage."""
        base = self.s.pretrain_lr if stage == "pretrain" else self.s.finetune_lr
        lr = base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))))
        for opt in filter(None, (self.opt_g, self.opt_d)):
            for group in opt.param_groups:
                group["lr"] = lr
        return lr

    def pipeline(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(self.transform(x)))

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake.detach())).mean()
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.item()

    def _generator_loss(self, fake: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.discriminator is None:
            return F.mse_loss(fake, target)
        return F.l1_loss(fake, target) - self.s.gan_weight * self.discriminator(fake).mean()

    def _update(self, fake: torch.Tensor, target: torch.Tensor, extra: Optional[torch.Tensor] = None) -> Dict[str, float]:
        logs = {"d": self._discriminator_step(target, fake)} if self.discriminator is not None else {}
        rec = self._generator_loss(fake, target)
        loss = rec if extra is None else rec + self.s.lam * extra
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        logs.update({"rec": rec.item(), "loss": loss.item(), "l1": F.l1_loss(fake.detach(), target).item()})
        return logs

    def pretrain_step(self, x: torch.Tensor) -> Dict[str, float]:
        self.generator.train()
        fake = self.generator(self.pretrain_transform(x))
        return self._update(fake, x)

    def fgsm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model = self.classifier if self.s.adv_target == "classifier" else self.pipeline
        x_req = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y), x_req)
        return (x + self.s.fgsm_eps * grad.sign()).clamp(0, 1).detach()

    def finetune_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        self.generator.eval()
        x_adv = self.fgsm(x, y)
        self.generator.train()
        fake = self.purify(self.transform(x_adv))
        ce = F.cross_entropy(self.classifier(fake), y)
        logs = self._update(fake, x_adv if self.s.rec_target == "adv" else x, ce)
        logs["ce"] = ce.item()
        return logs

    def state(self, epoch: int) -> Dict[str, object]:
        state = {"generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(), "epoch": epoch}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(), opt_d=self.opt_d.state_dict())
        return state

    def load(self, state: Dict[str, object], optimizers: bool = True) -> None:
        self.generator.load_state_dict(state["generator"])
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            if optimizers:
                self.opt_d.load_state_dict(state["opt_d"])
        if optimizers:
            self.opt_g.load_state_dict(state["opt_g"])


class _Stage:
    """One AToP stage seen as a one-stage trainer for ``bench.training.train_epochs``."""

    def __init__(self, trainer: AToPTrainer, stage: str) -> None:
        self.trainer, self.stage, self.device = trainer, stage, trainer.device

    def set_progress(self, progress: float) -> float:
        return self.trainer.set_lr(self.stage, progress)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        return self.trainer.pretrain_step(x) if self.stage == "pretrain" else self.trainer.finetune_step(x, y)

    def state(self, epoch: int) -> Dict[str, object]:
        return self.trainer.state(epoch)

    def load(self, state: Dict[str, object]) -> None:
        self.trainer.load(state)

    def weights(self) -> Dict[str, object]:
        return {"generator": self.trainer.generator.state_dict()}

    def eval_model(self) -> nn.Module:
        """The pipeline (transform, purifier, classifier) in eval mode, for the learning curve."""
        self.trainer.generator.eval()
        return _Pipeline(self.trainer)


class _Pipeline(nn.Module):
    """``AToPTrainer.pipeline`` as a module (declared stochastic: the transform draws)."""

    stochastic = True

    def __init__(self, trainer: "AToPTrainer") -> None:
        super().__init__()
        self.trainer = trainer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainer.pipeline(x)


def _adopt_pretrained(source: Path, folder: Path, config: Dict[str, object]) -> None:
    """Use another run's pre-trained purifier as this run's pre-training (e.g. RT3's copies are RT2 inputs
    with missing rate 1/N, so RT2's pre-training serves RT3): copy its weights and say where they came from."""
    if not source.is_file():
        raise BenchError(f"--pretrained {source}: no such file")
    state = torch.load(source, map_location="cpu", weights_only=True)
    if "generator" not in state:
        raise BenchError(f"--pretrained {source} holds no 'generator' weights")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "pretrain.pt"
    if not target.is_file():
        torch.save({k: v for k, v in state.items() if k in ("generator", "discriminator")}, target)
        write_json_atomic(folder / "pretrain.manifest.json", {
            "copied_from": str(source), "source_sha256": sha256_file(source), "checkpoint": target.name,
            "sha256": sha256_file(target), "config": config, "finished": True,
        })


@TRAINERS.register("atop")
def train_atop(options) -> "Path":
    """``bench train --defense atop``: pre-train, then fine-tune; resumable per epoch."""
    from bench.classifiers import load_classifier
    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import build_settings, stage_finished, train_epochs, training_subset
    from defenses.atop import atop_checkpoint

    settings = build_settings(AToPSettings, options.extra, "atop")
    if settings.adv_target not in ("classifier", "pipeline") or settings.rec_target not in ("adv", "clean"):
        raise BenchError(f"atop: adv_target must be classifier|pipeline and rec_target adv|clean, got {settings}")
    device = resolve_device(options.device)
    classifier = load_classifier(options.classifier, device)
    train = load_dataset(options.dataset, "train")
    indices = training_subset(len(train), options.train_size, options.seed)
    folder = Path(options.out) if options.out else atop_checkpoint(options.classifier, settings.transform, settings.purifier, "x").parent
    torch.manual_seed(options.seed)  # the purifier's initial weights follow --seed, as NRP/JATP's do
    trainer = AToPTrainer(settings, classifier, device)
    config = {"settings": settings.to_dict(), "classifier": options.classifier, **data_config(options, indices),
              "generator": f"{type(trainer.generator).__name__}, {sum(p.numel() for p in trainer.generator.parameters())} parameters"}
    stages = [("pretrain", settings.pretrain_epochs), ("finetune", settings.finetune_epochs)]
    if settings.pretrained:
        _adopt_pretrained(Path(settings.pretrained), folder, config)
        stages = stages[1:]
    for stage, epochs in stages:
        if stage == "finetune":  # start from the pre-trained purifier; a saved fine-tuning epoch overrides it
            if not stage_finished(folder, "pretrain"):
                break  # the time budget ran out in pre-training: rerun with more to go on
            trainer.load(torch.load(folder / "pretrain.pt", map_location="cpu", weights_only=True), optimizers=False)
        train_epochs(options, _Stage(trainer, stage), folder, stage, {**config, "stage": stage}, epochs, train, indices)
    return folder
