"""``bench train --defense diffpure``: DiffPure's score model, trained here with the DDPM objective.

Noise prediction (Ho et al. 2020) under the VP-SDE of ``defenses.diffpure``: for a training image y in [-1, 1] (random
horizontal flips), a time t and noise eps, the model sees a(t) y + s(t) eps and is asked for eps (mean squared error).
Purification only queries the model for t <= t* (0.1 on CIFAR-10), so training concentrates there: t is drawn
uniformly from [1e-4, ``t_max``] with ``t_max`` = 0.2 by default, twice DiffPure's t*, instead of from [0, 1]; the
model is of no use for sampling from noise, which DiffPure never does. Adam, learning rate ``lr`` with a linear
warm-up over the first 2% of training, gradient-norm clipping at 1, an exponential moving average of the weights
(decay ``ema``, warmed up as (1 + u) / (10 + u) over the first updates u) that is what ships and what the learning
curve evaluates. The learning curve adds, every ``--eval-every`` epochs, the loss at t* on the held-out images and
the clean accuracy of the whole pipeline (the classifier behind a 10-step purification, one draw).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from bench.training import TRAINERS, data_config, trainer_settings
from defenses.diffpure import T_MIN, DiffPurification, diffpure_checkpoint_folder, diffuse
from defenses.score_network import ScoreUNet


@dataclass(frozen=True)
class DiffPureSettings:
    epochs: int = 10
    width: int = 32
    blocks: int = 1
    lr: float = 2e-4
    t_max: float = 0.2
    ema: float = 0.999
    eval_t_star: float = 0.1
    eval_steps: int = 10

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


class ScoreTrainer:
    def __init__(self, settings: DiffPureSettings, classifier: nn.Module, device: torch.device) -> None:
        self.s, self.device, self.classifier = settings, device, classifier.eval()
        self.model = ScoreUNet(settings.width, settings.blocks).to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.updates = 0

    def set_progress(self, progress: float) -> float:
        lr = self.s.lr * min(1.0, progress / 0.02)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def loss(self, model: nn.Module, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(y)
        return F.mse_loss(model(diffuse(y, t, noise), t), noise)

    def step(self, x: torch.Tensor, y_label: torch.Tensor) -> Dict[str, float]:
        y = 2 * x - 1
        t = T_MIN + (self.s.t_max - T_MIN) * torch.rand(len(y), device=y.device)
        self.model.train()
        loss = self.loss(self.model, y, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.updates += 1
        decay = self.ema_decay(self.updates)
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        return {"loss": loss.item()}

    def ema_decay(self, updates: int) -> float:
        """The average's decay after ``updates`` steps: (1 + u) / (10 + u) up to ``ema``, so that the average forgets
        the initialisation within a few hundred steps (with a constant 0.999 the average of a 700-step run still
        weighs the zero-output initial weights by half: measured, held-out clean 12.5% where the raw weights read
        34%)."""
        return min(self.s.ema, (1 + updates) / (10 + updates))

    def state(self, epoch: int) -> Dict[str, object]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "epoch": epoch,
                "updates": self.updates}

    def load(self, state: Dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.updates = int(state.get("updates", 0))

    def weights(self) -> Dict[str, object]:
        return {"score": self.ema.state_dict()}

    # the learning curve: clean accuracy through a short purification (no attack: each PGD step would cost a whole
    # reverse process), and the denoising loss at t*
    eval_attack = False

    def eval_model(self) -> nn.Module:
        purify = DiffPurification(self.ema, self.s.eval_t_star, self.s.eval_steps)
        return nn.Sequential(purify, self.classifier)

    def eval_extra(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        torch.manual_seed(0)
        with torch.no_grad():
            t = torch.full((len(x),), self.s.eval_t_star, device=x.device)
            return {"heldout_loss_at_tstar": self.loss(self.ema, 2 * x.to(self.device) - 1, t).item()}


@TRAINERS.register("diffpure")
def train_diffpure(options) -> Path:
    """``bench train --defense diffpure [--classifier resnet20]``: the score model (the classifier only serves the
    learning curve)."""
    from bench.classifiers import load_classifier
    from bench.data.datasets import load_dataset
    from bench.evaluation.runner import resolve_device
    from bench.training import train_epochs, training_subset

    settings = trainer_settings(DiffPureSettings, options)
    device = resolve_device(options.device)
    classifier = load_classifier(options.classifier, device)
    train = load_dataset(options.dataset, "train")
    indices = training_subset(len(train), options.train_size, options.seed)
    folder = Path(options.out) if options.out else diffpure_checkpoint_folder(options.dataset)
    torch.manual_seed(options.seed)
    trainer = ScoreTrainer(settings, classifier, device)
    config = {"defense": "diffpure", "settings": settings.to_dict(), "classifier": options.classifier,
              **data_config(options, indices), "score": trainer.model.config()}

    def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mirrored = torch.rand(len(x), generator=generator) < 0.5
        x = x.clone()
        x[mirrored] = x[mirrored].flip(-1)
        return x.contiguous()

    return train_epochs(options, trainer, folder, "score", config, settings.epochs, train, indices, flip)
