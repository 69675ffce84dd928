"""``bench sweep GRID.toml``: a grid of ``bench run`` cells, each executed as a Ray task.

A grid file (TOML, read with the standard library's ``tomllib``)::

    name = "cifar10-jpeg-linf"                 # names the sweep's manifest; default: the file's stem
    out = "runs/sweeps/cifar10-jpeg-linf"      # one folder for every cell's record (default runs/sweeps/<name>)
    replace = false                             # true: a cell's record replaces its configuration's older records
    plugins = []                                # files imported first, as --plugin

    [fixed]                                     # bench run flags every cell gets (key = flag without --)
    threat = "linf"
    n = 512

    [[grid]]                                    # one product of axes; several [[grid]] blocks are joined
    defense = ["atop", "atop-rt1-gan-ft"]
    classifier = ["resnet20"]
    eps = ["2/255", "8/255"]

A key is a ``bench run`` flag with ``_`` or ``-`` (``batch_size``, ``defense-option``); ``true`` gives a switch
(``channels_last = true``) and ``checks = false`` gives ``--no-checks``; a list under ``[fixed]`` repeats the flag
(``defense_option = ["steps=5"]``), a list under ``[[grid]]`` is an axis. Every cell is parsed by ``bench run``'s own
parser when the grid is loaded, so a typo fails before anything runs.

Execution: a local Ray instance started for the sweep (offline, nothing to configure), or ``--address`` to join an
existing cluster (a Slurm or Kubernetes deployment of Ray needs nothing more). Each cell is one task asking for
``--cpus-per-cell`` CPUs (its torch threads) and ``--gpus-per-cell`` GPUs. Before Ray starts, every cell is planned
(its run id and record path, which loads its defense and subset): cells whose record already exists are skipped, so
a second invocation runs nothing. A task that raises is retried up to ``--retries`` times and its last error is kept;
a user error (``BenchError``: missing weights, bad option) fails the cell at once; a killed worker's task is retried
by Ray and resumes from the run's state folder (``<out>/.state/``), the same way a killed ``bench run`` does. Two
tasks of one run id never interleave: the run's lock serialises them.

While it runs, a status line (done / running / failed, elapsed, ETA); at the end a table of every cell and the
manifest ``<out>/.sweep/<name>.json`` (cell arguments, status, attempts, record file or error).

A grid whose ``out`` is a board's results folder regenerates the board: with ``replace = true`` each cell's record
takes the place of records of the same configuration made by older code (another run id), so the board keeps one row
per configuration (``bench leaderboard`` refuses two).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.core.errors import BenchError
from bench.core.record import write_json_atomic

log = logging.getLogger(__name__)

GRID_KEYS = {"name", "out", "replace", "plugins", "fixed", "grid", "axes"}
ENV_PREFIXES = ("BENCH_", "OMP_", "MKL_")  # passed to the tasks, so that a cluster's workers see the same folders


@dataclass(frozen=True)
class Cell:
    """One ``bench run``: its arguments (without ``--out``) and the axis values that made it."""

    index: int
    values: Tuple[Tuple[str, Any], ...]
    args: Tuple[str, ...]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values) or "(fixed settings)"


@dataclass(frozen=True)
class Grid:
    name: str
    out: Path
    plugins: Tuple[str, ...]
    cells: Tuple[Cell, ...]
    replace: bool = False  # a cell's new record supersedes records of its configuration made by older code


def flag_args(key: str, value: Any) -> List[str]:
    """A grid key and value as ``bench run`` arguments."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if key in ("checks",):
            return [] if value else ["--no-checks"]
        return [flag] if value else []
    if isinstance(value, list):
        return [arg for item in value for arg in flag_args(key, item)]
    return [flag, str(value)]


def _axes(block: Dict[str, Any], where: str) -> List[Tuple[str, List[Any]]]:
    if not isinstance(block, dict) or not block:
        raise BenchError(f"{where}: a grid block is a table of axes, e.g. defense = [\"none\", \"atop\"]")
    return [(key, value if isinstance(value, list) else [value]) for key, value in block.items()]


def load_grid(path: Path, out: Optional[Path] = None) -> Grid:
    """Read and check a grid file; every cell is parsed by ``bench run``'s parser."""
    from bench.cli import parse_run_args

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise BenchError(f"cannot read grid {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"grid {path} is not valid TOML: {exc}") from None
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise BenchError(f"grid {path}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(GRID_KEYS))})")
    name = str(data.get("name", Path(path).stem))
    fixed = data.get("fixed", {})
    if "out" in fixed:
        raise BenchError(f"grid {path}: give the records' folder as the top-level out, not in [fixed]")
    blocks = list(data.get("grid", [])) + ([data["axes"]] if "axes" in data else [])
    if not blocks:
        blocks = [{}]
    plugins = tuple(str(p) for p in data.get("plugins", []))
    fixed_args = [arg for key, value in fixed.items() for arg in flag_args(key, value)]
    plugin_args = [arg for plugin in plugins for arg in ("--plugin", plugin)]
    cells: List[Cell] = []
    seen = set()
    for number, block in enumerate(blocks, 1):
        axes = _axes(block, f"grid {path}, block {number}") if block else []
        for values in itertools.product(*(choices for _, choices in axes)):
            pairs = tuple(zip((key for key, _ in axes), values))
            if any(key in fixed for key, _ in pairs):
                raise BenchError(f"grid {path}: {sorted(k for k, _ in pairs if k in fixed)} both fixed and an axis")
            args = tuple(fixed_args + [arg for key, value in pairs for arg in flag_args(key, value)])
            if args in seen:
                continue
            seen.add(args)
            try:
                parse_run_args([*args, *plugin_args])
            except BenchError as exc:
                raise BenchError(f"grid {path}, cell {' '.join(f'{k}={v}' for k, v in pairs)}: {exc}") from None
            cells.append(Cell(len(cells), pairs, args))
    replace = data.get("replace", False)
    if not isinstance(replace, bool):
        raise BenchError(f"grid {path}: replace is true or false")
    return Grid(name, Path(out) if out is not None else Path(data.get("out", f"runs/sweeps/{name}")), plugins,
                tuple(cells), replace)


def cell_command(grid: Grid, cell: Cell) -> str:
    """The cell as the ``bench run`` command it is."""
    plugins = "".join(f" --plugin {p}" for p in grid.plugins)
    return f"bench{plugins} run {' '.join(cell.args)} --out {grid.out}"


def _config(grid: Grid, cell: Cell):
    from bench.cli import parse_run_args, run_config
    from bench.core.plugins import load_plugin

    for plugin in grid.plugins:
        load_plugin(plugin)
    return run_config(parse_run_args([*cell.args, "--out", str(grid.out)]))


def run_cell(grid: Grid, cell: Cell, threads: int, attempts_file: str) -> Dict[str, Any]:
    """A Ray task's body: one ``bench run``. A user error comes back as a result (never retried); anything else
    raises, so Ray retries it."""
    import torch

    from bench.evaluation.runner import run

    with open(attempts_file, "a") as handle:  # one line per attempt: the driver counts them and sees who runs
        handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": time.time()}) + "\n")
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    try:
        record, path = run(_config(grid, cell))
    except BenchError as exc:
        return {"status": "failed", "error": str(exc), "seconds": time.perf_counter() - start}
    return {"status": "done", "record": str(path), "run_id": record["run_id"], "seconds": time.perf_counter() - start,
            "clean": record["clean"]["accuracy"], "robust": record["robust"]["accuracy"]}


@dataclass
class CellState:
    cell: Cell
    status: str = "pending"  # pending, skipped, running, done, failed
    run_id: Optional[str] = None
    record: Optional[str] = None
    error: Optional[str] = None
    seconds: Optional[float] = None
    clean: Optional[float] = None
    robust: Optional[float] = None
    attempts: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def plan_cells(grid: Grid) -> List[CellState]:
    """Each cell's run id and whether its record already exists (loads each defense and subset once, no attack)."""
    from bench.evaluation.runner import existing_record, plan

    states = []
    for cell in grid.cells:
        state = CellState(cell)
        try:
            planned = plan(_config(grid, cell))
        except BenchError as exc:
            state.status, state.error = "failed", str(exc)
        else:
            state.run_id = planned.run_id
            record = existing_record(planned)
            if record is not None:
                state.status, state.record = "skipped", str(planned.target)
                state.clean, state.robust = record["clean"]["accuracy"], record["robust"]["accuracy"]
        states.append(state)
    return states


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_line(states: Sequence[CellState], elapsed: float) -> str:
    counts = {s: sum(1 for c in states if c.status == s) for s in ("done", "running", "failed", "skipped", "pending")}
    to_run = len(states) - counts["skipped"]
    finished = counts["done"] + counts["failed"]
    eta = "?" if finished == 0 else _clock(elapsed / finished * (to_run - finished))
    return (f"sweep: {finished}/{to_run} cells finished ({counts['done']} done, {counts['failed']} failed), "
            f"{counts['running']} running, {counts['pending']} queued; {counts['skipped']} already done | "
            f"elapsed {_clock(elapsed)}, ETA {eta}")


def summary_table(states: Sequence[CellState]) -> str:
    from tabulate import tabulate

    rows = [[s.cell.index, s.cell.label, s.status, s.attempts,
             "" if s.seconds is None else f"{s.seconds:.1f}",
             "" if s.clean is None else f"{100 * s.clean:.2f}", "" if s.robust is None else f"{100 * s.robust:.2f}",
             Path(s.record).name if s.record else (s.error or "")] for s in states]
    return tabulate(rows, headers=["#", "cell", "status", "attempts", "seconds", "clean %", "robust %", "record / error"])


def write_manifest(grid: Grid, states: Sequence[CellState], elapsed: float) -> Path:
    path = grid.out / ".sweep" / f"{grid.name}.json"
    write_json_atomic(path, {"name": grid.name, "out": str(grid.out), "elapsed_seconds": elapsed, "cells": [
        {"index": s.cell.index, "values": dict(s.cell.values), "args": list(s.cell.args), "status": s.status,
         "attempts": s.attempts, "run_id": s.run_id, "record": s.record, "error": s.error, "seconds": s.seconds}
        for s in states]})
    return path


def _attempts(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run_sweep(grid: Grid, address: Optional[str] = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0,
              retries: int = 2, emit: Callable[[str], None] = print, every: float = 10.0) -> List[CellState]:
    """Plan every cell, run those without a record as Ray tasks, and return every cell's final state."""
    start = time.perf_counter()
    states = plan_cells(grid)
    todo = [s for s in states if s.status == "pending"]
    emit(f"sweep {grid.name}: {len(states)} cells, {len(todo)} to run, "
         f"{sum(s.status == 'skipped' for s in states)} already done, {sum(s.status == 'failed' for s in states)} "
         f"failed to plan; records in {grid.out}")
    if todo:
        _execute(grid, todo, states, address, cpus_per_cell, gpus_per_cell, retries, emit, every, start)
    if grid.replace:
        for path in superseded(grid, states):
            path.unlink()
            emit(f"  replaced {path.name} (the same configuration, made by older code)")
    elapsed = time.perf_counter() - start
    write_manifest(grid, states, elapsed)
    return states


def superseded(grid: Grid, states: Sequence[CellState]) -> List[Path]:
    """Records in the grid's folder of a cell's configuration under another run id (made before a code or weights
    change): with ``replace = true`` the cell's record takes their place, so a board keeps one row per configuration."""
    from bench.core.record import configuration_key

    current = {}
    for state in states:
        if state.record and state.status in ("done", "skipped"):
            record = json.loads(Path(state.record).read_text())
            current[configuration_key(record)] = record["run_id"]
    old = []
    for path in sorted(grid.out.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            key, run_id = configuration_key(record), record["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if key in current and current[key] != run_id:
            old.append(path)
    return old


def _execute(grid, todo, states, address, cpus_per_cell, gpus_per_cell, retries, emit, every, start) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline by default: no usage report
    try:
        import ray
    except ImportError:
        raise BenchError("bench sweep needs Ray: pip install '.[sweep]' (make setup installs it)") from None
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    threads = max(1, int(cpus_per_cell))
    env["OMP_NUM_THREADS"] = str(threads)
    started_here = not ray.is_initialized()
    if started_here:
        # A local instance's workers inherit this environment; a cluster's get the bench variables passed along
        # (a runtime environment costs seconds per worker, so only where it is needed).
        os.environ.update(env)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 **({"runtime_env": {"env_vars": env}} if address else {}))
    attempts_dir = (grid.out / ".sweep" / grid.name).resolve()
    attempts_dir.mkdir(parents=True, exist_ok=True)
    # Tasks get absolute paths: a cluster's workers do not start in the driver's folder (a shared filesystem is assumed)
    task_grid = dataclasses.replace(grid, out=grid.out.resolve(), plugins=tuple(str(Path(p).resolve()) for p in grid.plugins))
    task = ray.remote(run_cell).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=retries,
                                        retry_exceptions=True)
    pending = {}
    for state in todo:
        marker = attempts_dir / f"{state.run_id}.attempts"
        marker.unlink(missing_ok=True)
        state.extra["marker"] = marker
        pending[task.remote(task_grid, state.cell, threads, str(marker))] = state
    interactive = sys.stdout.isatty()
    last_line, last_time = "", 0.0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                state = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # retries used up: keep the last error
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {_last_line(exc)}"}
                state.status = result["status"]
                state.error = result.get("error")
                state.record, state.seconds = result.get("record"), result.get("seconds")
                state.clean, state.robust = result.get("clean"), result.get("robust")
                state.attempts = _attempts(state.extra["marker"])
                emit(f"  cell {state.cell.index} ({state.cell.label}): {state.status}"
                     + (f", {state.seconds:.1f} s" if state.seconds is not None else "")
                     + (f" after {state.attempts} attempts" if state.attempts > 1 else "")
                     + (f": {state.error}" if state.error else ""))
            for state in pending.values():
                state.attempts = _attempts(state.extra["marker"])
                state.status = "running" if state.attempts else "pending"
            line = status_line(states, time.perf_counter() - start)
            now = time.perf_counter()
            if interactive:
                sys.stdout.write("\r" + line[:200].ljust(200))
                sys.stdout.flush()
            elif line.split(" | ")[0] != last_line.split(" | ")[0] or now - last_time >= every:
                emit(line)
                last_line, last_time = line, now
        if interactive:
            sys.stdout.write("\n")
    finally:
        if started_here:
            ray.shutdown()


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else repr(exc)
