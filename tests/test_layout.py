"""The bench package's layering (docs/README.md, "Code"): each group imports only the groups below it, and the
modules' old flat names still import the moved modules."""

import ast
import importlib
from pathlib import Path

import bench

BENCH = Path(bench.__file__).parent

#: group -> rank; a module may import groups of lower rank (and its own group).
RANK = {"core": 0, "data": 1, "classifiers": 1, "evaluation": 2, "training": 3, "reports": 4, "api": 5, "cli": 6,
        "sweep": 6}
#: The crossings docs/README.md names: a trainer in classifiers/, and the two front ends using each other.
ALLOWED = {("classifiers/adversarial_training.py", "training"), ("classifiers/adversarial_training.py", "data"),
           ("classifiers/adversarial_training.py", "evaluation"), ("cli.py", "sweep"), ("sweep.py", "cli")}


def _group(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "bench" and len(parts) > 1 else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench" and node.level == 0:
            if node.module == "bench":
                yield from (f"bench.{alias.name}" for alias in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("bench."))


def test_each_group_imports_only_groups_below_it():
    crossings = []
    for path in sorted(BENCH.rglob("*.py")):
        relative = path.relative_to(BENCH).as_posix()
        group = relative.split("/")[0].removesuffix(".py")
        if group not in RANK:
            continue
        for module in _imports(path):
            target = _group(module)
            if f"bench.{target}" in bench.MOVED:
                crossings.append(f"{relative} imports {module} by its old flat name")
            elif target in RANK and target != group and RANK[target] >= RANK[group] \
                    and (relative, target) not in ALLOWED:
                crossings.append(f"{relative} imports {module}")
    assert crossings == []


def test_core_imports_nothing_else_of_bench():
    for path in sorted((BENCH / "core").glob("*.py")):
        assert {_group(m) for m in _imports(path)} <= {"core"}, path.name


def test_old_flat_names_import_the_moved_modules():
    for old, new in bench.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
        assert getattr(bench, old.split(".")[1]) is importlib.import_module(new)
    engine = importlib.import_module("bench.evaluation.engine")
    from bench.evaluation import evaluate
    assert evaluate is engine.evaluate


def test_no_flat_module_is_left_beside_the_groups():
    flat = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert flat == ["api", "cli", "sweep", "training"]
