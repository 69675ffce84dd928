"""Run records as RobustBench ``model_info`` entries (``bench export robustbench RECORD... --out DIR``).

RobustBench's leaderboards read one JSON file per model under ``model_info/<dataset>/<threat model>/<Name>.json``
with the fields of ``robustbench.utils.ModelInfo`` plus ``external`` (a robust accuracy from an evaluation stronger
than AutoAttack, which its tables prefer when present) and ``unreliable``. Accuracies are percentages written as
strings with two decimals, ``eps`` as people write it (``"8/255"``).

What a record maps to, and what it cannot give:

- ``autoattack_acc`` only for a record of the AutoAttack reference suites; any other suite's robust accuracy (the
  worst case under our verdict rule) goes to ``external``, and the footnote names the suite, its budget, n and the
  subset. Nothing here claims an AutoAttack number the run did not measure.
- ``dataset`` stays our dataset's name: ``cifar10-jpeg`` is not RobustBench's ``cifar10`` (the JPEG copy costs
  standard models about 10 points of clean accuracy), so its tooling refuses the entry rather than ranking it.
- ``reported`` (the paper's own number for this model) is never filled: our purifiers are not the papers' models.
- ``unreliable`` is true when the integrity checks flagged the record or did not run (unverified).
- The paper fields come from the record's defense card; a record older than cards takes the card in the registry
  at export time, and the export says so. A plug-in without a card leaves them empty, and the export says so.

Every file lists what it could not fill under ``_bench.unfilled`` beside the run id and commit it came from, and the
command prints the same. RobustBench ignores keys it does not know.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attacks.base import format_eps
from bench.core.errors import BenchError
from bench.core.record import validate_record, write_json_atomic

#: The fields RobustBench's ``ModelInfo`` dataclass declares for Linf/L2 entries, plus the two its leaderboard code
#: reads from the JSON (``external``, ``unreliable``). ``tests/test_export.py`` compares this with robustbench's.
MODEL_INFO_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                     "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote")
LEADERBOARD_FIELDS = ("external", "unreliable")
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench has no StAdv threat model
AUTOATTACK_SUITES = ("autoattack", "autoattack-rand")
PERCENT_FIELDS = ("clean_acc", "reported", "autoattack_acc", "external")


def _pct(accuracy: float) -> str:
    return f"{100 * accuracy:.2f}"


def _architecture(record: Dict[str, Any]) -> str:
    """``resnet20`` -> ``ResNet-20``; a purifier in front is named (``ResNet-20 + atop purifier``)."""
    arch = record["classifier"]["architecture"]
    match = re.fullmatch(r"resnet(\d+)(\w*)", arch)
    pretty = f"ResNet-{match.group(1)}{match.group(2)}" if match else arch
    defense = record["defense"]["name"]
    return pretty if defense == "none" else f"{pretty} + {defense} purifier"


def _model_name(record: Dict[str, Any], card: Optional[Dict[str, Any]]) -> str:
    """RobustBench's id style, ``<Surname><Year><FirstTitleWord>``, then our defense and classifier."""
    defense, classifier = record["defense"]["name"], record["classifier"]["name"]
    suffix = "_".join(re.sub(r"[^A-Za-z0-9+.-]+", "-", part) for part in (defense, classifier))
    if not card or not card.get("authors") or not card.get("year"):
        return f"bench_{suffix}"
    surname = re.sub(r"[^A-Za-z]", "", card["authors"].split(",")[0].split()[-1])
    first_word = re.sub(r"[^A-Za-z]", "", card["title"].split()[0]).capitalize()
    return f"{surname}{card['year']}{first_word}_{suffix}"


def _card(record: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """The record's card, or the registry's for a record made before cards (said in the notes)."""
    card = record["defense"].get("card")
    if card is not None:
        return (None, ["paper fields: the defense has no card"]) if "missing" in card else (card, [])
    from defenses.base import DEFENSES, card_of

    try:
        current = card_of(DEFENSES.get(record["defense"]["name"]))
    except BenchError:
        current = None
    if current is None:
        return None, ["paper fields: the record predates defense cards and no registered defense has this name"]
    return current.to_dict(), ["paper fields: the record predates defense cards; the card was taken from the registry "
                               "at export time"]


def _footnote(record: Dict[str, Any], autoattack: bool) -> str:
    suite, subset, threat = record["suite"], record["subset"], record["threat"]
    draws = record["settings"].get("success_draws", 1)
    parts = [f"Measured by the purification benchmark (run {record['run_id']}, commit "
             f"{str(record['environment'].get('git_commit'))[:12]}): suite {suite['name']} v{suite['version']} "
             f"({suite['budget']} budget) on {subset['n']} images of {subset['dataset']} ({subset['split']}, subset "
             f"{subset['hash'][:12]}), not RobustBench's 10,000 test images."]
    if not autoattack:
        parts.append("The robust accuracy is the adaptive suite's per-image worst case, not an AutoAttack number.")
    if draws > 1:
        parts.append(f"Stochastic defense: a point counts as robust only if all {draws} re-classification draws are "
                     "right (the no-attack floor under that rule is "
                     f"{_pct(record['clean_worst']['accuracy'])}%).")
    if subset["dataset"] != "cifar10":
        parts.append(f"Dataset {subset['dataset']}: not directly comparable with RobustBench's cifar10 entries.")
    if record.get("unreliable"):
        parts.append("Integrity checks flagged this record: " + "; ".join(record.get("unreliable_reasons", [])) + ".")
    elif not record.get("checks", {}).get("ran", False):
        parts.append("Made without the integrity checks (unverified).")
    return " ".join(parts)


def model_info(record: Dict[str, Any]) -> Tuple[Path, Dict[str, Any], List[str]]:
    """(relative path ``<dataset>/<threat model>/<Name>.json``, entry, what could not be filled) for one record."""
    norm = record["threat"]["norm"]
    if norm not in THREAT_MODELS:
        raise BenchError(f"run {record['run_id']}: RobustBench has no {norm} threat model (only Linf and L2)")
    card, unfilled = _card(record)
    autoattack = record["suite"]["name"] in AUTOATTACK_SUITES
    flagged = bool(record.get("unreliable")) or not record.get("checks", {}).get("ran", False)
    none = record["defense"]["name"] == "none"
    entry: Dict[str, Any] = {
        "link": (card or {}).get("paper") or "",
        "name": (f"{record['classifier']['name']} without a defense" if none else (card or {}).get("title", "")),
        "authors": (card or {}).get("authors", ""),
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": record["subset"]["dataset"],
        "venue": "N/A" if none or not card else (card["venue"] if not card.get("year") or str(card["year"]) in
                                                   card["venue"] else f"{card['venue']} {card['year']}"),
        "architecture": _architecture(record),
        "eps": format_eps(norm, record["threat"]["eps"]),
        "clean_acc": _pct(record["clean"]["accuracy"]),
        "footnote": _footnote(record, autoattack),
        "unreliable": flagged,
    }
    entry["autoattack_acc" if autoattack else "external"] = _pct(record["robust"]["accuracy"])
    if not autoattack:
        unfilled.append(f"autoattack_acc: the record's suite is {record['suite']['name']}, not AutoAttack; its robust "
                        "accuracy is in external")
    unfilled.append("reported: the paper's number is for the paper's model, not this one")
    if card is None:
        unfilled.append("additional_data: assumed false (a plug-in does not declare its training data)")
    if record["subset"]["dataset"] != "cifar10":
        unfilled.append(f"dataset: {record['subset']['dataset']} is no RobustBench dataset; kept so that the entry is "
                        "never ranked among cifar10 results")
    entry["_bench"] = {"run_id": record["run_id"], "git_commit": record["environment"].get("git_commit"),
                       "unfilled": unfilled}
    name = _model_name(record, None if none else card)
    return Path(record["subset"]["dataset"], THREAT_MODELS[norm], f"{name}.json"), entry, unfilled


def check_entry(entry: Dict[str, Any]) -> None:
    """Raise if ``entry`` has a field RobustBench does not read or a value of the wrong form."""
    unknown = set(entry) - set(MODEL_INFO_FIELDS) - set(LEADERBOARD_FIELDS) - {"_bench"}
    if unknown:
        raise BenchError(f"fields RobustBench does not read: {sorted(unknown)}")
    for key in PERCENT_FIELDS:
        if key in entry and not re.fullmatch(r"\d{1,3}\.\d{2}", entry[key]):
            raise BenchError(f"{key} must be a percentage string with two decimals, not {entry[key]!r}")
    if not ("autoattack_acc" in entry or "external" in entry):
        raise BenchError("an entry needs autoattack_acc or external")
    if not re.fullmatch(r"\d+/255|\d+(\.\d+)?", entry["eps"]):
        raise BenchError(f"eps {entry['eps']!r} is not written as RobustBench writes it")


def export_robustbench(paths: Sequence[Path], out: Path) -> List[Tuple[Path, List[str]]]:
    """Write one ``model_info`` file per record under ``out``; return (file, what could not be filled) for each."""
    files: List[Path] = []
    for path in paths:
        files.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    if not files:
        raise BenchError("no records given")
    written = []
    for path in files:
        record = json.loads(path.read_text())
        try:
            validate_record(record)
        except Exception as exc:
            raise BenchError(f"{path}: not a valid run record ({getattr(exc, 'message', exc)})") from None
        relative, entry, unfilled = model_info(record)
        check_entry(entry)
        target = out / relative
        if target in (w for w, _ in written):
            raise BenchError(f"two records export to {target.name}; export them into separate folders")
        write_json_atomic(target, entry)
        written.append((target, unfilled))
    return written
