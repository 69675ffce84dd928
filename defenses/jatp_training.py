"""Training the pre-processing networks of NRP and JATP in front of a frozen classifier.

**NRP** (Naseer et al. 2020, Sec. 3): self-supervised perturbations (SSP) maximize the distortion of a fixed
feature extractor's representation within eps 16/255, with no labels; the purifier P learns to map them back
with ``lambda_feat * ||f(P(x')) - f(x)||^2 + gamma_pix * |P(x') - x| + alpha_gan * L_G`` where L_G is the
relativistic average GAN loss against a discriminator D (real = clean, fake = purified). The feature extractor
here is the frozen classifier's internal layer (``feature_layer``; NRP used VGG-16 conv3_3).

**JATP** (Algorithm 1): each step crafts *full* adversarial examples in feature space (Eq. 5: PGD maximizing the
MSE between internal-layer features of F = T o P at x* and at x, eps 8/255, step 0.01), then minimizes Eq. 10:
``L_adv + beta * L_pix`` with ``L_adv = BCE(T(P(x*)), y) + alpha * FSM * (1 - t_y(P(x)))`` (Eq. 7-9) and
``L_pix = ||P(x*) - x||_2`` (Eq. 6), alpha 5, beta 3, SGD momentum 0.9, wd 2e-4, lr 1e-2 divided by 10 at 50%
and 83% of training (the paper's epochs 15 and 25 of 30). ``oblivious=True`` crafts x* against the bare
classifier T instead (the "-obl" setting of JATP Fig. 2a).

Both train only P; the classifier stays frozen and in eval mode. Outputs go to
``$BENCH_CHECKPOINT_DIR/<defense>/<classifier>/purifier.{pt,manifest.json,weights.pt}``; restarting the same
command resumes after the last finished epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.errors import BenchError
from bench.training import TRAINERS, data_config, trainer_settings
from defenses.nrp_network import FeatureTap, NRPGenerator, RelativisticDiscriminator, relativistic_losses

# --- loss terms (each a pure function of tensors, tested against hand-computed values) -------------------

def boosted_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 7 per sample: ``-log p_y - log(1 - max_{k != y} p_k)``."""
    log_probs = F.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    others = probs.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -log_probs.gather(1, y[:, None]).squeeze(1) - torch.log1p(-others.clamp(max=1 - 1e-12))


def feature_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of two feature maps (Eq. 5's and Eq. 8's distance d)."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def pixel_l2(purified: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Eq. 6 per sample: the L2 norm of ``P(x*) - x`` over all pixels and channels."""
    return (purified - clean).flatten(1).norm(dim=1)


def pixel_mse(purified: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared pixel difference: the per-pixel reading of Eq. 6 (a 3072-times smaller scale than the
    L2 norm's square, so the pixel term no longer dominates the loss)."""
    return (purified - clean).pow(2).flatten(1).mean(dim=1)


PIXEL_LOSSES = {"l2": pixel_l2, "mse": pixel_mse}


def jatp_loss(
    logits_adv: torch.Tensor, y: torch.Tensor, feat_adv: torch.Tensor, feat_clean: torch.Tensor,
    logits_clean: torch.Tensor, purified_adv: torch.Tensor, clean: torch.Tensor, alpha: float, beta: float,
    pixel_loss: str = "l2",
) -> Dict[str, torch.Tensor]:
    """Eq. 10 = mean_i [BCE_i + alpha * FSM_i * (1 - p_y(P(x_i)))] + beta * mean_i pix(P(x*_i), x_i).

    ``feat_adv``/``feat_clean`` are the classifier's internal features of P(x*) and P(x) (Eq. 8);
    ``logits_clean`` are T(P(x)), whose true-class probability softly marks misclassified points (Eq. 9). ``pix`` is
    Eq. 6's L2 norm over the image (``"l2"``, as printed) or the per-pixel mean square (``"mse"``).
    """
    bce = boosted_cross_entropy(logits_adv, y)
    fsm = feature_mse(feat_adv, feat_clean)
    weight = 1 - F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    adv = (bce + alpha * fsm * weight).mean()
    pix = PIXEL_LOSSES[pixel_loss](purified_adv, clean).mean()
    return {"loss": adv + beta * pix, "adv": adv, "bce": bce.mean(), "fsm": fsm.mean(), "pix": pix}


def feature_pgd(
    features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, step_size: float, steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """Eq. 5: linf PGD maximizing ``feature_mse(features(x'), features(x))`` over the eps-ball of x in [0, 1]."""
    with torch.no_grad():
        target = features(x).detach()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = feature_mse(features(x_adv), target).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


# --- settings and trainers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PurifierShape:
    """What both recipes share: the classifier layer they read, the generator's size, and augmentation."""

    feature_layer: Optional[str] = None
    nf: int = 16
    gc: int = 8
    blocks: int = 3
    scale: int = 2
    augment: bool = True


@dataclass(frozen=True)
class NRPSettings(PurifierShape):
    epochs: int = 4
    eps: float = 16 / 255
    step_size: float = 4 / 255
    attack_steps: int = 5
    lr: float = 1e-3  # Adam (NRP: 1e-4 for far longer training)
    lambda_feat: float = 1.0
    gamma_pix: float = 1e-2
    alpha_gan: float = 5e-3

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class JATPSettings(PurifierShape):
    epochs: int = 4
    eps: float = 8 / 255
    step_size: float = 0.01
    attack_steps: int = 5  # not stated in the paper
    oblivious: bool = False
    alpha: float = 5.0
    beta: float = 3.0
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple = (0.5, 0.83)
    grad_clip: Optional[float] = 1.0  # not in the paper: without it lr 1e-2 diverged in 5 steps here
    init: Optional[str] = None  # start from this purifier's weights (e.g. NRP's) instead of the identity
    # Eq. 6's "L2 loss": per-pixel mean square ("mse", the default: as PyTorch's L2 loss reads), or the per-image L2
    # norm as the equation prints it ("l2"). Measured on ResNet-4b at 2/255, 30 steps of batch 32: the L2 norm keeps the
    # purifier at the identity (mean |P(x) - x| 0.32/255; the shipped checkpoints were trained so and are the
    # identity), the mean square lets it move (4.23/255).
    pixel_loss: str = "mse"

    def __post_init__(self) -> None:
        if self.pixel_loss not in PIXEL_LOSSES:
            raise BenchError(f"jatp: pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {self.pixel_loss!r}")

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "milestones": list(self.milestones)}


def generator_for(settings: PurifierShape) -> NRPGenerator:
    return NRPGenerator(settings.nf, settings.gc, settings.blocks, settings.scale)


class NRPTrainer:
    def __init__(self, settings: NRPSettings, classifier: nn.Module, device: torch.device) -> None:
        self.s, self.device = settings, device
        self.tap = FeatureTap(classifier, settings.feature_layer)
        self.generator = generator_for(settings).to(device)
        self.discriminator = RelativisticDiscriminator().to(device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=settings.lr, betas=(0.9, 0.999))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=settings.lr, betas=(0.9, 0.999))

    def set_progress(self, progress: float) -> float:
        return self.s.lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        s = self.s
        x_ssp = feature_pgd(self.tap.features, x, s.eps, s.step_size, s.attack_steps)  # no labels: self-supervised
        self.generator.train()
        purified = self.generator(x_ssp)
        d_loss, _ = relativistic_losses(self.discriminator(x), self.discriminator(purified.detach()))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        with torch.no_grad():
            target = self.tap.features(x)
        feat = feature_mse(self.tap.features(purified), target).mean()
        pix = (purified - x).abs().mean()
        _, g_adv = relativistic_losses(self.discriminator(x).detach(), self.discriminator(purified))
        loss = s.lambda_feat * feat + s.gamma_pix * pix + s.alpha_gan * g_adv
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return {"loss": loss.item(), "feat": feat.item(), "pix": pix.item(), "g_adv": g_adv.item(), "d": d_loss.item()}

    def state(self, epoch: int) -> Dict[str, object]:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "epoch": epoch}

    def load(self, state: Dict[str, object]) -> None:
        for key in ("generator", "discriminator", "opt_g", "opt_d"):
            getattr(self, key).load_state_dict(state[key])

    def weights(self) -> Dict[str, object]:
        return {"generator": self.generator.state_dict()}


class JATPTrainer:
    def __init__(self, settings: JATPSettings, classifier: nn.Module, device: torch.device) -> None:
        self.s, self.device, self.classifier = settings, device, classifier.eval()
        self.tap = FeatureTap(classifier, settings.feature_layer)
        self.generator = generator_for(settings).to(device)
        if settings.init:
            from bench.classifiers.base import load_state_dict

            self.generator.load_state_dict(load_state_dict(Path(settings.init), key="generator"), strict=True)
        self.opt_g = torch.optim.SGD(self.generator.parameters(), lr=settings.lr, momentum=settings.momentum,
                                     weight_decay=settings.weight_decay)

    @property
    def eval_eps(self) -> float:
        """The learning curve's PGD-10 radius: the training eps, which is the threat this trainer defends against."""
        return self.s.eps

    def set_progress(self, progress: float) -> float:
        """lr 1e-2, divided by 10 at each milestone (fractions of the whole run)."""
        lr = self.s.lr * 0.1 ** sum(progress >= m for m in self.s.milestones)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        return lr

    def craft(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 5 against the full model T o P (or against T alone when oblivious)."""
        self.generator.eval()
        if self.s.oblivious:
            features = self.tap.features
        else:
            def features(z: torch.Tensor) -> torch.Tensor:
                return self.tap.features(self.generator(z))
        return feature_pgd(features, x, self.s.eps, self.s.step_size, self.s.attack_steps)

    def losses(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        purified = self.generator(torch.cat([x_adv, x]))
        logits, feats = self.tap(purified)
        n = len(x)
        terms = jatp_loss(logits[:n], y, feats[:n], feats[n:], logits[n:], purified[:n], x, self.s.alpha, self.s.beta,
                          self.s.pixel_loss)
        terms["change"] = (purified[n:] - x).abs().mean().detach() * 255  # how far P moves a clean image, in 1/255
        return terms

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        x_adv = self.craft(x)
        self.generator.train()
        terms = self.losses(x, x_adv, y)
        self.opt_g.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.s.grad_clip)
        self.opt_g.step()
        return {k: v.item() for k, v in terms.items()}

    def state(self, epoch: int) -> Dict[str, object]:
        return {"generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(), "epoch": epoch}

    def load(self, state: Dict[str, object]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])

    def weights(self) -> Dict[str, object]:
        return {"generator": self.generator.state_dict()}

    def eval_model(self) -> nn.Module:
        """Purifier then classifier, in eval mode, for the learning curve."""
        self.generator.eval()
        return nn.Sequential(self.generator, self.classifier)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's augmentation: 4-pixel zero padding with a random 32x32 crop, and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out.contiguous()


def preprocessing_checkpoint_folder(defense: str, classifier: str, root: Optional[Path] = None) -> Path:
    from bench.core.paths import checkpoint_dir

    return (checkpoint_dir() if root is None else root) / defense / classifier.replace(":", "-")


def _train(options, name: str, settings, trainer_cls) -> Path:
    from bench.classifiers import load_classifier
    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import train_epochs, training_subset

    device = resolve_device(options.device)
    classifier = load_classifier(options.classifier, device)
    train = load_dataset(options.dataset, "train")
    indices = training_subset(len(train), options.train_size, options.seed)
    folder = Path(options.out) if options.out else preprocessing_checkpoint_folder(name, options.classifier)
    torch.manual_seed(options.seed)
    trainer = trainer_cls(settings, classifier, device)
    config = {"defense": name, "settings": settings.to_dict(), "classifier": options.classifier, **data_config(options, indices), "feature_layer": trainer.tap.layer,
              "generator": trainer.generator.config()}
    return train_epochs(options, trainer, folder, "purifier", config, settings.epochs, train, indices,
                        augment if settings.augment else None)


@TRAINERS.register("nrp")
def train_nrp(options) -> Path:
    """``bench train --defense nrp``: NRP's self-supervised purifier training (also serves ``nrp-dynamic``)."""
    return _train(options, "nrp", trainer_settings(NRPSettings, options), NRPTrainer)


@TRAINERS.register("jatp")
def train_jatp(options) -> Path:
    """``bench train --defense jatp [--oblivious]``: JATP's joint adversarial training (Algorithm 1)."""
    settings = trainer_settings(JATPSettings, options)
    return _train(options, "jatp-obl" if settings.oblivious else "jatp", settings, JATPTrainer)


@TRAINERS.register("jatp-obl")
def train_jatp_oblivious(options) -> Path:
    """``bench train --defense jatp-obl``: JATP's loss on examples crafted against the bare classifier."""
    return _train(options, "jatp-obl", trainer_settings(JATPSettings, options, oblivious=True), JATPTrainer)
