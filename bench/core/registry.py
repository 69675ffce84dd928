"""One generic registry, used for defenses, attacks, suites, classifiers and datasets.

Entries are registered with a decorator next to their definition (never in a central list). Lookups of
unknown names raise ``BenchError`` naming the closest registered names. Packages that hold entries are
imported lazily on first lookup (``discover``), so ``bench list`` and plug-ins see the same set.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
from typing import Callable, Dict, Generic, Iterable, List, Optional, TypeVar

from bench.core.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map with duplicate refusal, base-class checks and "did you mean" errors."""

    def __init__(
        self, kind: str, base: Optional[type] = None, packages: Iterable[str] = (), entry_point_group: str = ""
    ) -> None:
        self.kind = kind
        self.base = base
        self._packages = tuple(packages)
        self._group = entry_point_group
        self._entries: Dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` above a class or factory function."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._entries and self._entries[name] is not obj and not _same_definition(self._entries[name], obj):
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name]!r}")
        if self.base is not None and isinstance(obj, type) and not issubclass(obj, self.base):
            raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}, got {obj!r}")
        self._entries[name] = obj

    def discover(self) -> None:
        """Import every module of the registry's packages once (each file registers itself)."""
        if self._discovered:
            return
        self._discovered = True
        for package_name in self._packages:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{info.name}")
        if self._group:
            # Installed third-party packages: importing the entry point's module registers it.
            for entry_point in importlib.metadata.entry_points(group=self._group):
                entry_point.load()

    def get(self, name: str) -> T:
        self.discover()
        if name in self._entries:
            return self._entries[name]
        raise BenchError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names()) or '(none)'}."

    def names(self) -> List[str]:
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def items(self) -> List[tuple]:
        self.discover()
        return sorted(self._entries.items())


def _same_definition(old: object, new: object) -> bool:
    """A notebook cell or script run again defines a new object under the same module and qualified name: that
    replaces the entry instead of clashing with it."""
    key = lambda obj: (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
    return key(old) == key(new) and key(new)[1] is not None
