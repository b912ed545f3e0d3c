"""The library's shape: sub-packages by concept, and no import of the ``callbacks`` package."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "hywia_lightning"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_callbacks_package():
    offenders = {str(p.relative_to(LIBRARY)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "callbacks")
                 for p in LIBRARY.rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_library_has_sub_packages_and_few_top_level_modules():
    top = sorted(p.name for p in LIBRARY.glob("*.py"))
    packages = sorted(p.name for p in LIBRARY.iterdir() if (p / "__init__.py").exists())
    assert len(top) <= 12, top
    assert {"core", "fusion", "reconstruction", "data", "evaluation", "export", "report", "memory_plan"} <= set(packages)
    for package in packages:  # a package's face is a docstring: importing one imports nothing else
        tree = ast.parse((LIBRARY / package / "__init__.py").read_text())
        assert ast.get_docstring(tree), package
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], package
