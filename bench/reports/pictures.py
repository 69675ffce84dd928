"""Pictures of what a defense does: ``bench show`` (an image grid) and ``bench curve`` (robust accuracy vs eps).

``show`` draws, for the first images of the fixed subset, the columns of the AToP paper's Figures 3 and 5-9: the
clean image, its adversarial example (crafted against the whole defense, with EOT for randomness and BPDA for
non-differentiable stages, as in the suites), the adversarial example after the defense's transform (the first
three channels: the masked, noised image), and the purifier's output from the clean and from the adversarial
image, each with the predicted label (green when right). A stochastic defense is drawn for one random draw.

``curve`` plots robust accuracy (worst case, with its 95% interval) against eps for a defense and its bare
classifier; the points are ordinary records that ``bench.api.curve_points`` makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from attacks.adaptive import BPDA, EOT
from attacks.base import ATTACKS, Threat
from bench.data.datasets import load_dataset
from bench.data.subset import Subset
from defenses.base import Defense


COLUMNS = ("clean", "adversarial", "transformed (adv.)", "purified (clean)", "purified (adv.)")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image(t: torch.Tensor):
    """A CHW tensor as an HWC array in [0, 1]; more than 3 channels (image + mask) shows the image part."""
    return t[:3].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def show_panels(defense: Defense, x: torch.Tensor, y: torch.Tensor, threat: Threat, attack: str = "pgd",
                attack_params: Optional[Dict[str, Any]] = None, eot: int = 10, seed: int = 0) -> Dict[str, Any]:
    """The five columns and the predictions behind them (tensors), for ``x`` and its labels ``y``."""
    params = {"steps": 20} if attack_params is None and attack == "pgd" else dict(attack_params or {})
    adversary = ATTACKS.get(attack)(threat, **params)
    wrappers = []
    if defense.stochastic and adversary.uses_oracle:
        adversary = EOT(adversary, eot)
        wrappers.append(f"EOT-{eot}")
    if not defense.differentiable and adversary.uses_oracle:
        adversary = BPDA(adversary)
        wrappers.append("BPDA")
    torch.manual_seed(seed)
    x_adv = adversary.perturb(defense, x, y)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        transformed_adv = defense.transform(x_adv)
        purified_clean = defense.purifier(defense.transform(x))
        purified_adv = defense.purifier(transformed_adv)
        preds = {"clean": defense.classifier(x), "adversarial": defense.classifier(x_adv),
                 "purified (clean)": defense.classifier(purified_clean), "purified (adv.)": defense.classifier(purified_adv)}
    return {"images": {"clean": x, "adversarial": x_adv, "transformed (adv.)": transformed_adv,
                       "purified (clean)": purified_clean, "purified (adv.)": purified_adv},
            "preds": {k: v.argmax(1) for k, v in preds.items()},
            "attack": f"{attack}({', '.join(f'{k}={v}' for k, v in params.items())})" + "".join(f" + {w}" for w in wrappers)}


def show(defense: Defense, subset: Subset, out: Path, threat: Threat, images: int = 6, attack: str = "pgd",
         attack_params: Optional[Dict[str, Any]] = None, eot: int = 10, seed: int = 0, device="cpu") -> Path:
    """Write the grid for the first ``images`` images of ``subset`` to ``out`` (PNG) and return the path."""
    plt = _plt()
    x, y = subset.x[:images].to(device), subset.y[:images].to(device)
    panels = show_panels(defense, x, y, threat, attack, attack_params, eot, seed)
    classes = load_dataset(subset.dataset, subset.split).classes
    fig, axes = plt.subplots(len(x), len(COLUMNS), figsize=(1.9 * len(COLUMNS), 2.0 * len(x) + 0.9), squeeze=False)
    for i in range(len(x)):
        for j, column in enumerate(COLUMNS):
            ax = axes[i][j]
            ax.imshow(_image(panels["images"][column][i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column, fontsize=9)
            if column in panels["preds"]:
                pred = int(panels["preds"][column][i])
                ax.set_xlabel(classes[pred], fontsize=8, color="#1a7f37" if pred == int(y[i]) else "#cf222e")
            elif column == "transformed (adv.)":
                ax.set_xlabel(f"true: {classes[int(y[i])]}", fontsize=8)
    scale, unit = (255, "/255") if threat.norm == "linf" else (1, "")
    fig.suptitle(f"{defense.name} on {defense.classifier.info.name} | {subset.dataset}, first {len(x)} of the n={subset.n} "
                 f"subset {subset.subset_hash[:12]}\n{threat.norm} eps={threat.eps * scale:.3g}{unit}, attack "
                 f"{panels['attack']} against the whole defense; labels: classifier's prediction (green = right)"
                 + (", one random draw" if defense.stochastic else ""), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_curve(points: List[Dict[str, Any]], out: Path, title: str, norm: str) -> Path:
    plt = _plt()
    scale, unit = (255, " (x/255)") if norm == "linf" else (1, "")
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(p["model"] for p in points):
        mine = sorted((p for p in points if p["model"] == model), key=lambda p: p["eps"])
        xs = [p["eps"] * scale for p in mine]
        ys = [100 * p["robust"]["accuracy"] for p in mine]
        lo = [100 * p["robust"]["ci95"][0] for p in mine]
        hi = [100 * p["robust"]["ci95"][1] for p in mine]
        (line,) = ax.plot(xs, ys, marker="o", label=model)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        one_draw = [p for p in mine if p.get("clean_one_draw") and p["clean_one_draw"]["accuracy"] != p["robust"]["accuracy"]]
        for p in one_draw:  # a stochastic defense: clean accuracy on one draw, above its no-attack floor
            ax.plot([0], [100 * p["clean_one_draw"]["accuracy"]], marker="o", markerfacecolor="none",
                    color=line.get_color(), linestyle="none", label=f"{model}: clean, one draw")
        for p, x_, y_ in zip(mine, xs, ys):
            if p["unreliable"]:
                ax.annotate("unreliable", (x_, y_), fontsize=7, color="#cf222e")
    ax.set_xlabel(f"{norm} eps{unit}")
    ax.set_ylabel("robust accuracy, worst case (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps({"title": title, "points": points}, indent=1) + "\n")
    return out


def curve_title(defense: str, classifier: str, subset: Subset, points: List[Dict[str, Any]]) -> str:
    suite = next((p["suite"] for p in points if p["suite"]), {})
    return (f"{defense} vs its bare classifier {classifier} | {subset.dataset} n={subset.n} subset {subset.subset_hash[:12]}\n"
            f"suite {suite.get('name')} v{suite.get('version')} ({suite.get('budget')} budget); shaded: 95% interval\n"
            f"eps 0: no attack, every re-classification draw right (hollow: clean, one draw)")

