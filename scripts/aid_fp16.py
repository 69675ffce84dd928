"""Store a shipped AID-Purifier discriminator in half precision, after measuring that it purifies the same.

The discriminators are 7.9M-parameter MLPs (31 MB in float32). This script, for each named classifier's shipped
``defenses/checkpoints/aid-purifier/<classifier>/discriminator.weights.pt``:

1. builds ``aid-purifier`` twice on the classifier, once with the float32 file and once with a float16 copy (the
   defense loads it into its float32 network);
2. purifies the first ``--n`` images of the fixed test subset with both and compares: mean and largest absolute pixel
   difference, agreement of the classifier's predictions on the purified images, clean accuracy of each, and, as the
   yardstick of noise, how often the float32 defense agrees with itself when its inputs move by 1e-6;
3. unless ``--check-only``, replaces the file with the float16 copy and adds to the manifest ``shipped_from`` (the
   float32 file's sha256), ``shipped_sha256`` (the new file's), ``storage`` and ``fp16_check`` (the numbers of step 2),
   and drops ``size_reason``.

    python scripts/aid_fp16.py resnet20 resnet4b [--n 256] [--check-only]

AID-Purifier is deterministic, so the two runs see the same inputs and the differences are the storage's alone. The
file's sha256 changes, so every record that names it must be rerun (``scripts/rerun_records.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api import load_classifier, load_subset  # noqa: E402
from bench.classifiers.base import half_precision, load_state_dict  # noqa: E402
from bench.core.record import sha256_file, write_json_atomic  # noqa: E402
from bench.evaluation.integrity import nudged  # noqa: E402
from defenses.aid_purifier import WEIGHTS_FILE, AIDPurifier, aid_checkpoint_folder  # noqa: E402
from defenses.base import SHIPPED_DIR  # noqa: E402

STORAGE = "float16 (loaded into the float32 network; checked against the float32 weights: fp16_check)"


def is_half(state: Dict[str, torch.Tensor]) -> bool:
    return all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


@torch.no_grad()
def compare(classifier: torch.nn.Module, fp32: Path, fp16: Path, x: torch.Tensor, y: torch.Tensor,
            batch: int = 128) -> Dict[str, Any]:
    """Purify ``x`` with the discriminator stored both ways; the numbers ``fp16_check`` records."""
    full, half = AIDPurifier(classifier, checkpoint=str(fp32)).eval(), AIDPurifier(classifier, checkpoint=str(fp16)).eval()
    # the yardstick of "the same within noise": the float32 defense against itself on inputs moved by the chaos
    # check's nudge; a purifier whose outcome flips under it cannot be held to more by its storage
    moved = nudged(x)
    diffs, agree, agree_nudged, right32, right16 = [], 0, 0, 0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        p32, p16 = full.purifier(xb), half.purifier(xb)  # the purifier enables the gradients its steps need
        diffs.append((p32 - p16).abs().flatten(1))
        a, b = classifier(p32).argmax(1), classifier(p16).argmax(1)
        c = classifier(full.purifier(moved[i:i + batch])).argmax(1)
        agree += int((a == b).sum())
        agree_nudged += int((a == c).sum())
        right32 += int((a == yb).sum())
        right16 += int((b == yb).sum())
    d = torch.cat(diffs)
    return {"images": len(x), "max_abs_pixel_diff": float(d.max()), "mean_abs_pixel_diff": float(d.mean()),
            "prediction_agreement": agree / len(x), "clean_fp32": right32 / len(x), "clean_fp16": right16 / len(x),
            "fp32_agreement_input_noise_1e-6": agree_nudged / len(x)}


def convert(classifier_name: str, n: int, check_only: bool) -> Dict[str, Any]:
    path = aid_checkpoint_folder(classifier_name, SHIPPED_DIR) / WEIGHTS_FILE
    subset = load_subset("cifar10-jpeg", 512, 0)
    check = store_half(path, load_classifier(classifier_name), subset.x[:n], subset.y[:n], check_only)
    print(f"{classifier_name}: {json.dumps(check)}")
    if not check_only:
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB) now float16")
    return check


def store_half(path: Path, classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               check_only: bool = False) -> Dict[str, Any]:
    """Measure the float16 copy of the discriminator at ``path`` against it (``compare``) and, unless ``check_only``,
    put the copy in its place and write the measurement and both sha256 into its manifest."""
    state = load_state_dict(path, key="discriminator")
    if is_half(state):
        raise SystemExit(f"{path} is already stored in float16")
    manifest_path = path.with_name("discriminator.manifest.json")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / WEIGHTS_FILE
        torch.save({"discriminator": half_precision(state)}, copy)
        (Path(tmp) / manifest_path.name).write_text(manifest_path.read_text())  # same taps check as the real file
        check = compare(classifier, path, copy, x, y)
        if check_only:
            return check
        manifest = json.loads(manifest_path.read_text())
        source_sha = sha256_file(path)
        shutil.move(copy, path)
    manifest.pop("size_reason", None)
    manifest.update(shipped_from=source_sha, shipped_sha256=sha256_file(path), storage=STORAGE, fp16_check=check)
    write_json_atomic(manifest_path, manifest)
    return check


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifiers", nargs="+", help="classifier names whose shipped discriminator to convert")
    parser.add_argument("--n", type=int, default=256, help="images of the fixed test subset to compare on")
    parser.add_argument("--check-only", action="store_true", help="measure, do not replace the file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name in args.classifiers:
        convert(name, args.n, args.check_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
