"""Leaderboards and paper tables as a pure function of committed run records.

``leaderboards/boards.json`` lists what is rendered:

- ``kind: "board"``: a RobustBench-style board for one (dataset, threat): rank, defense, classifier, clean,
  robust (worst case over the re-classification draws; the mean too for stochastic defenses), its 95% Wilson
  interval, suite and budget, n, cost per image, and a mark with a footnote for records the integrity checks
  flagged (†) or that were made without them (‡). Records come from ``results/<board>/``.
- ``cards.md``: every registered defense's card (paper, code, weights' provenance, differences), linked from the
  board rows; it reads the cards from ``defenses/``, the one input that is not a file under ``leaderboards/``.
- ``kind: "paper"``: one table of a seed paper (numbers in ``papers/<paper>.json``) in the paper's shape, with
  our measurements beside the paper's where records exist (``measured (paper)``).

A record is accepted only if it validates against the record schema and its subset hash, dataset and threat
match the board (numbers from different images never share a table). Rendering sorts its inputs and writes no
dates, so rendering twice gives byte-identical files. ``bench leaderboard`` writes every file; ``bench check``
compares them with what is committed.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from tabulate import tabulate

from attacks.base import format_eps
from attacks.suite import BUDGET_ALIASES
from bench.core.errors import BenchError
from bench.core.record import configuration_key, validate_record
from bench.reports.compare import compare_records

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent  # shipped checkpoints named in records are relative to it
PAPERS = ROOT / "papers"
TEMPLATES = ROOT / "templates"
BUDGET_ORDER = ("smoke", "cpu", "full")
PAPER_NAMES = {"atop": "AToP", "aid-purifier": "AID-Purifier", "jatp": "JATP"}


@dataclass(frozen=True)
class Board:
    name: str
    kind: str  # "board" or "paper"
    title: str = ""
    dataset: Optional[str] = None
    threat: Optional[Dict[str, Any]] = None
    results: Optional[str] = None  # folder of records, relative to leaderboards/
    subset_hash: Optional[str] = None  # pinned: every record must come from this subset
    check: Optional[Dict[str, Any]] = None  # entries ``bench check`` reruns, with their tolerance
    paper: Optional[str] = None
    table: Optional[str] = None
    template: Optional[str] = None
    columns: Dict[str, str] = field(default_factory=dict)  # paper column -> attack key in our records
    group_by: Optional[str] = None
    # measured-only columns after the paper's (header -> attack key), e.g. the paper's own protocol where the paper
    # prints no separate column for it (PROTOCOL rule 9); shown when some record measures them
    also: Dict[str, str] = field(default_factory=dict)
    # records kept on another board that measure this table too (glob patterns relative to leaderboards/, e.g. one
    # AutoAttack-rand run of `atop` serves AToP's Tables 5 and 6): shown here without a copy that could drift
    borrow: List[str] = field(default_factory=list)

    def results_dir(self, root: Path = ROOT) -> Optional[Path]:
        return root / self.results if self.results else None


def load_boards(root: Path = ROOT) -> List[Board]:
    data = json.loads((root / "boards.json").read_text())
    boards = [Board(**entry) for entry in data["boards"]]
    names = [b.name for b in boards]
    if len(set(names)) != len(names):
        raise BenchError("leaderboards/boards.json: two boards share a name")
    return boards


def paper_table(paper: str, table: str, root: Path = ROOT) -> Dict[str, Any]:
    data = json.loads((root / "papers" / f"{paper}.json").read_text())
    found = next((t for t in data["tables"] if t["table"] == table), None)
    if found is None:
        raise BenchError(f"papers/{paper}.json has no table {table}")
    return {**found, "citation": data["citation"], "name": PAPER_NAMES.get(paper, paper)}


def load_records(board: Board, root: Path = ROOT) -> List[Dict[str, Any]]:
    """The board's records, validated: schema, one subset hash (the pinned one), the board's dataset and threat."""
    folder = board.results_dir(root)
    paths = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    for pattern in board.borrow:
        # A borrowed row may be off its own board for a while (its checkpoint replaced, the rerun not landed yet), so
        # matching nothing is allowed; a folder that does not exist is a typo.
        if not (root / Path(pattern).parent).is_dir():
            raise BenchError(f"board {board.name}: borrow pattern {pattern!r} names no folder under {root.name}/")
        found = sorted(p for p in root.glob(pattern) if p.suffix == ".json")
        paths += [p for p in found if p not in paths]
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        where = f"{path.relative_to(root.parent) if root.parent in path.parents else path}"
        try:
            validate_record(record)
        except Exception as exc:  # jsonschema.ValidationError, with its message
            raise BenchError(f"{where}: not a valid run record ({getattr(exc, 'message', exc)})") from None
        problems = accept_problems(board, record)
        if problems:
            raise BenchError(f"{where}: does not belong on board {board.name}: {'; '.join(problems)}")
        records.append(record)
    made_twice: Dict[str, List[str]] = {}
    for record in records:
        made_twice.setdefault(configuration_key(record), []).append(record["run_id"])
    for run_ids in made_twice.values():
        if len(run_ids) > 1:
            raise BenchError(f"board {board.name}: {len(run_ids)} records of one configuration (run ids "
                             f"{', '.join(r[:8] for r in run_ids)}), say one made before a code change and one after: "
                             "keep one (git rm the other)")
    hashes = {r["subset"]["hash"] for r in records}
    if len(hashes) > 1:
        raise BenchError(f"board {board.name}: records come from {len(hashes)} different subsets; a table needs one")
    return records


def accept_problems(board: Board, record: Dict[str, Any]) -> List[str]:
    problems = []
    for name in ("clean", "clean_worst", "robust", "robust_majority"):
        summary = record.get(name)
        if summary and abs(summary["correct"] / summary["n"] - summary["accuracy"]) > 1e-9:
            problems.append(f"{name} accuracy {summary['accuracy']} is not {summary['correct']}/{summary['n']} (edited by hand?)")
    floor = record.get("clean_worst")
    above = [a["label"] for a in record["attacks"]
             if floor and a.get("stage") != "correction" and a.get("robust_alone", {}).get("correct", 0) > floor["correct"]]
    if above:  # an attack's own cell above the no-attack floor: read under an older, laxer clean verdict
        problems.append(f"robust_alone of {', '.join(above)} is above the no-attack floor ({floor['correct']} of "
                        f"{floor['n']}); rerun it on the current code, which bounds each cell by the floor")
    if board.subset_hash and record["subset"]["hash"] != board.subset_hash:
        problems.append(f"subset hash {record['subset']['hash'][:12]} is not the board's {board.subset_hash[:12]}")
    if board.dataset and record["subset"]["dataset"] != board.dataset:
        problems.append(f"dataset {record['subset']['dataset']} is not {board.dataset}")
    if board.threat and (record["threat"]["norm"] != board.threat["norm"] or abs(record["threat"]["eps"] - board.threat["eps"]) > 1e-9):
        problems.append(f"threat {record['threat']['norm']} {record['threat']['eps']:.6g} is not "
                        f"{board.threat['norm']} {board.threat['eps']:.6g}")
    return problems + checkpoint_problems(record)


def _named_checkpoints(config: Any) -> List[Tuple[str, str]]:
    """(path, sha256) of every shipped checkpoint a defense config names, nested stages included."""
    found: List[Tuple[str, str]] = []
    if isinstance(config, dict):
        if config.get("checkpoint_source") == "shipped" and config.get("checkpoint") and config.get("checkpoint_sha256"):
            found.append((config["checkpoint"], config["checkpoint_sha256"]))
        for value in config.values():
            found += _named_checkpoints(value)
    elif isinstance(config, list):
        for value in config:
            found += _named_checkpoints(value)
    return found


def _current_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Once per file version (size and mtime are the key): every board's records name the same few checkpoints."""
    from bench.core.record import sha256_file

    return sha256_file(Path(path))


def checkpoint_problems(record: Dict[str, Any]) -> List[str]:
    """A record made with a shipped checkpoint describes that file only: once the checkpoint is replaced (or
    removed) the record's numbers no longer belong to what the repository ships, and it must be rerun or removed."""
    problems = []
    for name, sha in _named_checkpoints(record.get("defense", {}).get("config", {})):
        path = REPO / name
        if not path.is_file():
            problems.append(f"made with the shipped checkpoint {name}, which is no longer in the repository (rerun or "
                            "git rm the record)")
        elif _current_sha256(path) != sha:
            problems.append(f"made with {name} sha256 {sha[:12]}, but the shipped file is now {_current_sha256(path)[:12]}"
                            " (the checkpoint was replaced: rerun or git rm the record)")
    return problems


# ---------------------------------------------------------------------------------------------- formatting


def budget_name(budget: str) -> str:
    """A budget by its current name (records made before the rename say "paper" for "full")."""
    return BUDGET_ALIASES.get(budget, budget)


def pct(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def mark(record: Optional[Dict[str, Any]]) -> str:
    """† flagged unreliable by the integrity checks, ‡ made without them (``--no-checks``); § made from a working tree
    with uncommitted changes (its ``git_commit`` does not reproduce it)."""
    if record is None:
        return ""
    dirty = " §" if record.get("environment", {}).get("git_dirty") else ""
    if record.get("unreliable"):
        return " †" + dirty
    return ("" if record.get("checks", {}).get("ran") else " ‡") + dirty


def footnotes(labelled: Sequence[Tuple[str, Dict[str, Any]]]) -> List[str]:
    notes = [f"† {label} unreliable: {'; '.join(r['unreliable_reasons'])}." for label, r in labelled if r.get("unreliable")]
    unchecked = [label for label, r in labelled if mark(r).startswith(" ‡")]
    if unchecked:
        notes.append(f"‡ integrity checks not run for {', '.join(unchecked)} (record made with --no-checks).")
    dirty = [label for label, r in labelled if mark(r).endswith(" §")]
    if dirty:
        notes.append(f"§ {', '.join(dirty)}: each made from a working tree with uncommitted changes, so its git_commit "
                     "does not reproduce it; to be rerun on a clean commit.")
    identical = [label for label, r in labelled if same_as_bare(r, [x for _, x in labelled])]
    if identical:
        notes.append(f"= {', '.join(identical)}: every image's clean prediction and robust verdict equal the bare "
                     "classifier's on this board; the defense changed no outcome here (its purifier acts as the "
                     "identity), so the row measures the classifier, not the defense.")
    for label, r in labelled:
        for key in single_draw_attacks(r):
            eot = [a["robust_alone"]["accuracy"] for a in r["attacks"]
                   if "robust_alone" in a and "+eot" in a.get("label", "") and a.get("stage") != "correction"]
            notes.append(f"¶ {label}: {key} is AutoAttack standard against a stochastic defense; it takes each gradient "
                         f"from one draw of the randomness (no EOT; AutoAttack itself says to use version rand), so it "
                         f"reads {pct(per_attack(r, 'robust_alone')[key])} where the suite's EOT attacks reach "
                         f"{pct(min(eot)) if eot else '—'}; the record's worst case over every attack is "
                         f"{pct(r['robust']['accuracy'])}.")
    corrected = [f"{label} ({'; '.join(r['corrections']['actions'])})" for label, r in labelled if r.get("corrections")]
    if corrected:
        notes.append("Attack plan corrected after a failed check for " + ", ".join(corrected) + ".")
    return notes


def single_draw_attacks(record: Dict[str, Any]) -> List[str]:
    """Keys of the attacks in a stochastic defense's record that took their gradients from one draw of its randomness
    although the suite averages over draws elsewhere: AutoAttack standard (pyautoattack runs its own loop, without
    EOT). Their column reads higher than the truth; the table marks it (¶)."""
    if not record["defense"].get("stochastic"):
        return []
    return [attack_key(a) for a in record["attacks"] if a.get("attack") == "autoattack"
            and a.get("params", {}).get("version") == "standard" and "robust_alone" in a and a.get("stage") != "correction"]


def single_draw_mark(record: Optional[Dict[str, Any]], metric: Optional[str]) -> str:
    """`` ¶`` after a cell that reads an attack in ``single_draw_attacks``, on every table that shows one (paper tables,
    AToP's transform tables, each of their readings), so the mark does not depend on the template."""
    return " ¶" if record is not None and metric is not None and metric in single_draw_attacks(record) else ""


def same_as_bare(record: Dict[str, Any], records: Sequence[Dict[str, Any]]) -> bool:
    """True for a defense whose per-image outcomes (clean prediction, robust verdict) equal those of the bare
    classifier's record on the same board (same classifier, subset, threat and suite): a purifier that does nothing."""
    if record["defense"]["name"] == "none":
        return False
    for bare in records:
        if (bare["defense"]["name"] == "none" and bare["classifier"]["name"] == record["classifier"]["name"]
                and bare["subset"]["hash"] == record["subset"]["hash"] and bare["threat"] == record["threat"]
                and bare["suite"]["name"] == record["suite"]["name"]):
            mine, theirs = record.get("samples", {}), bare.get("samples", {})
            keys = ("index", "clean_pred", "robust")
            if all(k in mine and k in theirs for k in keys) and all(mine[k] == theirs[k] for k in keys):
                return True
    return False


def subset_line(records: Sequence[Dict[str, Any]]) -> str:
    s = records[0]["subset"]
    threats = ", ".join(sorted({f"{x['threat']['norm']} eps {format_eps(x['threat']['norm'], x['threat']['eps'])}" for x in records}))
    suites = sorted({f"{x['suite']['name']} v{x['suite']['version']} ({budget_name(x['suite']['budget'])})" for x in records})
    return f"{s['dataset']}, n = {s['n']} (seed {s['seed']}, subset {s['hash'][:12]}), {threats}; suites: {', '.join(suites)}"


def attack_key(attack: Dict[str, Any]) -> str:
    steps = attack["params"].get("steps")
    return f"{attack['attack']}{steps or ''}" + ("+skip" if attack.get("bpda_stages") and "pipeline" not in attack["bpda_stages"] else "")


def per_attack(record: Dict[str, Any], field_name: str, whole: bool = False) -> Dict[str, Any]:
    """Each attack's value by its key (``pgd40``) and by its label in the run (``pgd-10+bpda``, ``oblivious-mim-10``);
    ``whole``: the summary itself (accuracy, counts, ``ci95``) where the field has one."""
    out = {}
    for a in record["attacks"]:
        if a.get("stage") == "correction" or field_name not in a:
            continue
        value = a[field_name]
        out[attack_key(a)] = value["accuracy"] if isinstance(value, dict) and not whole else value
        if "label" in a:
            out.setdefault(a["label"], out[attack_key(a)])
    return out


def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined, keep_trailing_newline=True,
                       trim_blocks=True, lstrip_blocks=True)


def _table(rows: List[List[str]], headers: List[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


# -------------------------------------------------------------------------------------------------- boards


def board_rows(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per record, ranked by the headline robust accuracy (then clean accuracy, then name)."""
    rows = []
    for r in records:
        stochastic = r["defense"]["stochastic"] or r["settings"].get("success_draws", 1) > 1
        cost = sum(a["cost"]["seconds"] for a in r["attacks"]) / r["subset"]["n"]
        passes = sum(a["cost"]["forward_images"] + a["cost"]["backward_images"] for a in r["attacks"]) / r["subset"]["n"]
        rows.append({
            "record": r, "defense": card_link(r["defense"]["name"]) + mark(r), "classifier": r["classifier"]["name"],
            "clean": r["clean"]["accuracy"], "robust": r["robust"]["accuracy"], "ci": r["robust"]["ci95"],
            "floor": no_attack_floor(r), "draws": r["settings"].get("success_draws", 1) if stochastic else 1,
            "headline": r.get("headline", {}).get("accuracy", r["robust"]["accuracy"]),
            "suite": f"{r['suite']['name']} v{r['suite']['version']} {budget_name(r['suite']['budget'])}", "n": r["subset"]["n"],
            "seconds_per_image": cost, "passes_per_image": passes,
            # None where the suite stopped refining points at their verdict (rule 8: no mean from such attacks)
            "mean": r.get("robust_mean"), "majority": (r.get("robust_majority") or {}).get("accuracy"),
        })
    rows.sort(key=lambda row: (-row["headline"], -row["clean"], row["defense"], row["classifier"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def carded_defenses() -> Dict[str, Any]:
    """Every defense this repository ships (registered from the ``defenses`` package) with its card, or None where it
    has none. Plug-ins (``--plugin`` files, entry points) are left out: the generated markdown must not depend on what
    else the rendering process happened to import. A plug-in's card travels in its records."""
    from defenses.base import DEFENSES, card_of

    shipped = {name: DEFENSES.get(name) for name in DEFENSES.names()}
    return {name: card_of(obj) for name, obj in shipped.items()
            if (getattr(obj, "__module__", "") or "").startswith("defenses.")}


def card_link(name: str) -> str:
    """A defense's name on a board, linked to its card where it has one."""
    return f"[{name}](cards.md#{name})" if carded_defenses().get(name) is not None else name


def render_cards() -> str:
    cards = []
    for name, card in sorted(carded_defenses().items()):
        venue = "—"
        if card is not None and card.venue:
            venue = card.venue if not card.year or str(card.year) in card.venue else f"{card.venue} {card.year}"
        cards.append({"name": name, "card": card, "venue": venue})
    return _env().get_template("cards.md.j2").render(cards=cards)


def what_it_is(record: Dict[str, Any]) -> str:
    """The bare classifier rows say what kind of classifier they are: an adversarially trained one is no purifier. A
    defense whose attacker gradient route is an option (DiffPure's ``gradient``) says which route the record used."""
    if record["defense"]["name"] != "none":
        route = record["defense"].get("config", {}).get("gradient")
        return f" (gradient route: {route})" if route else ""
    info = record["classifier"]
    if info.get("training") in (None, "standard"):
        return " (bare, standard training)"
    eps = info.get("train_eps")
    return f" (bare, adversarially trained: {info['training']}" + (f" {format_eps('linf', eps)})" if eps else ")")


def versus_bare(row: Dict[str, Any], bare: Dict[str, Dict[str, Any]]) -> str:
    """Clean and robust accuracy against the bare classifier's on the same board, in points."""
    ref = bare.get(row["classifier"])
    if ref is None or row["record"]["defense"]["name"] == "none":
        return "—"
    return f"{100 * (row['clean'] - ref['clean']):+.1f} / {100 * (row['robust'] - ref['robust']):+.1f}"


def shows_means(rows: Sequence[Dict[str, Any]]) -> bool:
    """A board shows the mean over the draws and the majority vote when a stochastic row has them, i.e. when one of
    its records ran every attack to completion (PROTOCOL rule 8); for deterministic rows they equal the worst case."""
    return any(r["draws"] > 1 and r["mean"] is not None for r in rows)


def render_board(board: Board, records: Sequence[Dict[str, Any]]) -> str:
    rows = board_rows(records)
    bare = {r["classifier"]: r for r in rows if r["record"]["defense"]["name"] == "none"}
    means = shows_means(rows)
    table = _table([[str(r["rank"]), r["defense"] + what_it_is(r["record"]), r["classifier"], pct(r["clean"]),
                     pct(r["floor"]) + (f" ({r['draws']} draws)" if r["draws"] > 1 else ""), pct(r["robust"]),
                     f"[{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"]
                    + ([pct(r["mean"]), pct(r["majority"])] if means else [])
                    + [versus_bare(r, bare), r["suite"], str(r["n"]),
                       f"{r['seconds_per_image']:.2f}", f"{r['passes_per_image']:.0f}"] for r in rows],
                   ["rank", "defense", "classifier", "clean % (one draw)", "no attack % (every draw right)",
                    "robust % (worst case)", "95% CI"]
                   + (["robust % (mean of draws)", "robust % (majority vote)"] if means else [])
                   + ["vs bare classifier (clean / robust, points)", "suite", "n",
                      "attack s / image", "image-passes / image"])
    labelled = [(f"{r['record']['defense']['name']} on {r['record']['classifier']['name']}", r["record"]) for r in rows]
    return _env().get_template("board.md.j2").render(
        board=board, table=table, setting=subset_line(records) if records else None, notes=footnotes(labelled),
        png=f"{board.name}.png" if records else None, means=means)


def plot_board(board: Board, records: Sequence[Dict[str, Any]]) -> Optional[bytes]:
    """PNG: robust accuracy (worst case) with its 95% interval per entry, and the probes' eps sweep where recorded."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board_rows(records)
    sweeps = [(r, r["record"]["checks"].get("eps_sweep")) for r in rows if r["record"].get("checks", {}).get("eps_sweep")]
    fig, axes = plt.subplots(1, 2 if sweeps else 1, figsize=(11 if sweeps else 6, max(3.5, 0.5 * len(rows) + 2)), squeeze=False)
    ax = axes[0][0]
    labels = [f"{r['defense']} / {r['classifier']}" for r in rows][::-1]
    values = [100 * r["robust"] for r in rows][::-1]
    low = [100 * (r["robust"] - r["ci"][0]) for r in rows][::-1]
    high = [100 * (r["ci"][1] - r["robust"]) for r in rows][::-1]
    ax.barh(range(len(rows)), values, xerr=[low, high], color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("robust accuracy, worst case (%) with 95% interval")
    ax.set_xlim(0, 100)
    ax.set_title(board.title, fontsize=9)
    if sweeps:
        ax2 = axes[0][1]
        norm = records[0]["threat"]["norm"]
        scale = 255 if norm == "linf" else 1
        for row, sweep in sweeps:
            eps = sorted(sweep, key=float)
            ax2.plot([scale * float(e) for e in eps], [100 * sweep[e] for e in eps], marker="o", label=f"{row['defense']} / {row['classifier']}")
        ax2.set_xlabel(f"{norm} eps" + (" (x/255)" if norm == "linf" else ""))
        ax2.set_ylabel(f"accuracy (%) under the {'PGD' if norm != 'stadv' else 'StAdv'}-10 probe")
        ax2.set_title("integrity probe: accuracy vs eps (probe points only)", fontsize=9)
        ax2.set_ylim(0, 100)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def no_attack_summary(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The clean summary under the verdict rule (every re-classification draw right; accuracy, counts, ``ci95``):
    the one-draw clean summary for a deterministic defense; None for an older stochastic record without it."""
    if "clean_worst" in record:
        return record["clean_worst"]
    stochastic = record["defense"].get("stochastic", True) or record.get("settings", {}).get("success_draws", 1) > 1
    return None if stochastic else record["clean"]


def no_attack_floor(record: Dict[str, Any]) -> Optional[float]:
    """Clean accuracy under the verdict rule (``no_attack_summary``): the most a robust accuracy can be."""
    summary = no_attack_summary(record)
    return None if summary is None else summary["accuracy"]


def clean_majority(record: Dict[str, Any]) -> Optional[float]:
    """Clean accuracy of a majority vote over the re-classification draws (from the record's per-point counts)."""
    counts = record.get("samples", {}).get("clean_draws_right")
    if counts is None:
        return None
    draws = record["settings"].get("success_draws", 1)
    return sum(c * 2 > draws for c in counts) / len(counts)


# ------------------------------------------------------------------------------------------- paper tables


def _cell(measured: Optional[float], paper: Optional[float]) -> str:
    left = "—" if measured is None else f"{measured:.1f}"
    return left if paper is None else f"{left} ({paper:.1f})"


#: The three readings of a stochastic defense's table: (per-attack field, what it is, the clean accuracy read the same
#: way, whether the no-attack floor gets its own column).
VARIANTS = (
    ("robust_alone", "worst case: broken if any re-classification draw is wrong; clean = one draw, no attack = every "
                     "draw right on the clean image (the floor of this reading)", lambda r: r["clean"]["accuracy"], True),
    ("robust_alone_mean", "mean over the re-classification draws (attacks run to completion); clean = mean over as "
                          "many draws", lambda r: r.get("clean_mean"), False),
    ("robust_alone_majority", "majority vote over the re-classification draws (attacks run to completion); clean = "
                              "majority vote over as many draws", clean_majority, False),
)


def transform_rows(board: Board, table: Dict[str, Any], records: Sequence[Dict[str, Any]], field_name: str,
                   clean_of=lambda r: r["clean"]["accuracy"], floor: bool = False):
    """AToP's transform x {pre-trained, fine-tuned} shape (Tables 7, 8, 9): rows, headers, labelled records, and for
    the worst-case reading (``robust_alone``) the 95% intervals of its cells in the same shape (empty otherwise).
    ``clean_of`` reads a record's clean accuracy the way ``field_name`` reads robust accuracy; ``floor`` adds the
    no-attack column (clean accuracy with every draw right)."""
    paper_rows = {(row["transform"], row["atop"]): dict(zip(table["columns"], row["values"])) for row in table["rows"]}
    ours, bare = {}, None
    for record in records:
        name = record["defense"]["name"]
        if name == "none":
            bare = record
        elif name.startswith("atop"):
            config = record["defense"]["config"]
            ours[(config["transform"], config["stage"] == "finetune")] = record
        else:
            raise BenchError(f"{name}: not an AToP record, cannot go in {board.name}")
    columns = [c for c in table["columns"] if c != "clean"]
    skipped = [c for c in columns if any(f"{board.columns.get(c)}+skip" in per_attack(r, field_name) for r in records)]
    also = [c for c, key in board.also.items() if any(key in per_attack(r, field_name) for r in records)]
    # each paper column, then beside it the same attack with the purifier skipped (the paper's BPDA protocol), then
    # the board's other readings: (header, the attack it reads, the paper's column or None)
    layout = [entry for c in columns for entry in [(c, board.columns.get(c, ""), c)]
              + ([(f"{c}, purifier skipped", f"{board.columns[c]}+skip", None)] if c in skipped else [])]
    layout += [(c, board.also[c], None) for c in also]
    keys = [key for _, key, _ in layout]  # the attack each column reads, in column order
    rows: List[List[str]] = []
    intervals: List[List[str]] = []  # the worst-case reading's cells as counts of images: their 95% intervals

    def interval_row(label: str, atop: str, record: Optional[Dict[str, Any]]) -> List[str]:
        if record is None:
            return [label, atop, *["—"] * (1 + int(floor) + len(keys))]
        floor_ci = (no_attack_summary(record) or {}).get("ci95")
        by_key = per_attack(record, field_name, whole=True)
        return [label, atop, interval_cell(record["clean"].get("ci95")), *([interval_cell(floor_ci)] if floor else []),
                *(interval_cell(by_key[k].get("ci95") if isinstance(by_key.get(k), dict) else None) for k in keys)]

    if bare is not None:  # the bare classifier on the same images (PROTOCOL rule 8); the paper has no such row
        measured = {k: 100 * v for k, v in per_attack(bare, field_name).items()}
        bare_floor = no_attack_floor(bare)
        rows.append(["none (bare classifier)" + mark(bare), "", _cell(100 * bare["clean"]["accuracy"], None),
                     *([_cell(None if bare_floor is None else 100 * bare_floor, None)] if floor else []),
                     *(_cell(measured.get(key), None) + single_draw_mark(bare, key) for key in keys)])
        intervals.append(interval_row("none (bare classifier)", "", bare))
    for transform in ("rt1", "rt2", "rt3"):
        for atop in (False, True):
            record, theirs = ours.get((transform, atop)), paper_rows[(transform, atop)]
            measured = {k: 100 * v for k, v in per_attack(record, field_name).items()} if record else {}
            clean = clean_of(record) if record else None
            no_attack = no_attack_floor(record) if record else None
            rows.append([transform.upper() + mark(record), "✓" if atop else "✗",
                         _cell(None if clean is None else 100 * clean, theirs["clean"]),
                         *([_cell(None if no_attack is None else 100 * no_attack, None)] if floor else []),
                         *(_cell(measured.get(key), None if column is None else theirs[column])
                           + single_draw_mark(record, key) for _, key, column in layout)])
            intervals.append(interval_row(transform.upper(), "✓" if atop else "✗", record))
    headers = ["transform", "AToP", "clean", *(["no attack"] if floor else []), *(header for header, _, _ in layout)]
    labelled = ([("none", bare)] if bare is not None else []) + [
        (f"{t.upper()} {'✓' if a else '✗'}", ours[(t, a)]) for t in ("rt1", "rt2", "rt3") for a in (False, True) if (t, a) in ours]
    if field_name != "robust_alone" or not records:
        intervals = []
    return rows, headers, labelled, intervals


def _paired_cell(row: Dict[str, Any]) -> str:
    return f"{100 * (row['a'] - row['b']):+.1f} ({row['only_a']} / {row['only_b']}, p {row['mcnemar_p']:.2g})"


def fine_tuning_rows(records: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """The paper's claim, per transform: the fine-tuned (✓) and pre-trained (✗) records paired by image
    (``bench compare``): the difference in points, the images right only with and only without fine-tuning, and
    the exact McNemar p-value, per outcome; the mean over the draws as a paired difference with its interval."""
    ours = {}
    for record in records:
        config = record["defense"].get("config", {})
        if record["defense"]["name"].startswith("atop") and "transform" in config:
            ours[(config["transform"], config["stage"] == "finetune")] = record
    rows = []
    for transform in ("rt1", "rt2", "rt3"):
        if (transform, True) not in ours or (transform, False) not in ours:
            continue
        if not all("index" in ours[(transform, atop)].get("samples", {}) for atop in (True, False)):
            continue  # no per-image outcomes to pair
        c = compare_records(ours[(transform, True)], ours[(transform, False)])
        by = {r["outcome"].split(",")[0] if r["outcome"].startswith("clean") else r["outcome"]: r for r in c["paired"]}
        m = c["mean"]
        mean = "—" if m is None else (f"{100 * m['difference']:+.1f} [{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}] "
                                       f"(p {m['p']:.2g})")
        rows.append([transform.upper(), str(c["n"]),
                     *(_paired_cell(by[k]) if k in by else "—" for k in PAIRED_OUTCOMES), mean])
    return rows


#: The per-image outcomes the fine-tuning table pairs (bench.reports.compare's names), in column order.
PAIRED_OUTCOMES = ("clean", "no-attack floor (every draw right)", "robust, worst case over the suite",
                   "robust, majority vote over the draws")
FINE_TUNING_HEADERS = ["transform", "images", "clean, one draw", "no attack (every draw right)",
                       "worst case over the suite", "majority vote over the draws", "mean over the draws [95% CI]"]


def render_paper(board: Board, records: Sequence[Dict[str, Any]], root: Path = ROOT) -> str:
    if len({r["subset"]["hash"] for r in records}) > 1:
        raise BenchError(f"board {board.name}: records come from different subsets; a table needs one")
    table = paper_table(board.paper, board.table, root)
    env = _env()
    if board.template == "atop_transform.md.j2":
        variants = []
        for field_name, what, clean_of, floor in VARIANTS[: 3 if records else 1]:
            rows, headers, labelled, intervals = transform_rows(board, table, records, field_name, clean_of, floor)
            variants.append({"what": what, "table": _table(rows, headers), "notes": footnotes(labelled),
                             "intervals": _table(intervals, headers) if intervals else None})
        paired = fine_tuning_rows(records)
        return env.get_template(board.template).render(
            board=board, paper=table, variants=variants, setting=subset_line(records) if records else None, records=records,
            fine_tuning=_table(paired, FINE_TUNING_HEADERS) if paired else None)
    key_names = [k for k in table["row_keys"] if k != board.group_by]
    groups: Dict[str, List[List[str]]] = {}
    for row in table["rows"]:
        label = row.get("label") or " / ".join(str(row[k]) for k in key_names)
        cells = [label, *(str(row[k]) for k in key_names if k not in ("method", "defense", "purifier") and row.get("label")),
                 *("—" if v is None else f"{v:.2f}" for v in row["values"])]
        groups.setdefault(str(row[board.group_by]) if board.group_by else "", []).append(cells)
    extra = [k for k in key_names if k not in ("method", "defense", "purifier")] if any(r.get("label") for r in table["rows"]) else []
    headers = ["row", *extra, *table["columns"]]
    measured, intervals = [], []  # our records, one row each, in the paper's columns (board.columns: paper column -> metric)
    several_threats = len({(r["threat"]["norm"], r["threat"]["eps"]) for r in records}) > 1  # then each row names its own
    for record in sorted(records, key=lambda r: (r["defense"]["name"], r["classifier"]["name"], r["suite"]["name"])):
        metrics = [board.columns.get(column) for column in table["columns"]]
        cells = [pct(metric_value(record, m)) + single_draw_mark(record, m) for m in metrics]
        label = f"{record['defense']['name']} on {record['classifier']['name']}{trained_with(record)}{mark(record)}"
        suite = f"{record['suite']['name']} v{record['suite']['version']} ({budget_name(record['suite']['budget'])})"
        if several_threats:
            suite += f", {record['threat']['norm']} {format_eps(record['threat']['norm'], record['threat']['eps'])}"
        measured.append([label, suite, pct(no_attack_floor(record)), *cells])
        intervals.append([label, *(interval_cell(metric_interval(record, m)) for m in metrics)])
    measured_table = _table(measured, ["measured", "suite", "no attack (every draw right)", *table["columns"]]) if measured else None
    interval_table = _table(intervals, ["measured", *table["columns"]]) if measured else None
    labelled = [(f"{r['defense']['name']} on {r['classifier']['name']}{trained_with(r)}", r) for r in records]
    return env.get_template(board.template).render(
        board=board, paper=table, groups=[{"name": name, "table": _table(rows, headers)} for name, rows in groups.items()],
        measured=measured_table, intervals=interval_table, setting=subset_line(records) if records else None,
        notes=footnotes(labelled))


def trained_with(record: Dict[str, Any]) -> str:
    """`` (trained with X)`` for a learned purifier evaluated in front of another classifier than its own, and
    `` (initialised from R/C)`` for one whose training started from another purifier's weights."""
    config = record["defense"].get("config", {})
    note = f" (trained with {config['trained_with']})" if config.get("cross_model") else ""
    init = ((config.get("training") or {}).get("settings") or {}).get("init")
    if init:
        path = Path(init)
        note += f" (initialised from {path.parent.parent.name}/{path.parent.name})"
    return note


def metric_value(record: Dict[str, Any], metric: Optional[str]) -> Optional[float]:
    """``clean``, ``robust`` (worst case), ``robust@<norm>`` or ``robust@<norm>:<eps>`` (worst case, only for a record
    of that threat, and of that radius when given, e.g. ``robust@l2:0.5``, ``robust@linf:8/255``),
    ``robust_mean``, an attack key or label (its own accuracy in an independent suite), or ``min:a,b,...`` (the
    lowest of those the record measures: an attack exact or under BPDA, or a table's Worst column); None when the
    record does not measure it."""
    if metric is None:
        return None
    if metric.startswith("min:"):
        values = [v for v in (metric_value(record, m) for m in metric[4:].split(",")) if v is not None]
        return min(values) if values else None
    if metric.startswith("robust@"):  # robust@l2, or robust@l2:0.5 for that radius only (a table's eps)
        norm, _, eps = metric.split("@", 1)[1].partition(":")
        threat = record["threat"]
        if threat["norm"] != norm or (eps and abs(threat["eps"] - float(Fraction(eps))) > 1e-9):
            return None
        return record["robust"]["accuracy"]
    if metric in ("clean", "robust"):
        return record[metric]["accuracy"]
    if metric == "robust_mean":  # absent where the attacks stopped at the verdict: no number rather than another one
        return record.get("robust_mean", None if "mean_omitted" in record else record["robust"]["accuracy"])
    return per_attack(record, "robust_alone").get(metric)


def metric_interval(record: Dict[str, Any], metric: Optional[str]) -> Optional[Tuple[float, float]]:
    """The 95% interval (Wilson score, as the record stores it) of ``metric_value(record, metric)``: of the lowest
    metric for ``min:``; None where the value is not a count of images (``robust_mean``) or is not measured."""
    if metric is None or metric_value(record, metric) is None:
        return None
    if metric.startswith("min:"):
        measured = [(metric_value(record, m), m) for m in metric[4:].split(",")]
        return metric_interval(record, min((v, m) for v, m in measured if v is not None)[1])
    if metric.startswith("robust@") or metric in ("clean", "robust"):
        ci = record["robust" if metric.startswith("robust") else "clean"].get("ci95")
        return None if ci is None else tuple(ci)
    summary = per_attack(record, "robust_alone", whole=True).get(metric)
    return tuple(summary["ci95"]) if isinstance(summary, dict) and "ci95" in summary else None


def interval_cell(ci: Optional[Sequence[float]]) -> str:
    return "—" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


# ------------------------------------------------------------------------------------------------- all files


def render_all(root: Path = ROOT, pictures: bool = True) -> Dict[str, bytes]:
    """Every generated file under ``root`` (relative path -> content): boards, paper tables, PNGs (unless
    ``pictures`` is False), the index."""
    boards = load_boards(root)
    files: Dict[str, bytes] = {}
    entries = []
    for board in boards:
        records = load_records(board, root)
        if board.kind == "board":
            files[f"{board.name}.md"] = render_board(board, records).encode()
            png = plot_board(board, records) if pictures else None
            if png is not None:
                files[f"{board.name}.png"] = png
        elif board.kind == "paper":
            files[f"{board.name}.md"] = render_paper(board, records, root).encode()
        else:
            raise BenchError(f"board {board.name}: unknown kind {board.kind!r}")
        entries.append({"board": board, "records": len(records), "file": f"{board.name}.md",
                        "title": board.title or paper_table(board.paper, board.table, root)["caption"]})
    files["cards.md"] = render_cards().encode()
    files["README.md"] = _env().get_template("index.md.j2").render(entries=entries).encode()
    return files


def write_all(root: Path = ROOT) -> List[str]:
    """Write every generated file; return the ones whose content changed."""
    changed = []
    for name, content in render_all(root).items():
        path = root / name
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(name)
    return changed


def stale_files(root: Path = ROOT) -> List[str]:
    """Generated markdown that differs from what the records and templates give now (PNGs are not compared:
    their bytes depend on the matplotlib build)."""
    return [name for name, content in render_all(root, pictures=False).items()
            if name.endswith(".md") and (not (root / name).is_file() or (root / name).read_bytes() != content)]
