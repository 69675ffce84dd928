"""``bench perf``: what an evaluation spends beyond the forward and backward passes its attacks need.

One process, one run, on a chosen defense (or bare classifier) and n images of the fixed subset:

- **raw**: the median time of one batched forward pass and of one forward+backward pass of the pipeline (CE loss,
  input gradient), giving the time of one image-forward and of one image-backward;
- **attacks**: each attack's measured time and counted passes (images per pass counted, since attacks shrink
  their batch as points break), and its **efficiency** = (forward images x raw forward time per image + backward
  images x raw backward time per image) / measured time: 1.0 means nothing is spent beyond the passes;
- **reference**: our PGD against a textbook PGD loop (``attacks.gradient.plain_pgd``: the loop everyone writes) and our
  APGD-CE against pyautoattack's ``APGDAttack``, same model, images, steps and seed: time ratio and robust
  accuracy of each;
- **eot**: an EOT-20 gradient as a Python loop of 20 passes, fully batched (20 draws along the batch) and through
  ``EOTOracle`` (our chunking), at several batch sizes, on the classifier behind Gaussian noise;
- **early stop**: a suite run with early stop (each attack only on the points still robust, each attack dropping a
  point once it is misclassified) and without (every step of every attack on every clean-correct point), time
  and result.

- **execution**: the raw pass times under each execution option (channels-last, bf16 autocast, ``torch.compile``),
  and how far their logits are from the plain model's.

Prints a table per part and writes everything as JSON (``--out``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attacks.adaptive import EOTOracle, default_chunk_images
from attacks.base import ATTACKS, CountingModule, PassCounter, Threat
from attacks.gradient import plain_pgd
from attacks.losses import ce


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # the first passes of a process (and of a new shape) are slower: allocator, kernels
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_pass_times(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 7) -> Dict[str, float]:
    """Seconds per image of one forward and of one backward, from batched passes of the whole pipeline."""

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), y), xg)

    t_fwd, t_fb = _median_seconds(forward, repeats), _median_seconds(forward_backward, repeats)
    n = x.shape[0]
    return {"batch": n, "forward_s": t_fwd, "forward_backward_s": t_fb,
            "forward_per_image": t_fwd / n, "backward_per_image": max(t_fb - t_fwd, 0.0) / n}


def passes_at_their_sizes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forwards: Sequence[int],
                          backwards: Sequence[int], repeats: int = 3) -> float:
    """Seconds that raw passes of exactly these batch sizes take (each size timed on its own): what an attack whose
    batch shrinks as points break cannot avoid spending, since small batches cost more per image."""
    raw = {b: raw_pass_times(model, x[:b], y[:b], repeats) for b in sorted(set(forwards) | set(backwards))}
    return (sum(raw[b]["forward_s"] for b in forwards)
            + sum(max(raw[b]["forward_backward_s"] - raw[b]["forward_s"], 0.0) for b in backwards))


def measure_attack(model: nn.Module, make_attack: Callable[[], object], x: torch.Tensor, y: torch.Tensor,
                   repeats: int = 3, seed: int = 0) -> Dict[str, Any]:
    """Time (median of ``repeats`` runs from the same seed), passes, robust accuracy and efficiency of one attack
    on one batch: against raw passes of the full batch per image (``efficiency``), and against raw passes of the
    sizes the attack actually ran (``efficiency_at_pass_sizes``). The raw passes are timed right after the attack:
    the same pass measured at the start of a process was up to 40% slower here, which would inflate efficiency."""
    runs = []
    for _ in range(repeats):
        counting = CountingModule(model, PassCounter(), record_sizes=True)
        attack = make_attack()
        torch.manual_seed(seed)
        start = time.perf_counter()
        x_adv = attack.perturb(counting, x, y)
        runs.append((time.perf_counter() - start, counting.counter.snapshot(), x_adv, counting))
    seconds = statistics.median(r[0] for r in runs)
    _, passes, x_adv, counted = runs[0]
    raw = raw_pass_times(model, x, y)
    modelled = passes["forward_images"] * raw["forward_per_image"] + passes["backward_images"] * raw["backward_per_image"]
    at_sizes = passes_at_their_sizes(model, x, y, counted.forward_sizes, counted.backward_sizes)
    return {"seconds": seconds, **passes, "robust_accuracy": _robust(model, x_adv, y, seed),
            "efficiency": modelled / seconds if seconds else None,
            "efficiency_at_pass_sizes": at_sizes / seconds if seconds else None, "raw": raw}


#: Draws of a stochastic model per robust-accuracy reading: the mean over them (the expected accuracy of one
#: forward pass), from the same random state for ours and the reference, so that equal examples read equal.
ROBUST_DRAWS = 10


def _robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    draws = ROBUST_DRAWS if getattr(model, "stochastic", False) else 1
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        return statistics.fmean((model(x_adv).argmax(1) == y).float().mean().item() for _ in range(draws))


def _timed_from_seed(fn: Callable[[], torch.Tensor], seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def reference_comparison(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                         seed: int = 0, repeats: int = 3) -> List[Dict[str, Any]]:
    """Ours against the reference implementations on the same model, images, steps and seed: the median time of
    ``repeats`` runs each, ours and the reference alternating so that both see the same machine."""
    from pyautoattack.autopgd_base import APGDAttack

    threat = Threat("linf", eps)
    ours_pgd = ATTACKS.get("pgd")(threat, steps=steps)
    ours_apgd = ATTACKS.get("apgd-ce")(threat, steps=steps, restarts=1)
    pairs = [
        (f"pgd-{steps}", "textbook PGD loop", lambda: ours_pgd.perturb(model, x, y),
         lambda: plain_pgd(model, x, y, eps, ours_pgd.step_size, steps, start=threat.random_start)),
        (f"apgd-ce-{steps}", "pyautoattack APGDAttack", lambda: ours_apgd.perturb(model, x, y),
         lambda: APGDAttack(model, n_iter=steps, norm="Linf", n_restarts=1, eps=eps, seed=seed, loss="ce",
                            device=x.device).perturb(x.contiguous(), y)),
    ]
    rows = []
    for attack, reference, ours, ref in pairs:
        runs = [(_timed_from_seed(ours, seed), _timed_from_seed(ref, seed)) for _ in range(repeats)]
        t_ours = statistics.median(o[0] for o, _ in runs)
        t_ref = statistics.median(r[0] for _, r in runs)
        (_, adv), (_, ref_adv) = runs[0]
        rows.append({"attack": attack, "reference": reference, "ours_s": t_ours, "reference_s": t_ref,
                     "time_ratio": t_ours / t_ref, "repeats": repeats, "ours_robust": _robust(model, adv, y, seed),
                     "reference_robust": _robust(model, ref_adv, y, seed)})
    return rows


class GaussianNoise(nn.Module):
    """The classifier behind N(0, sigma^2) input noise: a stochastic model for the EOT measurement."""

    stochastic = True

    def __init__(self, model: nn.Module, sigma: float = 0.05) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def eot_comparison(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 20,
                   batch_sizes: Sequence[int] = (1, 8, 32, 128), repeats: int = 3) -> List[Dict[str, Any]]:
    """Milliseconds of one EOT gradient: a loop of ``draws`` passes, all draws in one pass, and ``EOTOracle``."""
    noisy = GaussianNoise(model)
    rows = []
    for b in batch_sizes:
        xb, yb = x[:b], y[:b]
        loop = EOTOracle(noisy, draws, chunk_images=b)  # one draw per pass
        full = EOTOracle(noisy, draws, chunk_images=draws * b)  # every draw in one pass
        ours = EOTOracle(noisy, draws, chunk_images=default_chunk_images(x.device))
        times = {name: 1000 * _median_seconds(lambda o=oracle: o.loss_grad(xb, yb, ce), repeats)
                 for name, oracle in (("loop_ms", loop), ("full_batch_ms", full), ("ours_ms", ours))}
        best = min(times["loop_ms"], times["full_batch_ms"])
        rows.append({"batch": len(xb), **times, "ours_vs_best": times["ours_ms"] / best,
                     "speedup_vs_loop": times["loop_ms"] / times["ours_ms"]})
    return rows


#: The execution options ``bench perf`` times (bench/evaluation/execution.py), by the name its table prints.
EXECUTION_OPTIONS = {"channels_last": {"channels_last": True}, "autocast bf16": {"autocast": "bf16"},
                     "compile": {"compile": True}}


def execution_comparison(model: nn.Module, x: torch.Tensor, y: torch.Tensor, options: Sequence[str] = tuple(EXECUTION_OPTIONS),
                         repeats: int = 5) -> List[Dict[str, Any]]:
    """Raw pass times of the pipeline plain and under each execution option (each on its own copy of the model,
    so that no option changes the next one's weights), and how far its logits are from the plain ones."""
    import copy

    from bench.evaluation.execution import Executed, Execution

    stochastic = bool(getattr(model, "stochastic", False))

    def agreement(m: nn.Module, reference: Optional[torch.Tensor]):
        """Largest logit difference from the plain model (deterministic models), or the mean clean accuracy over
        10 draws (stochastic ones: their draws differ between options, e.g. noise laid out channels-last)."""
        if stochastic:
            return _robust(m, x, y, seed=-1)  # seeded with 0
        torch.manual_seed(0)
        with torch.no_grad():
            logits = m(x)
        return logits if reference is None else (logits - reference).abs().max().item()

    plain = agreement(model, None)
    rows = [{"option": "plain", **raw_pass_times(model, x, y, repeats),
             **({"clean_accuracy_mean": plain} if stochastic else {"max_logit_diff": 0.0})}]
    for name in options:
        wrapped = Executed(copy.deepcopy(model), Execution(**EXECUTION_OPTIONS[name]))
        times = raw_pass_times(wrapped, x, y, repeats)  # its warm-up call also compiles
        value = agreement(wrapped, None if stochastic else plain)
        rows.append({"option": name, **times, **({"clean_accuracy_mean": value} if stochastic else {"max_logit_diff": value})})
    base = rows[0]["forward_backward_s"]
    for row in rows:
        row["vs_plain"] = row["forward_backward_s"] / base
    return rows


def early_stop_comparison(model: nn.Module, subset, suite_name: str, budget: str, device, seed: int = 0) -> Dict[str, Any]:
    """One suite with early stop (across attacks and within each) and without (every step of every attack on every
    clean-correct point): seconds and robust accuracy of each."""
    from attacks.suite import load_suite
    from bench.evaluation.engine import evaluate

    suite = load_suite(suite_name, "linf", budget)
    out: Dict[str, Any] = {"suite": f"{suite.name} v{suite.version} ({budget})", "n": subset.n}
    for name, independent in (("early_stop", False), ("no_early_stop", True)):
        plans = suite.build(suite.threat, stochastic=False, differentiable=True)
        for _, attack in plans:
            attack.early_stop = not independent  # without: every step of every attack on every point
        start = time.perf_counter()
        result = evaluate(model, subset, plans, suite.threat, who="perf", device=device, seed=seed, independent=independent)
        out[name] = {"seconds": time.perf_counter() - start, "robust_accuracy": float(result.robust.mean())}
    out["cost_ratio"] = out["early_stop"]["seconds"] / out["no_early_stop"]["seconds"]
    return out


def run_perf(model: nn.Module, subset, device, eps: float = 8 / 255, steps: int = 20, attacks: Sequence[str] = ("pgd", "apgd-ce"),
             batch_sizes: Sequence[int] = (1, 8, 32, 128), suite: Optional[str] = "linf", budget: str = "cpu",
             eot_model: Optional[nn.Module] = None, seed: int = 0,
             execution_options: Sequence[str] = tuple(EXECUTION_OPTIONS)) -> Dict[str, Any]:
    """Every part of ``bench perf`` on ``model`` and the images of ``subset`` (the batch is the whole subset)."""
    x, y = subset.x.to(device).contiguous(), subset.y.to(device)
    torch.manual_seed(seed)
    raw = raw_pass_times(model, x, y)
    threat = Threat("linf", eps)
    measured = []
    for name in attacks:
        measured.append({"attack": f"{name}-{steps}",
                         **measure_attack(model, lambda n=name: ATTACKS.get(n)(threat, steps=steps), x, y, seed=seed)})
    report: Dict[str, Any] = {"raw": raw, "attacks": measured, "reference": reference_comparison(model, x, y, eps, steps, seed)}
    report["eot"] = eot_comparison(eot_model if eot_model is not None else model, x, y, batch_sizes=[b for b in batch_sizes if b <= len(x)])
    if suite:
        report["early_stop"] = early_stop_comparison(model, subset, suite, budget, device, seed)
    if execution_options:
        report["execution"] = execution_comparison(model, x, y, execution_options)
    return report


def format_report(report: Dict[str, Any]) -> str:
    from tabulate import tabulate

    raw = report["raw"]
    lines = [f"raw passes (batch {raw['batch']}): forward {raw['forward_s']:.3f} s, forward+backward "
             f"{raw['forward_backward_s']:.3f} s; per image: forward {1000 * raw['forward_per_image']:.2f} ms, "
             f"backward {1000 * raw['backward_per_image']:.2f} ms", ""]
    lines.append(tabulate([[a["attack"], f"{a['seconds']:.2f}", a["forward"], a["backward"], a["forward_images"],
                            a["backward_images"], f"{100 * a['robust_accuracy']:.2f}", f"{a['raw']['forward_backward_s']:.3f}",
                            f"{a['efficiency']:.2f}", f"{a['efficiency_at_pass_sizes']:.2f}"] for a in report["attacks"]],
                          ["attack", "s", "fwd", "bwd", "fwd images", "bwd images", "robust %", "raw fwd+bwd s (after)",
                           "efficiency", "efficiency at pass sizes"]))
    lines.append("")
    lines.append(tabulate([[r["attack"], r["reference"], f"{r['ours_s']:.2f}", f"{r['reference_s']:.2f}", f"{r['time_ratio']:.2f}",
                            f"{100 * r['ours_robust']:.2f}", f"{100 * r['reference_robust']:.2f}"] for r in report["reference"]],
                          ["attack", "reference", "ours s", "reference s", "time ratio", "ours robust %", "reference robust %"]))
    lines.append("")
    lines.append(tabulate([[r["batch"], f"{r['loop_ms']:.0f}", f"{r['full_batch_ms']:.0f}", f"{r['ours_ms']:.0f}",
                            f"{r['ours_vs_best']:.2f}", f"{r['speedup_vs_loop']:.1f}"] for r in report["eot"]],
                          ["EOT-20 batch", "loop ms", "full batch ms", "ours ms", "ours / best", "speed-up vs loop"]))
    if "early_stop" in report:
        e = report["early_stop"]
        lines += ["", f"early stop, suite {e['suite']}, n = {e['n']}: {e['early_stop']['seconds']:.1f} s "
                      f"(robust {100 * e['early_stop']['robust_accuracy']:.2f}%) vs {e['no_early_stop']['seconds']:.1f} s "
                      f"without (robust {100 * e['no_early_stop']['robust_accuracy']:.2f}%): cost ratio {e['cost_ratio']:.3f}"]
    if "execution" in report:
        stochastic = "clean_accuracy_mean" in report["execution"][0]
        lines += ["", tabulate([[r["option"], f"{r['forward_s']:.3f}", f"{r['forward_backward_s']:.3f}", f"{r['vs_plain']:.2f}",
                                 f"{100 * r['clean_accuracy_mean']:.2f}" if stochastic else f"{r['max_logit_diff']:.2g}"]
                                for r in report["execution"]],
                               ["execution", "forward s", "forward+backward s", "vs plain",
                                "clean % (mean of 10 draws)" if stochastic else "max |logit diff| vs plain"])]
    return "\n".join(lines)
