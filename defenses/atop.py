"""AToP: Adversarial Training on Purification (Lin et al.), random transform -> purifier -> frozen classifier.

``atop`` is the paper's best configuration (RT2 + GAN purifier, fine-tuned with the adversarial loss).
Named variants ``atop-<rt1|rt2|rt3>-<gan|ae>-<pre|ft>`` cover the transform x purifier x {pre-trained
only, fine-tuned} grid of the paper's Tables 7-9; ``atop-rt2-ae-ft-pipeline`` is the RT2 AE fine-tuned on FGSM
examples crafted against the whole pipeline instead of the bare classifier. The pipeline is stochastic (fresh masks and noise on
every call) and exactly differentiable, so the suites attack it end to end with EOT.

Weights come from ``bench train --defense atop`` (see ``defenses/atop_training.py``). They are looked up in
this order: ``checkpoint=PATH`` (a defense option); what you trained, under
``$BENCH_CHECKPOINT_DIR/atop/<classifier>/<transform>-<purifier>/<stage>.pt``; the small checkpoints
shipped in ``defenses/checkpoints/`` (trained here with ``bench train``, each beside its manifest). The
record stores the path, where it came from and its sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from torch import nn

from bench.classifiers.base import load_state_dict
from bench.core.errors import BenchError
from bench.core.paths import checkpoint_dir
from bench.core.record import sha256_file
from defenses.base import SHIPPED_DIR, Card, Defense, checkpoint_display, register_defense, resolve_checkpoint
from defenses.purifiers import PURIFIERS, purifier_from_state
from defenses.transforms import RT1, RT2, RT3, MaskedEnsemble, MaskedInpainting

TRANSFORMS = {"rt1": RT1, "rt2": RT2, "rt3": RT3}
STAGES = {"pre": "pretrain", "ft": "finetune"}
# The purifier fine-tuned with its FGSM examples crafted against the whole pipeline (`bench train --adv-target
# pipeline`) rather than the bare classifier (the default, as the authors' released code does); one ships, RT2 + AE.
PIPELINE_STAGE = "finetune-pipeline"
BUNDLED_DIR = SHIPPED_DIR


def atop_checkpoint(classifier: str, transform: str, purifier: str, stage: str, root: Optional[Path] = None) -> Path:
    root = checkpoint_dir() if root is None else root
    return root / "atop" / classifier.replace(":", "-") / f"{transform}-{purifier}" / f"{stage}.pt"


def build_purifier(transform: nn.Module, generator: nn.Module) -> nn.Module:
    """RT3 runs the generator on each masked copy and aggregates; RT1/RT2 use it directly."""
    return MaskedEnsemble(generator, transform.n_masks) if isinstance(transform, RT3) else MaskedInpainting(generator)


@register_defense("atop")
class AToP(Defense):
    """RT2 + GAN purifier, fine-tuned (the paper's recommended setting) unless told otherwise."""

    version = "1"
    card = Card(
        title="Adversarial Training on Purification (AToP): Advancing Both Robustness and Generalization",
        authors="Guang Lin, Chao Li, Jianhai Zhang, Toshihisa Tanaka, Qibin Zhao", venue="ICLR", year=2024,
        paper="https://arxiv.org/abs/2401.16352", code="https://github.com/glin2022/atop",
        weights=("GAN purifiers (a gated U-Net, 3.4M parameters at width 64 for RT1, RT2 and RT3, "
                 "stored in fp16; and a PatchGAN) and AE purifiers (a masked "
                 "autoencoder, 0.48M parameters) trained here with bench train on the cifar10-jpeg training images in "
                 "front of the shared ResNet-20; manifests beside the weights; this project's own work, no upstream "
                 "weights"),
        differences=("a CPU-scale purifier trained for minutes to hours (the paper: a DeepFill v2 generator, hours on "
                     "GPUs); the frozen classifier is a standard ResNet-20 on JPEG-compressed CIFAR-10 (the paper: "
                     "ResNet-18 / WRN-28-10 on CIFAR-10); the AE purifiers: RT1, RT2 and RT3 pre-trained and fine-tuned (RT1 and RT3 fine-tuned at learning rate 1e-4, RT2 at 5e-4); "
                     "the GAN purifiers fine-tuned at 1e-4 (RT3's file after 2 of its 4 planned epochs)"),
    )
    paper_reference = ("AToP (RT2 + GAN purifier), paper Table 2: 90.62% clean, 72.85% robust (AutoAttack linf 8/255, "
                       "WRN-28-10, CIFAR-10); the checkpoints shipped here are small and trained on a CPU")
    paper_references = {
        "l2": ("AToP (RT2 + GAN purifier), paper Table 6: 89.1% clean, 73.4% robust (AutoAttack l2 1.0, ResNet-50, "
               "CIFAR-10); the checkpoints shipped here are small and trained on a CPU"),
        "stadv": ("AToP (RT2 + GAN purifier), paper Table 6: 89.1% clean, 56.4% robust (StAdv 0.05, ResNet-50, "
                  "CIFAR-10); the checkpoints shipped here are small and trained on a CPU"),
    }
    stochastic = True
    default_transform, default_purifier, default_stage = "rt2", "gan", "finetune"

    def __init__(
        self, classifier: nn.Module, transform: Optional[str] = None, purifier: Optional[str] = None,
        stage: Optional[str] = None, checkpoint: Optional[str] = None, untrained: bool = False,
    ) -> None:
        self.transform_name = transform or self.default_transform
        self.purifier_name = purifier or self.default_purifier
        self.stage = stage or self.default_stage
        if self.transform_name not in TRANSFORMS or self.purifier_name not in PURIFIERS or self.stage not in (*STAGES.values(), PIPELINE_STAGE):
            raise BenchError(f"atop: unknown transform/purifier/stage {self.transform_name}/{self.purifier_name}/{self.stage}")
        generator = PURIFIERS[self.purifier_name]()
        self.checkpoint_path: Optional[Path] = None
        self.checkpoint_source, self.checkpoint_sha256 = "untrained", None
        if not untrained:
            self.checkpoint_path, self.checkpoint_source = self._checkpoint(classifier, checkpoint)
            state = load_state_dict(self.checkpoint_path, key="generator")
            generator = purifier_from_state(self.purifier_name, state)  # any trained width
            generator.load_state_dict(state, strict=True)
            self.checkpoint_sha256 = sha256_file(self.checkpoint_path)
        transform_module = TRANSFORMS[self.transform_name]()
        super().__init__(classifier, transform_module, build_purifier(transform_module, generator.eval()))
        self.purifier.requires_grad_(False)

    def _checkpoint(self, classifier: nn.Module, explicit: Optional[str]) -> Tuple[Path, str]:
        """(path, source): the explicit file, else one trained by the user, else the shipped one."""
        name = getattr(getattr(classifier, "info", None), "name", "classifier")
        key = (name, self.transform_name, self.purifier_name, self.stage)
        return resolve_checkpoint(explicit, ((atop_checkpoint(*key), "trained"), (atop_checkpoint(*key, root=BUNDLED_DIR), "shipped")),
            f"no trained AToP purifier for {name} at {atop_checkpoint(*key)} (nor shipped with the package); train it with "
            f"`bench train --defense atop --classifier {name} --transform {self.transform_name} --purifier {self.purifier_name}` "
            f"(or pass --defense-option checkpoint=PATH)")

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "AToP":
        return cls(classifier, untrained=True)

    def config(self) -> Dict[str, Any]:
        return {
            "transform": self.transform_name, "purifier": self.purifier_name, "stage": self.stage,
            "transform_config": self.transform.config(),
            "checkpoint": checkpoint_display(self.checkpoint_path, self.checkpoint_source),
            "checkpoint_source": self.checkpoint_source, "checkpoint_sha256": self.checkpoint_sha256,
        }


# The paper's row for each variant, printed by `bench run` after the result ("where this stands"): Table 7 (GAN,
# ResNet-18, linf 8/255, BPDA through the purifier with EOT-20) gives every transform without (pre-trained) and with
# (fine-tuned) AToP; Table 5 (WRN-28-10, AutoAttack linf 8/255) gives the AE only with RT2.
_TABLE7 = {("rt1", "pretrain"): (93.36, 0.0), ("rt1", "finetune"): (93.36, 36.72), ("rt2", "pretrain"): (84.18, 70.9),
           ("rt2", "finetune"): (90.04, 84.57), ("rt3", "pretrain"): (75.98, 70.7), ("rt3", "finetune"): (80.02, 72.07)}
_TABLE5_AE = {"pretrain": 44.73, "finetune": 59.18}
# Table 8 (GAN, ResNet-18, PGD + EOT l2 1.0): clean, PGD-10, PGD-20 for each transform without and with AToP.
_TABLE8 = {("rt1", "pretrain"): (93.36, 20.31, 15.04), ("rt1", "finetune"): (93.36, 27.34, 22.46),
           ("rt2", "pretrain"): (84.18, 67.19, 63.09), ("rt2", "finetune"): (90.04, 69.92, 68.75),
           ("rt3", "pretrain"): (75.98, 28.52, 26.17), ("rt3", "finetune"): (80.02, 46.48, 41.60)}


def _variant_l2_references(transform: str, purifier: str, stage: str) -> Dict[str, str]:
    """Table 8 (GAN, ResNet-18, PGD + EOT l2 1.0) for a variant's runs at l2; the AE has no l2 row."""
    if purifier != "gan" or (transform, stage) not in _TABLE8:
        return {}
    mark = "with AToP" if stage.startswith("finetune") else "without AToP"
    clean, pgd10, pgd20 = _TABLE8[transform, stage]
    return {"l2": (f"AToP paper Table 8, {transform.upper()} {mark} (GAN purifier): {clean:.2f}% clean, {pgd10:.2f}% / "
                   f"{pgd20:.2f}% under PGD-10 / PGD-20 + EOT l2 1.0 (ResNet-18); the checkpoints shipped here are small "
                   f"and trained on a CPU")}


def _variant_reference(transform: str, purifier: str, stage: str) -> str:
    mark = "with AToP" if stage.startswith("finetune") else "without AToP"
    if purifier == "gan" and (transform, stage) in _TABLE7:
        clean, pgd20 = _TABLE7[transform, stage]
        return (f"AToP paper Table 7, {transform.upper()} {mark} (GAN purifier): {clean:.2f}% clean, {pgd20:.2f}% under "
                f"PGD-20 linf 8/255 (ResNet-18, BPDA through the purifier, EOT-20); the checkpoints shipped here are small "
                f"and trained on a CPU")
    if purifier == "ae" and transform == "rt2":
        return (f"AToP paper Table 5, AE purifier {mark} (Wu et al. 2023): {_TABLE5_AE[stage.split('-')[0]]:.2f}% "
                f"robust (AutoAttack linf 8/255, WRN-28-10, CIFAR-10); the checkpoints shipped here are small and "
                f"trained on a CPU")
    return f"no paper row: the AToP paper reports the AE purifier with RT2 only (Table 5), not {transform.upper()}"


def _variant(transform: str, purifier: str, short: str, stage: str, what: str) -> type:
    name = f"atop-{transform}-{purifier}-{short}"
    attrs = {"default_transform": transform, "default_purifier": purifier, "default_stage": stage,
             "paper_reference": _variant_reference(transform, purifier, stage),
             "paper_references": _variant_l2_references(transform, purifier, stage),
             "__doc__": f"AToP with {transform.upper()} and the {purifier.upper()} purifier, {what}."}
    return register_defense(name)(type(name.replace("-", "_"), (AToP,), attrs))


for _t in TRANSFORMS:
    for _p in PURIFIERS:
        for _s, _stage in STAGES.items():
            _variant(_t, _p, _s, _stage, f"{_stage} weights")
_variant("rt2", "ae", "ft-pipeline", PIPELINE_STAGE, "fine-tuned on FGSM examples crafted against the whole pipeline")
