"""Copy trained AToP purifiers into ``defenses/checkpoints/`` so the package works offline without training.

For every ``<root>/atop/<classifier>/<transform>-<purifier>/<stage>.pt`` written by ``bench train`` (stage
``pretrain``, ``finetune``, or ``finetune-pipeline``: a ``finetune.pt`` trained with ``--adv-target pipeline``), this
writes the generator weights alone (what inference needs) to the same place under ``defenses/checkpoints``,
and beside it the training manifest with two fields added: ``shipped_from`` (the full checkpoint's sha256)
and ``shipped_sha256`` (the shipped file's own sha256, checked by the tests).

    python scripts/ship_atop_checkpoints.py /path/to/checkpoint/root [--max-mib 5] [--fp16]

``--fp16`` stores the floating-point weights in half precision (the defense loads them into float32 modules), halving
the file; the manifest then says ``storage_dtype: float16``. Use it only when the shipped defense reads the same within
noise: measure, and put the measurement in the docs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.classifiers.base import half_precision
from bench.core.record import sha256_file, write_json_atomic
from defenses.atop import BUNDLED_DIR, PIPELINE_STAGE, STAGES


def ship(source: Path, target: Path, max_bytes: int, fp16: bool = False) -> None:
    generator = torch.load(source, map_location="cpu", weights_only=True)["generator"]
    if fp16:
        generator = half_precision(generator)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": generator}, target)
    size = target.stat().st_size
    if size > max_bytes:
        target.unlink()
        raise SystemExit(f"{target}: {size} bytes is over the limit of {max_bytes}")
    manifest = json.loads(source.with_suffix(".manifest.json").read_text())
    wanted = "pipeline" if source.stem == PIPELINE_STAGE else "classifier"
    if source.stem != "pretrain" and manifest["config"]["settings"]["adv_target"] != wanted:
        target.unlink()
        raise SystemExit(f"{source}: a {source.stem} file must be fine-tuned with adv_target={wanted}")
    manifest.update(shipped_from=sha256_file(source), shipped_sha256=sha256_file(target),
                    storage_dtype="float16" if fp16 else "float32")
    write_json_atomic(target.with_suffix(".manifest.json"), manifest)
    print(f"{target} ({target.stat().st_size / 2**20:.2f} MiB) <- {source}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding atop/<classifier>/<transform>-<purifier>/")
    parser.add_argument("--max-mib", type=float, default=5.0)
    parser.add_argument("--fp16", action="store_true", help="store the weights in half precision")
    args = parser.parse_args(argv)
    sources = sorted(args.root.glob("atop/*/*/*.pt"))
    sources = [p for p in sources if p.stem in (*STAGES.values(), PIPELINE_STAGE)]
    if not sources:
        print(f"no checkpoints under {args.root}/atop", file=sys.stderr)
        return 1
    for source in sources:
        if not json.loads(source.with_suffix(".manifest.json").read_text()).get("finished"):
            print(f"skipped {source}: its training has not finished")
            continue
        ship(source, BUNDLED_DIR / source.relative_to(args.root), int(args.max_mib * 2**20), fp16=args.fp16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
