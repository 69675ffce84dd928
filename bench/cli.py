"""Command line: ``bench run`` and ``bench list``. A thin layer over ``bench.runner`` and the registries.

User errors (``BenchError``) print one line and exit with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tabulate import tabulate

from attacks.base import NORMS, canonical_norm, format_eps
from bench.core.errors import BenchError

from bench.reports.listing import LIST_KINDS, _registries, cmd_list, cmd_show_card  # noqa: F401 (the CLI's own commands)


def parse_eps(text: str) -> float:
    """Accept ``8/255``, ``0.0314`` or ``0.5`` (the threat checks the range and names it)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}") from None


def parse_norm(text: str) -> str:
    """A threat norm in the harness's or RobustBench's spelling (``Linf``, ``L2``)."""
    try:
        return canonical_norm(text)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def joined_negative_values(argv: Sequence[str]) -> list:
    """``--eps -3/255`` as ``--eps=-3/255``: argparse would read a value starting with '-' as an option and report a
    missing argument instead of the range error ``--eps=-3/255`` gets."""
    out, items = [], list(argv)
    for i, item in enumerate(items):
        if out and out[-1] == "--eps" and item.startswith("-") and item[1:2].isdigit():
            out[-1] = f"--eps={item}"
        else:
            out.append(item)
    return out


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be an integer or auto, got {text!r}") from None


def _model_arguments(parser: argparse.ArgumentParser, defense_default: Optional[str] = None) -> None:
    """The flags that name what is evaluated, the same in every command: defense, classifier, dataset, device and
    defense options."""
    if defense_default is None:
        parser.add_argument("--defense", required=True, help="defense name (bench list defenses), or a+b to stack two")
    else:
        parser.add_argument("--defense", default=defense_default,
                            help=f"defense name (bench list defenses; default {defense_default})")
    parser.add_argument("--classifier", default="resnet20", help="classifier behind the defense (default resnet20)")
    parser.add_argument("--dataset", default="cifar10-jpeg", help="dataset of the fixed subset (default cifar10-jpeg)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, default), cpu or cuda")
    parser.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the defense, e.g. checkpoint=path/to/weights.pt (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Adaptive-attack benchmark for adversarial purification defenses.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="also print debugging details")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and results (no progress)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help="import FILE to register third-party defenses/attacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="evaluate a defense on the fixed subset against a suite and write a record",
                         description="Evaluate a defense (transform -> purifier -> classifier) on the fixed, hashed subset "
                                     "against an adaptive attack suite; print the result and write a JSON record.")
    _model_arguments(run)
    run.add_argument("--threat", type=parse_norm, choices=NORMS, default=None,
                     help="linf (8/255), l2 (0.5; 1.0 with --eps 1.0) or stadv (flow field bounded by 0.05); RobustBench's "
                          "Linf and L2 work too (default: the suite's threat, else linf)")
    run.add_argument("--suite", default=None, help="suite name (default: the threat's own suite, linf, l2 or stadv)")
    run.add_argument("--budget", choices=("auto", "smoke", "cpu", "full", "paper"), default="auto",
                     help="attack budget of the suite: smoke (seconds, tests), cpu (reduced, fits a CPU session), "
                          "full (the protocol's strength, a GPU job; paper is its older name); auto = full on CUDA, cpu on "
                          "a CPU (default)")
    run.add_argument("--eps", type=parse_eps, default=None, help="override the suite's eps, e.g. 2/255")
    run.add_argument("--headline", choices=("worst", "mean", "majority"), default="worst",
                     help="robust accuracy to lead with for stochastic defenses: worst (broken if any of 10 draws is "
                          "wrong, default), mean (over the draws) or majority (vote over the draws)")
    run.add_argument("--no-checks", dest="checks", action="store_false",
                     help="skip the integrity checks after the attacks (the record then says checks.ran = false)")
    run.add_argument("--n", type=int, default=512, help="images in the fixed subset (default 512)")
    run.add_argument("--seed", type=int, default=0, help="seed of the subset and of the attacks (default 0)")
    run.add_argument("--batch-size", type=_batch_size, default=128,
                     help="images attacked together (default 128, the fastest on a CPU); auto = the largest that fits "
                          "in GPU memory. A batch that runs out of memory is split in halves either way")
    run.add_argument("--channels-last", action="store_true",
                     help="run the model in channels-last memory format (faster on recent GPUs; off by default)")
    run.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                     help="mixed precision for the model's passes (changes the numbers a little; stored in the record)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model before the attacks (GPU)")
    run.add_argument("--download", action="store_true", help="let datasets that can be downloaded fetch themselves")
    run.add_argument("--out", type=Path, default=Path("runs"), help="folder for the record (default runs)")
    run.add_argument("--skip-existing", action="store_true",
                     help="if this run's record (same run id) is already in --out, print it instead of running again "
                          "(for queues of long runs; by default a run is repeated and its record rewritten)")
    add_launcher_arguments(run, "this evaluation")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE", dest="run_plugins",
                     help="import FILE first, to register your own defenses or attacks (repeatable)")
    train = sub.add_parser("train", help="train a defense's learned parts (the classifier stays frozen)")
    train.add_argument("--defense", required=True, help="what to train: atop, nrp, jatp, jatp-obl, aid-purifier, pixeldefend, diffpure, or adversarial-training (a classifier; `bench list` shows every trainer)")
    train.add_argument("--classifier", default="resnet20", help="the frozen classifier it defends (default resnet20)")
    train.add_argument("--dataset", default="cifar10-jpeg", help="training images come from its train split")
    train.add_argument("--epochs", type=int, default=None,
                       help="training epochs (AToP: fine-tuning epochs); default: the defense's own recipe")
    train.add_argument("--pretrain-epochs", type=int, default=None,
                       help="AToP: epochs of pre-training the purifier before fine-tuning")
    train.add_argument("--train-size", type=int, default=20000,
                       help="training images used, a seeded subset of the train split (default 20000)")
    train.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    train.add_argument("--seed", type=int, default=0, help="seed of the image subset and the initialization")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--out", type=Path, default=None, help="checkpoint folder (default under $BENCH_CHECKPOINT_DIR)")
    train.add_argument("--hours", type=float, default=None,
                       help="time budget: stop after the epoch that uses it up (all runs of this folder together); "
                            "rerun with more to continue")
    train.add_argument("--checkpoint-minutes", type=float, default=20.0,
                       help="also save a checkpoint inside an epoch this often, so a killed run loses at most this much "
                            "(0: after every step; default 20); a restart continues from it with the same results")
    train.add_argument("--eval-every", type=int, default=1,
                       help="epochs between the learning curve's held-out clean and PGD-10 accuracy (0: never; default 1)")
    train.add_argument("--eval-size", type=int, default=None,
                       help="held-out training images for the learning curve (default: up to 512 not trained on)")
    train.add_argument("--eval-eps", type=parse_eps, default=None,
                       help="linf radius of the learning curve's PGD-10 (default: the training eps of adversarial training, "
                            "JATP and AID-Purifier, whose eps is the threat; 8/255 for the other trainers)")
    train.add_argument("--autocast", choices=("bf16",), default=None,
                       help="train under bfloat16 autocast (faster on CPUs with bf16 support; see docs/atop.md)")
    train.add_argument("--transform", choices=("rt1", "rt2", "rt3"), default=None, help="AToP: the random transform")
    train.add_argument("--purifier", choices=("gan", "ae"), default=None, help="AToP: the purifier network")
    train.add_argument("--adv-target", choices=("classifier", "pipeline"), default=None,
                       help="AToP: craft the fine-tuning examples against the bare classifier or the whole pipeline")
    train.add_argument("--rec-target", choices=("adv", "clean"), default=None,
                       help="AToP: what the reconstruction loss compares the purified image with")
    train.add_argument("--lam", type=float, default=None, help="AToP: weight of the adversarial cross-entropy loss (lambda)")
    train.add_argument("--width", type=int, default=None, help="AToP, DiffPure: channels of the network's first scale (default 32)")
    train.add_argument("--eps", type=parse_eps, default=None,
                       help="NRP/JATP/AID-Purifier/adversarial-training: radius of the training perturbations (NRP 16/255, "
                            "the others 8/255)")
    train.add_argument("--step-size", type=parse_eps, default=None, help="NRP/JATP/AID-Purifier/adversarial-training: PGD step of the training perturbations")
    train.add_argument("--attack-steps", type=int, default=None, help="NRP/JATP/AID-Purifier/adversarial-training: PGD steps per training batch")
    train.add_argument("--oblivious", action="store_true", default=None,
                       help="JATP: craft training examples against the bare classifier (the paper's -obl setting)")
    train.add_argument("--lr", type=float, default=None, help="initial learning rate (every trainer but AToP, whose two stages take --option pretrain_lr=, finetune_lr=)")
    train.add_argument("--alpha", type=float, default=None, help="JATP: weight of the feature-similarity term (5)")
    train.add_argument("--beta", type=float, default=None, help="JATP: weight of the pixel term (3)")
    train.add_argument("--pixel-loss", choices=("l2", "mse"), default=None,
                       help="JATP: the pixel term as a per-pixel mean square (mse, default: Eq. 6's 'L2 loss'), or the "
                            "L2 norm over the image as the equation prints it (l2; keeps the purifier at the identity)")
    train.add_argument("--grad-clip", type=float, default=None, help="JATP: clip the gradient norm (default 1; 0: no clip)")
    train.add_argument("--init", default=None, metavar="PATH",
                       help="JATP: start from this purifier's weights (e.g. a trained NRP) instead of the identity")
    train.add_argument("--feature-layer", default=None,
                       help="NRP/JATP: the classifier's internal layer, a dotted module name (default: its "
                            "second-to-last residual stage) or 'logits'")
    train.add_argument("--pretrained", default=None, metavar="PATH",
                       help="AToP: skip pre-training and fine-tune this pre-trained purifier (e.g. RT2's for RT3)")
    train.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="train_options",
                       help="any setting of the trainer by its name in the manifest's settings, read as that setting's "
                            "type (e.g. channels=64 and layers=8 for PixelDefend's PixelCNN, blocks=2 for DiffPure's "
                            "score model, eps_ramp=0.2 for adversarial training); repeatable")
    aud = sub.add_parser("audit", help="run only the integrity checks on a defense and print a verdict")
    _model_arguments(aud)
    aud.add_argument("--threat", type=parse_norm, choices=NORMS, default="linf", help="threat (default linf)")
    aud.add_argument("--eps", type=parse_eps, default=None, help="override the threat's eps, e.g. 2/255")
    aud.add_argument("--n", type=int, default=64, help="images of the fixed subset to audit on (default 64)")
    aud.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    perf = sub.add_parser("perf", help="measure what attacks cost beyond their passes: efficiency, reference "
                                       "implementations, EOT batching, early stop, execution options")
    _model_arguments(perf, defense_default="none")
    perf.add_argument("--n", type=int, default=128, help="images of the fixed subset, attacked as one batch (default 128)")
    perf.add_argument("--eps", type=parse_eps, default=8 / 255, help="linf radius of the attacks (default 8/255)")
    perf.add_argument("--steps", type=int, default=20, help="steps of PGD and APGD-CE (default 20)")
    perf.add_argument("--suite", default="linf", help="suite for the early-stop comparison ('' skips it)")
    perf.add_argument("--budget", default="cpu", help="budget of that suite (default cpu)")
    perf.add_argument("--seed", type=int, default=0, help="subset and attack seed (default 0)")
    perf.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    show = sub.add_parser("show", help="draw clean, adversarial, transformed and purified images with predictions (PNG)")
    _model_arguments(show)
    show.add_argument("--threat", choices=("linf", "l2"), default="linf",
                      help="threat of the adversarial column (default linf)")
    show.add_argument("--eps", type=parse_eps, default=None, help="radius (default 8/255 for linf, 0.5 for l2)")
    show.add_argument("--images", type=int, default=6, help="how many images: the first of the fixed subset (default 6)")
    show.add_argument("--n", type=int, default=512, help="size of the fixed subset they come from (default 512)")
    show.add_argument("--attack", default="pgd", help="attack crafting the adversarial column (default pgd, 20 steps)")
    show.add_argument("--attack-option", action="append", default=[], metavar="KEY=VALUE",
                      help="an option of the attack, e.g. steps=50 (repeatable)")
    show.add_argument("--eot", type=int, default=10, help="EOT draws when the defense is stochastic (default 10)")
    show.add_argument("--seed", type=int, default=0, help="subset seed and attack seed (default 0)")
    show.add_argument("--out", type=Path, default=None, help="PNG to write (default runs/pictures/<defense>-<classifier>.png)")
    curve = sub.add_parser("curve", help="robust accuracy vs eps for a defense and its bare classifier (PNG + JSON)")
    _model_arguments(curve)
    curve.add_argument("--threat", choices=("linf", "l2"), default="linf", help="threat of every point (default linf)")
    curve.add_argument("--eps", default=None, metavar="LIST",
                       help="comma-separated radii, 0 = clean (default 0,1/255,2/255,4/255,8/255,16/255 for linf; "
                            "0,0.25,0.5,1 for l2)")
    curve.add_argument("--suite", default=None, help="suite of each point (default: the threat's own suite)")
    curve.add_argument("--budget", choices=("auto", "smoke", "cpu", "full", "paper"), default="auto",
                       help="budget of that suite, as for bench run (default auto: full on CUDA, cpu on a CPU; smoke "
                            "takes a minute and gives upper bounds)")
    curve.add_argument("--n", type=int, default=64, help="images of the fixed subset per point (default 64)")
    curve.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    curve.add_argument("--runs", type=Path, default=Path("runs/curve"),
                       help="folder for the records of the points (default runs/curve)")
    curve.add_argument("--out", type=Path, default=None, help="PNG to write, a JSON of the points beside it "
                       "(default runs/pictures/<defense>-<classifier>-curve.png)")
    sub.add_parser("leaderboard", help="regenerate every board and paper table under leaderboards/ from the committed records")
    chk = sub.add_parser("check", help="regression checks: records valid, markdown not stale, chosen entries rerun and compared")
    chk.add_argument("--board", action="append", default=[], metavar="NAME",
                     help="rerun this board's entries (repeatable; default: the boards with a check block in boards.json)")
    chk.add_argument("--fresh", type=Path, default=None, metavar="DIR",
                     help="compare with fresh records in DIR (matched by run id) instead of rerunning")
    cmp = sub.add_parser("compare", help="two records on the same images, paired: which images each keeps that the other "
                                         "loses, with exact McNemar p-values")
    cmp.add_argument("a", type=Path, help="record A (JSON)")
    cmp.add_argument("b", type=Path, help="record B (JSON)")
    cmp.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the comparison as JSON")
    lst = sub.add_parser("list", help="list what can be named: defenses, attacks, suites, classifiers, datasets")
    lst.add_argument("what", nargs="?", choices=LIST_KINDS, default=None, help="only this kind (default: all)")
    lst.add_argument("--long", action="store_true", help="defenses with their card: paper, venue and year")
    sweep = sub.add_parser("sweep", help="run a grid of bench run cells as Ray tasks (local Ray, or --address a cluster)")
    sweep.add_argument("grid", type=Path, help="grid file (TOML; see grids/ and docs/sweeps.md)")
    sweep.add_argument("--out", type=Path, default=None, help="records' folder (default: the grid's out)")
    sweep.add_argument("--address", default=None,
                       help="join this Ray cluster (e.g. auto, or ray://head:10001) instead of starting a local one")
    sweep.add_argument("--cpus-per-cell", type=float, default=1,
                       help="CPUs each cell asks for; also its torch threads (default 1)")
    sweep.add_argument("--gpus-per-cell", type=float, default=0, help="GPUs each cell asks for (default 0)")
    sweep.add_argument("--retries", type=int, default=2,
                       help="times a failed or killed cell is retried (user errors are not; default 2)")
    sweep.add_argument("--dry-run", action="store_true", help="print the cells, one bench run command each, and stop")
    sweep.add_argument("--leaderboard", action="store_true", help="run bench leaderboard after the sweep")
    export = sub.add_parser("export", help="records in another benchmark's format: robustbench writes its model_info JSON")
    export.add_argument("format", choices=["robustbench"], help="target format")
    export.add_argument("records", nargs="+", type=Path, help="run records, or folders of them")
    export.add_argument("--out", type=Path, required=True,
                        help="folder; files go to OUT/<dataset>/<Linf|L2>/<Name>.json as in RobustBench's model_info/")
    card = sub.add_parser("show-card", help="a defense's card: its paper, the authors' code, where the shipped weights "
                                            "come from, and what differs from the paper here")
    card.add_argument("name", help="defense name (bench list defenses)")
    return parser


#: The project's loggers; other libraries' stay at warnings.
LOGGERS = ("bench", "attacks", "defenses", "leaderboards")


def _setup_logging(verbose: int, quiet: bool) -> None:
    """One logging setup for every command: progress and steps at info (the default), details with ``-v``, only
    warnings and errors with ``-q`` (which also hides progress bars). Everything goes to stderr; results to stdout."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)


def option_value(text: str):
    """A ``KEY=VALUE`` value as Python sees it: true/false as booleans, integers, decimals and fractions like 8/255 as
    numbers, anything else (paths, names) as the string given."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    if any(c.isdigit() for c in text):
        try:
            return float(Fraction(text.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    return text


def key_value_pairs(pairs: Sequence[str], flag: str) -> List[Tuple[str, str]]:
    """``KEY=VALUE`` flags as (key, text) pairs, dashes in keys read as underscores."""
    split = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"{flag} takes KEY=VALUE, got {pair!r}")
        split.append((key.replace("-", "_"), value))
    return split


def parse_options(pairs: Sequence[str], flag: str = "--defense-option") -> Dict[str, object]:
    return {key: option_value(value) for key, value in key_value_pairs(pairs, flag)}


def run_config(args: argparse.Namespace):
    """The RunConfig that ``bench run``'s parsed flags name (``bench sweep`` builds its cells' the same way)."""
    from bench.evaluation.runner import RunConfig

    return RunConfig(
        defense=args.defense, threat=args.threat, classifier=args.classifier, dataset=args.dataset, suite=args.suite,
        budget=args.budget, headline=args.headline, checks=args.checks,
        eps=args.eps, n=args.n, seed=args.seed, device=args.device, batch_size=args.batch_size, out=args.out,
        download=args.download, defense_options=parse_options(args.defense_option),
        channels_last=args.channels_last, autocast=args.autocast, compile=args.compile,
        skip_existing=args.skip_existing,
    )


def parse_run_args(run_args: Sequence[str]) -> argparse.Namespace:
    """``bench run``'s flags parsed by its own parser; a bad flag is a BenchError (not an exit) naming the problem."""
    import contextlib
    import io

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _parser().parse_args(["run", *joined_negative_values(run_args)])
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        raise BenchError(lines[-1].replace("bench run: ", "") if lines else f"bad bench run flags: {run_args}") from None


def cmd_run(args: argparse.Namespace) -> None:
    from bench.api import run

    record = run(run_config(args))
    if record.path is None:  # a torchrun rank other than 0
        return
    print(record.summary())


def cmd_train(args: argparse.Namespace) -> None:
    from bench.training import TRAINERS, TrainOptions

    trainer = TRAINERS.get(args.defense)
    names = {"transform": "transform", "purifier": "purifier", "adv_target": "adv_target", "rec_target": "rec_target",
             "lam": "lam", "pretrain_epochs": "pretrain_epochs", "epochs": "finetune_epochs", "pretrained": "pretrained",
             "eps": "eps", "step_size": "step_size", "attack_steps": "attack_steps", "oblivious": "oblivious", "lr": "lr",
             "feature_layer": "feature_layer", "init": "init", "alpha": "alpha", "beta": "beta",
             "pixel_loss": "pixel_loss", "grad_clip": "grad_clip", "width": "width"}
    extra = {key: getattr(args, flag) for flag, key in names.items() if getattr(args, flag) is not None}
    if args.defense != "atop":  # --epochs is the training length of one-stage trainers
        extra.pop("finetune_epochs", None)
    for key, value in key_value_pairs(args.train_options, "--option"):  # text: the trainer reads it as the setting's type
        if key in extra or (key == "epochs" and args.epochs is not None):
            raise BenchError(f"--option {key} repeats a setting already given (by its own flag or another --option)")
        extra[key] = value
    options = TrainOptions(defense=args.defense, classifier=args.classifier, dataset=args.dataset, epochs=args.epochs,
                           train_size=args.train_size, batch_size=args.batch_size, seed=args.seed, device=args.device,
                           out=args.out, extra=extra, hours=args.hours, eval_every=args.eval_every,
                           eval_size=args.eval_size, eval_eps=args.eval_eps,
                           autocast=args.autocast, checkpoint_minutes=args.checkpoint_minutes)
    folder = trainer(options)
    print(f"checkpoints and manifests: {folder}")


def cmd_perf(args: argparse.Namespace) -> None:
    import json

    import torch

    from bench.api import load_defense, load_subset
    from bench.core.record import environment, write_json_atomic
    from bench.evaluation.runner import resolve_device
    from bench.reports.perf import format_report, run_perf

    device = resolve_device(args.device)
    subset = load_subset(args.dataset, args.n, args.seed)
    model = load_defense(args.defense, args.classifier, device, **parse_options(args.defense_option))
    report = run_perf(model, subset, device, eps=args.eps, steps=args.steps, suite=args.suite or None, budget=args.budget,
                      eot_model=model.classifier, seed=args.seed)
    report.update(defense=args.defense, classifier=args.classifier, dataset=args.dataset, n=args.n,
                  threads=torch.get_num_threads(), environment=environment())
    print(format_report(report))
    if args.out:
        write_json_atomic(args.out, json.loads(json.dumps(report, default=str)))
        print(f"measurements: {args.out}")


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the verdict; exit code 1 when the defense is flagged unreliable."""
    from bench.evaluation.runner import RunConfig, audit

    config = RunConfig(defense=args.defense, threat=args.threat, eps=args.eps, classifier=args.classifier,
                       dataset=args.dataset, n=args.n, seed=args.seed, device=args.device,
                       defense_options=parse_options(args.defense_option))
    findings, result = audit(config)
    print(f"audit of {args.defense} on {args.classifier} ({args.dataset}, n={args.n}, {args.threat})")
    print(f"clean {100 * result.clean_correct.mean():.2f}% (every draw right: {100 * result.clean_worst.mean():.2f}%), "
          f"after PGD-10 / Square / transfer {100 * result.robust.mean():.2f}%")
    for key, value in findings.measurements.items():
        print(f"  {key}: {value}")
    if findings.unreliable:
        print("verdict: UNRELIABLE")
        for reason in findings.reasons:
            print(f"  - {reason}")
        return 1
    print("verdict: no integrity problem found")
    return 0


def cmd_show(args: argparse.Namespace) -> None:
    from attacks.base import Threat
    from bench.api import load_defense, load_subset
    from bench.evaluation.runner import resolve_device
    from bench.reports.pictures import show

    device = resolve_device(args.device)
    threat = Threat(args.threat, args.eps if args.eps is not None else {"linf": 8 / 255, "l2": 0.5}[args.threat])
    if not 1 <= args.images <= args.n:
        raise BenchError(f"--images must be between 1 and --n ({args.n}), got {args.images}")
    subset = load_subset(args.dataset, args.n, args.seed)
    defense = load_defense(args.defense, args.classifier, device, **parse_options(args.defense_option))
    out = args.out or Path("runs/pictures") / f"{args.defense}-{args.classifier}.png"
    attack_params = parse_options(args.attack_option, "--attack-option") or None
    print(f"picture: {show(defense, subset, out, threat, args.images, args.attack, attack_params, args.eot, args.seed, device)}")


def cmd_curve(args: argparse.Namespace) -> None:
    from bench.api import curve_points, load_subset
    from bench.evaluation.runner import resolve_device
    from bench.reports.pictures import curve_title, plot_curve

    device = resolve_device(args.device)
    default = "0,1/255,2/255,4/255,8/255,16/255" if args.threat == "linf" else "0,0.25,0.5,1"
    try:
        eps_values = sorted({parse_eps(e) for e in (args.eps or default).split(",") if e.strip()})
    except argparse.ArgumentTypeError as exc:
        raise BenchError(str(exc)) from None
    subset = load_subset(args.dataset, args.n, args.seed)
    points = curve_points(args.defense, args.classifier, eps_values, args.suite, args.threat, args.budget, subset, device,
                          args.runs, parse_options(args.defense_option))
    out = args.out or Path("runs/pictures") / f"{args.defense}-{args.classifier}-curve.png"
    plot_curve(points, out, curve_title(args.defense, args.classifier, subset, points), args.threat)
    rows = [[p["model"], f"{p['eps'] * (255 if args.threat == 'linf' else 1):.3g}", f"{100 * p['robust']['accuracy']:.2f}",
             f"[{100 * p['robust']['ci95'][0]:.1f}, {100 * p['robust']['ci95'][1]:.1f}]"] for p in points]
    print(tabulate(rows, headers=["model", "eps" + (" (/255)" if args.threat == "linf" else ""), "robust %", "95% CI"]))
    print(f"picture: {out}")
    print(f"points: {out.with_suffix('.json')}")


def cmd_leaderboard() -> None:
    from leaderboards.render import ROOT, write_all

    changed = write_all()
    print(f"{len(changed)} file(s) changed under {ROOT}" + "".join(f"\n  {name}" for name in changed))


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.sweep import cell_command, load_grid, run_sweep, summary_table

    grid = load_grid(args.grid, args.out)
    if args.dry_run:
        print(f"sweep {grid.name}: {len(grid.cells)} cells, records in {grid.out}")
        for cell in grid.cells:
            print(cell_command(grid, cell))
        return 0
    if args.retries < 0 or args.cpus_per_cell <= 0 or args.gpus_per_cell < 0:
        raise BenchError("--retries must be >= 0, --cpus-per-cell > 0 and --gpus-per-cell >= 0")
    start = time.perf_counter()
    states = run_sweep(grid, args.address, args.cpus_per_cell, args.gpus_per_cell, args.retries)
    print(summary_table(states))
    failed = sum(s.status == "failed" for s in states)
    print(f"{len(states)} cells: {sum(s.status == 'done' for s in states)} run, "
          f"{sum(s.status == 'skipped' for s in states)} already done, {failed} failed; "
          f"{time.perf_counter() - start:.1f} s; manifest {grid.out / '.sweep' / (grid.name + '.json')}")
    if args.leaderboard:
        cmd_leaderboard()
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> None:
    from bench.reports.export import export_robustbench

    for path, unfilled in export_robustbench(args.records, args.out):
        print(path)
        for item in unfilled:
            print(f"  not filled: {item}")


def cmd_compare(args: argparse.Namespace) -> None:
    from bench.reports.compare import compare_records, format_comparison, load_record

    comparison = compare_records(load_record(args.a), load_record(args.b))
    print(format_comparison(comparison))
    if args.json:
        args.json.write_text(json.dumps(comparison, indent=1) + "\n")
        print(f"comparison: {args.json}")


def cmd_check(args: argparse.Namespace) -> int:
    from bench.reports.check import run_check

    failures, compared = run_check(args.board or None, args.fresh)
    headers = ["board", "entry", "what", "committed", "fresh", "allowed", "verdict"]
    if compared:
        print(tabulate(compared, headers=headers))
    if failures:
        print("\nFAILED:")
        print(tabulate(failures, headers=headers))
        return 1
    print("check passed: records valid, markdown up to date" + (f", {len(compared)} numbers within bounds" if compared else ""))
    return 0


def add_launcher_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--launcher`` and ``--nproc-per-node``, for ``bench run`` and ``scripts/rerun_records.py``."""
    parser.add_argument("--launcher", choices=("none", "torchrun"), default="none",
                        help=f"torchrun: run {what} over --nproc-per-node processes on this machine (one record)")
    parser.add_argument("--nproc-per-node", type=int, default=2, help="processes for --launcher torchrun (default 2)")


def launch_torchrun(argv: Sequence[str], processes: int, entry: Sequence[str] = ("-m", "bench", "--")) -> int:
    """``--launcher torchrun``: the same command (``entry argv``) under ``torchrun --nproc-per-node K``, the
    launcher's own options dropped so the ranks do not launch again; each rerun or evaluation is then sharded over K
    processes (``bench/evaluation/distributed.py``). Exit code 2 when K < 1."""
    import subprocess

    if processes < 1:
        print("error: --nproc-per-node must be >= 1", file=sys.stderr)
        return 2
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--launcher", "--nproc-per-node"):
            skip = True
        elif not arg.startswith(("--launcher=", "--nproc-per-node=")):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), *entry, *rest]
    return subprocess.run(command).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = joined_negative_values(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if args.command == "run" and args.launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(argv, args.nproc_per_node)
    try:
        from bench.core.plugins import load_plugin

        for plugin in args.plugin + getattr(args, "run_plugins", []):
            load_plugin(plugin)
        if args.command == "list":
            cmd_list(args.what, args.long)
        elif args.command == "sweep":
            return cmd_sweep(args)
        elif args.command == "export":
            cmd_export(args)
        elif args.command == "show-card":
            cmd_show_card(args.name)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "audit":
            return cmd_audit(args)
        elif args.command == "leaderboard":
            cmd_leaderboard()
        elif args.command == "check":
            return cmd_check(args)
        elif args.command == "compare":
            cmd_compare(args)
        elif args.command == "perf":
            cmd_perf(args)
        elif args.command == "show":
            cmd_show(args)
        elif args.command == "curve":
            cmd_curve(args)
        else:
            cmd_run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
