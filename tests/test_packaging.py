"""setup.py declares every distribution the installed packages import: a fresh virtual environment (CI's, a
newcomer's) has only what install_requires names, not what this machine happens to have. An optional extra's
distributions may be imported only by the package that owns the extra, and the tests install every extra."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import runpy
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from tests.conftest import REPO

PACKAGES = ("train", "models", "compress", "scoring", "data", "conf")
#: The package that owns each optional extra (the only one that may import its distributions).
EXTRA_OWNERS = {"deploy": REPO / "scoring" / "entry" / "deploy"}


def _setup_arguments() -> dict[str, Any]:
    """The keyword arguments setup.py passes to setuptools.setup."""
    arguments: dict[str, Any] = {}
    with mock.patch("setuptools.setup", lambda **kwargs: arguments.update(kwargs)):
        runpy.run_path(str(REPO / "setup.py"))
    return arguments


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", requirement)[0].lower() for requirement in requirements}


def _imported_top_level_modules(paths: list[Path]) -> set[str]:
    """Every module imported in ``paths`` (function-level imports too), by its top-level name."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(PACKAGES) - set(sys.stdlib_module_names)


def _missing(imported: set[str], declared: set[str]) -> dict[str, Any]:
    distributions = importlib.metadata.packages_distributions()
    return {module: distributions.get(module) for module in imported
            if not {name.lower() for name in distributions.get(module, [module])} & declared}


def _files(owner: Path | None = None) -> list[Path]:
    """The packages' modules inside ``owner``, or, without it, outside every extra's owner."""
    files = [path for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    if owner is not None:
        return [path for path in files if owner in path.parents]
    return [path for path in files if not any(folder in path.parents for folder in EXTRA_OWNERS.values())]


def test_every_imported_distribution_is_in_install_requires():
    imported = _imported_top_level_modules(_files())
    assert {"torch", "omegaconf", "matplotlib", "scipy"} <= imported  # the walk sees module- and function-level imports
    missing = _missing(imported, _names(_setup_arguments()["install_requires"]))
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"


def test_an_extra_is_imported_only_by_its_package_and_the_tests_install_it():
    arguments = _setup_arguments()
    required, extras = _names(arguments["install_requires"]), arguments["extras_require"]
    assert set(EXTRA_OWNERS) == set(extras) - {"test"}
    for extra, owner in EXTRA_OWNERS.items():
        imported = _imported_top_level_modules(_files(owner))
        assert _names(extras[extra]) <= imported, f"{owner.relative_to(REPO)} must use what [{extra}] installs"
        missing = _missing(imported, required | _names(extras[extra]))
        assert not missing, f"imported by {owner.relative_to(REPO)} but not in install_requires or [{extra}]: {missing}"
        assert _names(extras[extra]) <= _names(extras["test"]), f"the test extra must install [{extra}]"


def test_every_package_folder_is_installed():
    folders = {str(path.parent.relative_to(REPO)).replace("/", ".")
               for package in PACKAGES for path in (REPO / package).rglob("__init__.py")}
    assert folders == set(_setup_arguments()["packages"])
