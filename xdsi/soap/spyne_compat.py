"""Make spyne 2.14.0 importable on Python 3.12 and later.

spyne 2.14.0 (the last release) bundles a copy of ``six`` as ``spyne.util.six``
whose ``six.moves`` importer is written against the ``find_module`` protocol
that Python 3.12 removed, so ``import spyne`` fails with ``No module named
'spyne.util.six.moves'``.  The real ``six`` (1.16+) speaks ``find_spec``.  This
module puts a meta-path finder first that answers every ``spyne.util.six``
import with the matching module of the real ``six``; the top-level name gets a
module of its own holding the real ``six``'s names plus the one function
spyne added to its copy (``get_function_name``).  Neither spyne nor ``six`` is
patched.  On Python 3.13 spyne also imports ``cgi``, removed from the standard
library: the ``legacy-cgi`` distribution (a dependency with an environment
marker) provides it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import operator
import sys
from types import ModuleType
from typing import Sequence

BUNDLED = "spyne.util.six"


class _RealSix(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``spyne.util.six[.X]`` -> ``six[.X]``, the same module objects."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == BUNDLED or fullname.startswith(BUNDLED + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if spec.name != BUNDLED:
            return importlib.import_module("six" + spec.name[len(BUNDLED) :])
        six = importlib.import_module("six")
        module = ModuleType(BUNDLED, six.__doc__)
        module.__dict__.update({k: v for k, v in vars(six).items() if not k.startswith("__")})
        module.__path__ = []  # a package, so "spyne.util.six.moves..." comes back to this finder
        module.get_function_name = operator.attrgetter("__name__")  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The real six module is already executed."""


def install() -> None:
    if not any(isinstance(f, _RealSix) for f in sys.meta_path):
        sys.meta_path.insert(0, _RealSix())


install()
