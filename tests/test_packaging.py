"""setup.py declares every distribution the installed packages import: a fresh virtual environment (CI's, a
newcomer's) has only what install_requires names, not what this machine happens to have."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

from tests.conftest import REPO

PACKAGES = ("train", "models", "compress", "scoring", "data", "conf")


def _install_requires() -> set[str]:
    setup = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(setup)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    requires = next(keyword.value for keyword in call.keywords if keyword.arg == "install_requires")
    return {re.split(r"[<>=!~\[; ]", ast.literal_eval(item))[0].lower() for item in requires.elts}


def _imported_top_level_modules() -> set[str]:
    """Every module imported anywhere in the packages (function-level imports too), by its top-level name."""
    names: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(PACKAGES) - set(sys.stdlib_module_names)


def test_every_imported_distribution_is_in_install_requires():
    distributions = importlib.metadata.packages_distributions()
    imported = _imported_top_level_modules()
    assert {"torch", "omegaconf", "matplotlib", "scipy"} <= imported  # the walk sees module- and function-level imports
    missing = {module: distributions.get(module) for module in imported
               if not {name.lower() for name in distributions.get(module, [module])} & _install_requires()}
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"
