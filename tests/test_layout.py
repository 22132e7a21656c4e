"""The import direction the folders show: ``sat_trainer.app`` -> callback -> engine, never back.

Every module of ``sat_trainer/`` outside ``app/`` is the engine a Trainer user imports; none of
them may import ``sat_trainer.app`` (at the top, inside a function or under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sat_trainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports, relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def engine_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts)


def test_relative_imports_are_resolved():
    units = PACKAGE / "patch" / "units.py"
    assert {"sat_trainer.adapters", "sat_trainer.errors", "sat_trainer.patch.registry"} <= imported_modules(units)


def test_no_engine_module_imports_the_app():
    assert len(engine_modules()) >= 10
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            m for m in imported_modules(path) if m == "sat_trainer.app" or m.startswith("sat_trainer.app.")
        )
        for path in engine_modules()
    }
    assert not {k: v for k, v in offenders.items() if v}, "engine modules must not import sat_trainer.app"
