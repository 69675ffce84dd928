"""Command line: ``bench run`` and ``bench list``. A thin layer over ``bench.runner`` and the registries.

User errors (``BenchError``) print one line and exit with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from attacks.base import NORMS
from bench.errors import BenchError

LIST_KINDS = ("defenses", "attacks", "suites", "classifiers", "datasets")


def parse_eps(text: str) -> float:
    """Accept ``8/255``, ``0.0314`` or ``0.5``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 8/255, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Adaptive-attack benchmark for adversarial purification defenses.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help="import FILE to register third-party defenses/attacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate a defense on the fixed subset against a suite")
    run.add_argument("--defense", required=True)
    run.add_argument("--threat", choices=NORMS, default="linf",
                     help="linf (8/255), l2 (0.5; 1.0 with --eps 1.0) or stadv (flow field bounded by 0.05)")
    run.add_argument("--suite", default=None, help="suite name (default: the threat's own suite, linf, l2 or stadv)")
    run.add_argument("--budget", choices=("auto", "smoke", "cpu", "paper"), default="auto",
                     help="attack budget of the suite: smoke (seconds, tests), cpu (reduced, fits a CPU session), "
                          "paper (full strength, a GPU job); auto = paper on CUDA, cpu on CPU (default)")
    run.add_argument("--eps", type=parse_eps, default=None, help="override the suite's eps, e.g. 2/255")
    run.add_argument("--headline", choices=("worst", "mean", "majority"), default="worst",
                     help="robust accuracy to lead with for stochastic defenses: worst (broken if any of 10 draws is "
                          "wrong, default), mean (over the draws) or majority (vote over the draws)")
    run.add_argument("--no-checks", dest="checks", action="store_false",
                     help="skip the integrity checks after the attacks (the record then says checks.ran = false)")
    run.add_argument("--dataset", default="cifar10-jpeg")
    run.add_argument("--classifier", default="resnet20")
    run.add_argument("--n", type=int, default=512)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--download", action="store_true", help="let datasets that can be downloaded fetch themselves")
    run.add_argument("--out", type=Path, default=Path("runs"))
    run.add_argument("--launcher", choices=("none", "torchrun"), default="none",
                     help="torchrun: run this evaluation over --nproc-per-node processes on this machine (one record)")
    run.add_argument("--nproc-per-node", type=int, default=2, help="processes for --launcher torchrun (default 2)")
    run.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE",
                     help="pass an option to the defense, e.g. checkpoint=path/to/finetune.pt (repeatable)")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE", dest="run_plugins")
    train = sub.add_parser("train", help="train a defense's learned parts (the classifier stays frozen)")
    train.add_argument("--defense", required=True)
    train.add_argument("--classifier", default="resnet20")
    train.add_argument("--dataset", default="cifar10-jpeg")
    train.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (AToP) / training epochs")
    train.add_argument("--pretrain-epochs", type=int, default=None)
    train.add_argument("--train-size", type=int, default=20000, help="training images used (seeded subset)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--out", type=Path, default=None, help="checkpoint folder (default under $BENCH_CHECKPOINT_DIR)")
    train.add_argument("--transform", choices=("rt1", "rt2", "rt3"), default=None)
    train.add_argument("--purifier", choices=("gan", "ae"), default=None)
    train.add_argument("--adv-target", choices=("classifier", "pipeline"), default=None)
    train.add_argument("--rec-target", choices=("adv", "clean"), default=None)
    train.add_argument("--lam", type=float, default=None, help="weight of the adversarial CE loss (AToP lambda)")
    train.add_argument("--eps", type=parse_eps, default=None,
                       help="NRP/JATP: radius of the training perturbations (NRP 16/255, JATP 8/255)")
    train.add_argument("--step-size", type=parse_eps, default=None, help="NRP/JATP: PGD step of the training perturbations")
    train.add_argument("--attack-steps", type=int, default=None, help="NRP/JATP: PGD steps per training batch")
    train.add_argument("--oblivious", action="store_true", default=None,
                       help="JATP: craft training examples against the bare classifier (the paper's -obl setting)")
    train.add_argument("--lr", type=float, default=None, help="NRP/JATP: initial learning rate")
    train.add_argument("--init", default=None, metavar="PATH",
                       help="JATP: start from this purifier's weights (e.g. a trained NRP) instead of the identity")
    train.add_argument("--feature-layer", default=None,
                       help="NRP/JATP: the classifier's internal layer, a dotted module name (default: its "
                            "second-to-last residual stage) or 'logits'")
    train.add_argument("--pretrained", default=None, metavar="PATH",
                       help="AToP: skip pre-training and fine-tune this pre-trained purifier (e.g. RT2's for RT3)")
    aud = sub.add_parser("audit", help="run only the integrity checks on a defense and print a verdict")
    aud.add_argument("--defense", required=True)
    aud.add_argument("--threat", choices=NORMS, default="linf")
    aud.add_argument("--eps", type=parse_eps, default=None, help="override the threat's eps, e.g. 2/255")
    aud.add_argument("--classifier", default="resnet20")
    aud.add_argument("--dataset", default="cifar10-jpeg")
    aud.add_argument("--n", type=int, default=64, help="images of the fixed subset to audit on (default 64)")
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--device", default="auto")
    aud.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE")
    perf = sub.add_parser("perf", help="measure attack efficiency against raw passes, reference implementations, EOT batching and early stop")
    perf.add_argument("--defense", default="none")
    perf.add_argument("--classifier", default="resnet20")
    perf.add_argument("--dataset", default="cifar10-jpeg")
    perf.add_argument("--n", type=int, default=128, help="images of the fixed subset, attacked as one batch (default 128)")
    perf.add_argument("--eps", type=parse_eps, default=8 / 255)
    perf.add_argument("--steps", type=int, default=20, help="steps of PGD and APGD-CE (default 20)")
    perf.add_argument("--suite", default="linf", help="suite for the early-stop comparison ('' skips it)")
    perf.add_argument("--budget", default="cpu")
    perf.add_argument("--seed", type=int, default=0)
    perf.add_argument("--device", default="auto")
    perf.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE")
    perf.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    sub.add_parser("leaderboard", help="regenerate every board and paper table under leaderboards/ from the committed records")
    chk = sub.add_parser("check", help="regression checks: records valid, markdown not stale, chosen entries rerun and compared")
    chk.add_argument("--board", action="append", default=[], metavar="NAME",
                     help="rerun this board's entries (repeatable; default: the boards with a check block in boards.json)")
    chk.add_argument("--fresh", type=Path, default=None, metavar="DIR",
                     help="compare with fresh records in DIR (matched by run id) instead of rerunning")
    lst = sub.add_parser("list", help="list registered names")
    lst.add_argument("what", nargs="?", choices=LIST_KINDS, default=None)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _registries() -> Dict[str, object]:
    from attacks import ATTACKS, SUITES
    from bench.classifiers import CLASSIFIERS
    from bench.datasets import DATASETS
    from defenses import DEFENSES

    return {"defenses": DEFENSES, "attacks": ATTACKS, "suites": SUITES, "classifiers": CLASSIFIERS, "datasets": DATASETS}


def cmd_list(what: Optional[str]) -> None:
    registries = _registries()
    for kind in [what] if what else LIST_KINDS:
        registry = registries[kind]
        print(f"{kind}:")
        if kind == "suites":
            for name, budgets in registry.items():
                for budget, suite in budgets.items():
                    attacks = ", ".join(_describe_spec(spec) for spec in suite.attacks)
                    mode = ", independent" if suite.independent else ""
                    also = "".join(f", --eps {e:g}" for e in suite.standard_eps if e != suite.threat.eps)
                    print(f"  {name} v{suite.version} {budget} [{suite.threat.norm} eps={suite.threat.eps:.6g}{also}, "
                          f"EOT {suite.eot_draws}{mode}]: {attacks}")
        else:
            for name in registry.names():
                print(f"  {name}")
        if kind == "classifiers":
            print("  robustbench:<Name>   (RobustBench zoo, weights under $BENCH_WEIGHTS_DIR/robustbench)")
            print("  file:<arch>:<path>   (your state dict for a registered architecture)")


def _describe_spec(spec) -> str:
    params = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.params)
    return f"{spec.attack}({params})" + (f"+bpda[{','.join(spec.bpda)}]" if spec.bpda else "")


def _pct(acc: Dict) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_result(record: Dict) -> str:
    independent = record["suite"].get("independent", False)
    rows: List[List[object]] = []
    for a in record["attacks"]:
        c = a["cost"]
        alone = [_pct(a["robust_alone"]), f"{100 * a['robust_alone_mean']:.2f}%"] if independent else []
        label = a["label"] + (" (correction)" if a.get("stage") == "correction" else "")
        rows.append([label, a["attacked"], a["broken"], *alone, _pct(a["robust_after"]), c["forward"], c["backward"],
                     f"{c['seconds']:.1f}"])
    alone_headers = ["alone [95% CI]", "alone, mean of draws"] if independent else []
    headers = ["attack", "attacked", "broken", *alone_headers, "worst case so far [95% CI]", "fwd", "bwd", "s"]
    table = tabulate(rows, headers=headers)
    s, t = record["subset"], record["threat"]
    head = (f"{record['defense']['name']} on {record['classifier']['name']} | {s['dataset']} n={s['n']} seed={s['seed']} "
            f"subset {s['hash'][:12]} | {t['norm']} eps={t['eps']:.6g} | suite {record['suite']['name']} v{record['suite']['version']} "
            f"({record['suite']['budget']} budget)")
    draws = record["settings"].get("success_draws", 1)
    rule = f"; each adversarial example classified {draws} times, broken if any draw is wrong" if draws > 1 else ""
    clean_mean = f" (mean over {draws} draws: {100 * record['clean_mean']:.2f}%)" if draws > 1 else ""
    lines = [head, f"clean accuracy: {_pct(record['clean'])}{clean_mean}", table,
             f"robust accuracy (worst case over the suite{rule}): {_pct(record['robust'])}"]
    if draws > 1:
        lines.append(f"  mean over the draws: {100 * record['robust_mean']:.2f}%, majority vote: {_pct(record['robust_majority'])}")
    h = record["headline"]
    lines.append(f"headline ({h['metric']}): {100 * h['accuracy']:.2f}% in {record['timing']['seconds']:.1f} s")
    fixed = record.get("corrections")
    if record.get("unreliable"):
        lines.append("UNRELIABLE: " + "; ".join(record["unreliable_reasons"]))
    elif record.get("checks", {}).get("ran"):
        lines.append(f"integrity checks passed ({record['checks']['seconds']:.1f} s)")
    if fixed:
        lines.append(f"attack plan corrected ({'; '.join(fixed['actions'])}): robust accuracy "
                     f"{_pct(fixed['robust_before'])} as declared -> {_pct(fixed['robust_after'])}")
    return "\n".join(lines)


def parse_options(pairs: Sequence[str]) -> Dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"--defense-option takes KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = value
    return options


def cmd_run(args: argparse.Namespace) -> None:
    from bench.runner import RunConfig, run

    config = RunConfig(
        defense=args.defense, threat=args.threat, classifier=args.classifier, dataset=args.dataset, suite=args.suite,
        budget=args.budget, headline=args.headline, checks=args.checks,
        eps=args.eps, n=args.n, seed=args.seed, device=args.device, batch_size=args.batch_size, out=args.out,
        download=args.download, defense_options=parse_options(args.defense_option),
    )
    record, path = run(config)
    if path is None:  # a torchrun rank other than 0
        return
    print(format_result(record))
    print(f"record: {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from bench.training import TRAINERS, TrainOptions

    trainer = TRAINERS.get(args.defense)
    names = {"transform": "transform", "purifier": "purifier", "adv_target": "adv_target", "rec_target": "rec_target",
             "lam": "lam", "pretrain_epochs": "pretrain_epochs", "epochs": "finetune_epochs", "pretrained": "pretrained",
             "eps": "eps", "step_size": "step_size", "attack_steps": "attack_steps", "oblivious": "oblivious", "lr": "lr",
             "feature_layer": "feature_layer", "init": "init"}
    extra = {key: getattr(args, flag) for flag, key in names.items() if getattr(args, flag) is not None}
    if args.defense != "atop":  # --epochs is the training length of one-stage trainers
        extra.pop("finetune_epochs", None)
    options = TrainOptions(defense=args.defense, classifier=args.classifier, dataset=args.dataset, epochs=args.epochs,
                           train_size=args.train_size, batch_size=args.batch_size, seed=args.seed, device=args.device,
                           out=args.out, extra=extra)
    folder = trainer(options)
    print(f"checkpoints and manifests: {folder}")


def cmd_perf(args: argparse.Namespace) -> None:
    import json

    import torch

    from bench.classifiers import load_classifier
    from bench.perf import format_report, run_perf
    from bench.record import environment, write_json_atomic
    from bench.runner import resolve_device
    from bench.subset import load_subset
    from defenses.base import build_defense

    device = resolve_device(args.device)
    subset = load_subset(args.dataset, args.n, args.seed)
    classifier = load_classifier(args.classifier, device)
    model = build_defense(args.defense, classifier, **parse_options(args.defense_option)).to(device).eval()
    report = run_perf(model, subset, device, eps=args.eps, steps=args.steps, suite=args.suite or None, budget=args.budget,
                      eot_model=classifier, seed=args.seed)
    report.update(defense=args.defense, classifier=args.classifier, dataset=args.dataset, n=args.n,
                  threads=torch.get_num_threads(), environment=environment())
    print(format_report(report))
    if args.out:
        write_json_atomic(args.out, json.loads(json.dumps(report, default=str)))
        print(f"measurements: {args.out}")


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the verdict; exit code 1 when the defense is flagged unreliable."""
    from bench.runner import RunConfig, audit

    config = RunConfig(defense=args.defense, threat=args.threat, eps=args.eps, classifier=args.classifier,
                       dataset=args.dataset, n=args.n, seed=args.seed, device=args.device,
                       defense_options=parse_options(args.defense_option))
    findings, result = audit(config)
    print(f"audit of {args.defense} on {args.classifier} ({args.dataset}, n={args.n}, {args.threat})")
    print(f"clean {100 * result.clean_correct.mean():.2f}%, after PGD-10 / Square / transfer {100 * result.robust.mean():.2f}%")
    for key, value in findings.measurements.items():
        print(f"  {key}: {value}")
    if findings.unreliable:
        print("verdict: UNRELIABLE")
        for reason in findings.reasons:
            print(f"  - {reason}")
        return 1
    print("verdict: no integrity problem found")
    return 0


def cmd_leaderboard() -> None:
    from leaderboards.render import ROOT, write_all

    changed = write_all()
    print(f"{len(changed)} file(s) changed under {ROOT}" + "".join(f"\n  {name}" for name in changed))


def cmd_check(args: argparse.Namespace) -> int:
    from bench.check import run_check

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


def launch_torchrun(argv: Sequence[str], processes: int) -> int:
    """``bench run --launcher torchrun``: the same command under ``torchrun --nproc-per-node K`` (its own
    options dropped), which runs one evaluation sharded over K processes (``bench/distributed.py``)."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--launcher", "--nproc-per-node"):
            skip = True
        elif not arg.startswith(("--launcher=", "--nproc-per-node=")):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "bench", "--", *rest]
    return subprocess.run(command).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if args.command == "run" and args.launcher == "torchrun" and "WORLD_SIZE" not in os.environ:
        if args.nproc_per_node < 1:
            print("error: --nproc-per-node must be >= 1", file=sys.stderr)
            return 2
        return launch_torchrun(argv, args.nproc_per_node)
    try:
        from bench.plugins import load_plugin

        for plugin in args.plugin + getattr(args, "run_plugins", []):
            load_plugin(plugin)
        if args.command == "list":
            cmd_list(args.what)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "audit":
            return cmd_audit(args)
        elif args.command == "leaderboard":
            cmd_leaderboard()
        elif args.command == "check":
            return cmd_check(args)
        elif args.command == "perf":
            cmd_perf(args)
        else:
            cmd_run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
