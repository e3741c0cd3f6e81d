"""Every name a ``bench/`` script takes from this project exists: the benchmarks import most
of the library inside functions (to keep a light ``--help``), so a renamed function would
otherwise surface only when someone reruns a benchmark, hours into a session."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))
PROJECT = ("jaxrec", "llm_bridge")


def _has(module: types.ModuleType, name: str) -> bool:
    """``from module import name`` works: an attribute, or a submodule of a package."""
    if hasattr(module, name):
        return True
    return hasattr(module, "__path__") and (
        importlib.util.find_spec(f"{module.__name__}.{name}") is not None
    )


def missing_names(source: str) -> list[str]:
    """``module.name (line n)`` for each name that ``source`` imports from this project, or
    reads as ``alias.name`` of a project module it imported, that does not exist."""
    tree = ast.parse(source)
    missing, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PROJECT:
                continue
            module = importlib.import_module(node.module)
            for a in node.names:
                if not _has(module, a.name):
                    missing.append(f"{node.module}.{a.name} (line {node.lineno})")
                    continue
                value = getattr(module, a.name, None)
                if value is None:  # a submodule not imported yet
                    value = importlib.import_module(f"{node.module}.{a.name}")
                if isinstance(value, types.ModuleType):
                    aliases[a.asname or a.name] = value
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT and a.asname:
                    aliases[a.asname] = importlib.import_module(a.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and not _has(aliases[node.value.id], node.attr)
        ):
            missing.append(f"{aliases[node.value.id].__name__}.{node.attr} (line {node.lineno})")
    return missing


def test_missing_names_finds_a_renamed_function() -> None:
    src = (
        "from jaxrec.data import load_dataset, no_such_function\n"
        "from llm_bridge.tiger import finetune as F\nF.load_codes\nF.gone\n"
    )
    assert missing_names(src) == [
        "jaxrec.data.no_such_function (line 1)",
        "llm_bridge.tiger.finetune.gone (line 4)",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_imports_resolve(script: Path) -> None:
    assert not missing_names(script.read_text())
