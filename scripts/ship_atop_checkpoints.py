"""Copy trained AToP purifiers into ``defenses/checkpoints/`` so the package works offline without training.

For every ``<root>/atop/<classifier>/<transform>-<purifier>/<stage>.pt`` written by ``bench train`` (stage
``pretrain``, ``finetune``, or ``finetune-pipeline``: a ``finetune.pt`` trained with ``--adv-target pipeline``), this
writes the generator weights alone (what inference needs) to the same place under ``defenses/checkpoints``,
and beside it the training manifest with two fields added: ``shipped_from`` (the full checkpoint's sha256)
and ``shipped_sha256`` (the shipped file's own sha256, checked by the tests). A path in the manifest outside the
repository (the training run's ``--out`` on the machine that trained it, a ``--pretrained`` file there) is written as
``ckpt/atop/<classifier>/<run folder>[/<file>]``, the repository's name for a training run's folder; a path inside
the repository becomes relative to it.

    python scripts/ship_atop_checkpoints.py /path/to/checkpoint/root [--max-mib 5] [--fp16]

``--fp16`` stores the floating-point weights in half precision (the defense loads them into float32 modules), halving
the file; the manifest then says ``storage_dtype: float16``, and ``fp16_check`` holds the measurement that allows it:
the defense with the shipped file against the float32 training weights, in front of the classifier the folder names,
on the fixed test subset (``--check-n`` images of ``--check-dataset``, 3 draws seeded 1000 + k as
``scripts/clean_draws.py`` reads), their prediction agreement and clean accuracy per draw. Put those numbers in the docs.

A file whose training has not finished all its epochs is skipped, unless ``--unfinished`` asks for it (a long run
ships the epoch that beats the shipped file before the run ends); its manifest then says ``shipped_unfinished``:
the epochs done of those planned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from bench.classifiers.base import half_precision  # noqa: E402
from bench.core.record import sha256_file, write_json_atomic  # noqa: E402
from clean_draws import draw_predictions  # noqa: E402
from defenses.atop import BUNDLED_DIR, PIPELINE_STAGE, STAGES, AToP  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def fp16_check(source: Path, target: Path, classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               draws: int = 3) -> Dict[str, Any]:
    """The AToP defense with the shipped ``target`` file against the float32 training checkpoint ``source``, the same
    draws of the transform (seeded 1000 + k): per draw, the share of ``x`` both predict alike and each one's accuracy."""
    transform, purifier = source.parent.name.split("-")
    preds = [draw_predictions(AToP(classifier, transform, purifier, source.stem, checkpoint=str(path)).eval(), x, draws)
             for path in (source, target)]
    return {
        "images": len(x), "draws": draws, "seeds": "1000+k",
        "note": "the shipped fp16 file against the float32 training weights, same transform draws",
        "prediction_agreement": [(a == b).float().mean().item() for a, b in zip(*preds)],
        "clean_fp16": [(b == y).float().mean().item() for b in preds[1]],
        "clean_fp32": [(a == y).float().mean().item() for a in preds[0]],
    }


def portable_path(path: str, classifier: str) -> str:
    """``path`` as a shipped manifest may name it: relative to the repository when inside it, ``ckpt/atop/<classifier>/``
    and the run folder (with the file name when ``path`` names a file) when elsewhere on the machine; else unchanged."""
    if not path.startswith("/"):
        return path
    absolute = Path(path)
    if absolute.is_relative_to(REPO):
        return absolute.relative_to(REPO).as_posix()
    kept = absolute.parts[-2:] if absolute.suffix else absolute.parts[-1:]
    return "/".join(("ckpt", "atop", classifier, *kept))


def portable(value: Any, classifier: str) -> Any:
    """Every path in a manifest's ``value`` (strings, and the words of a command line) through :func:`portable_path`."""
    if isinstance(value, dict):
        return {k: portable(v, classifier) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, classifier) for v in value]
    if isinstance(value, str) and "/" in value:
        return " ".join(portable_path(word, classifier) for word in value.split(" "))
    return value


def read_manifest(source: Path) -> Dict[str, Any]:
    return json.loads(source.with_suffix(".manifest.json").read_text())


def ship(source: Path, target: Path, max_bytes: int, fp16: bool = False,
         check_data: Optional[tuple] = None, manifest: Optional[Dict[str, Any]] = None) -> None:
    """Copy ``source``'s generator to ``target``; with ``fp16`` and ``check_data`` (classifier, x, y), measure the copy
    against ``source`` (:func:`fp16_check`) into the manifest (``source``'s, or ``manifest`` when already read)."""
    generator = torch.load(source, map_location="cpu", weights_only=True)["generator"]
    if fp16:
        generator = half_precision(generator)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator}, target)
    size = target.stat().st_size
    if size > max_bytes:
        target.unlink()
        raise SystemExit(f"{target}: {size} bytes is over the limit of {max_bytes}")
    manifest = read_manifest(source) if manifest is None else manifest
    wanted = "pipeline" if source.stem == PIPELINE_STAGE else "classifier"
    if source.stem != "pretrain" and manifest["config"]["settings"]["adv_target"] != wanted:
        target.unlink()
        raise SystemExit(f"{source}: a {source.stem} file must be fine-tuned with adv_target={wanted}")
    manifest.update(shipped_from=sha256_file(source), shipped_sha256=sha256_file(target),
                    storage_dtype="float16" if fp16 else "float32")
    if not manifest.get("finished"):
        planned = manifest["config"]["settings"].get(f"{source.stem.split('-')[0]}_epochs")  # finetune-pipeline too
        manifest["shipped_unfinished"] = f"after epoch {len(manifest.get('history', []))} of {planned}"
    if fp16 and check_data is not None:
        manifest["fp16_check"] = fp16_check(source, target, *check_data)
    classifier = manifest.get("config", {}).get("classifier", source.parent.parent.name)
    write_json_atomic(target.with_suffix(".manifest.json"), portable(manifest, classifier))
    print(f"{target} ({target.stat().st_size / 2**20:.2f} MiB) <- {source}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding atop/<classifier>/<transform>-<purifier>/")
    parser.add_argument("--max-mib", type=float, default=5.0)
    parser.add_argument("--fp16", action="store_true", help="store the weights in half precision (measured: fp16_check)")
    parser.add_argument("--check-n", type=int, default=512, help="test-subset images for the fp16 check")
    parser.add_argument("--check-dataset", default="cifar10-jpeg")
    parser.add_argument("--unfinished", action="store_true",
                        help="also ship a file whose run has epochs left (the manifest says which epoch)")
    args = parser.parse_args(argv)
    sources = sorted(args.root.glob("atop/*/*/*.pt"))
    sources = [p for p in sources if p.stem in (*STAGES.values(), PIPELINE_STAGE)]
    if not sources:
        print(f"no checkpoints under {args.root}/atop", file=sys.stderr)
        return 1
    subset, classifiers = None, {}  # loaded once, for every file the fp16 check measures
    for source in sources:
        manifest = read_manifest(source)
        if not args.unfinished and not manifest.get("finished"):
            print(f"skipped {source}: its training has not finished")
            continue
        check_data = None
        if args.fp16:  # measured in front of the classifier the folder names
            if subset is None:
                subset = bench.load_subset(args.check_dataset, args.check_n, 0)
            name = source.parent.parent.name
            if name not in classifiers:
                classifiers[name] = bench.load_classifier(name).eval()
            check_data = (classifiers[name], subset.x, subset.y)
        ship(source, BUNDLED_DIR / source.relative_to(args.root), int(args.max_mib * 2**20), fp16=args.fp16,
             check_data=check_data, manifest=manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
