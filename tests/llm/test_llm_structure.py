"""The structure of ``llm_bridge``: no import cycle (in ``jaxrec`` either), function-level
imports only with a reason, light modules free of torch, one backend registry, one ghost-norm
rule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ROOT

PACKAGES = ("llm_bridge", "jaxrec")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(first-party module, line, inside a function)`` of every import in ``path``."""
    tree = ast.parse(path.read_text())
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # each imported name is an edge: to the submodule it names, else to ``base``
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found = set()
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != here and name not in found:
                found.add(name)
                out.append((name, node.lineno, id(node) in nested))
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that ends where it starts), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_jaxrec_or_llm_bridge():
    """Every import of every module of both packages (top level or inside a function) is an
    edge; the graph has no cycle (issue 24: none anywhere in ``jaxrec/`` and ``llm_bridge/``;
    the one import-cycle test of the project)."""
    modules = _modules()
    graph = {m: {t for t, _, _ in _imports(p, modules)} for m, p in modules.items()}
    assert {"jaxrec.lds", "llm_bridge.tiger.user_reps"} <= set(graph)  # both packages
    assert "llm_bridge.tiger.user_reps" in graph["llm_bridge.tiger.backend"]  # every name
    found = _cycle(graph)
    assert found is None, " -> ".join(found or [])


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_say_why():
    """An import inside a function in ``llm_bridge`` carries a comment (on its line or the
    line above) saying what it keeps out of a light import."""
    missing = []
    for path in sorted((ROOT / "llm_bridge").rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    first = node.lineno - 1  # the comment may head a block of imports
                    while lines[first - 1].strip().startswith(("import ", "from ")):
                        first -= 1
                    if "#" not in "".join(lines[first - 1 : node.end_lineno]):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing


def test_light_modules_do_not_load_torch():
    """The configs, the registry and the shared helpers load without torch (the CLI imports
    them for every command, ``dealrec doctor`` among them)."""
    code = (
        "import sys, llm_bridge.config, llm_bridge.backend, llm_bridge.runtime, "
        "llm_bridge.model, llm_bridge.metrics\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'jax') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_no_file_over_500_lines():
    """Issue 24: no file of either package over 500 lines."""
    long = {
        str(p.relative_to(ROOT)): n
        for package in ("jaxrec", "llm_bridge")
        for p in sorted((ROOT / package).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long


def test_backends_come_from_one_registry():
    from typing import get_args

    from llm_bridge.backend import BACKENDS, get_backend
    from llm_bridge.config import Backend
    from jaxrec.errors import UserError

    assert set(BACKENDS) == set(get_args(Backend))
    for name in BACKENDS:
        backend = get_backend(name)
        assert backend.name == name
        for stage in ("effort", "finetune", "evaluate", "user_reps"):
            assert callable(getattr(backend, stage))
    with pytest.raises(UserError, match="expected one of bigrec, tiger"):
        get_backend("t5")


@pytest.mark.parametrize(
    "b, t, d_in, d_out", [(3, 7, 64, 8), (3, 7, 8, 64), (2, 40, 16, 8), (2, 3, 128, 96)]
)
def test_linear_sq_norms_both_forms_match_per_sample_gradients(b, t, d_in, d_out):
    """Against an independent reference: the squared norm of each sample's explicit weight
    gradient ``sum_t g_t x_t^T``, by a loop; both the explicit and the ghost branch."""
    from llm_bridge.norms import linear_sq_norms, use_ghost

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, d_out, generator=gen, dtype=torch.float64)
    x[0, -2:] = 0  # padding rows
    ref = torch.stack(
        [sum(torch.outer(g[i, s], x[i, s]) for s in range(t)).pow(2).sum() for i in range(b)]
    )
    torch.testing.assert_close(linear_sq_norms(x, g), ref, rtol=1e-10, atol=0)
    # the rule: the ghost form where it needs fewer multiply-adds
    assert use_ghost(t, d_in, d_out) == (t * t * (d_in + d_out) < t * d_in * d_out)


def test_ghost_rule_cases():
    from llm_bridge.norms import use_ghost

    assert not use_ghost(64, 576, 8)  # a LoRA factor over a sequence: explicit
    assert use_ghost(80, 128, 1024)  # a T5 feed-forward over 80 tokens: ghost
    assert use_ghost(5, 128, 384)  # few positions, a wide map: ghost


def test_ghost_norm_bench_runs():
    """The command of docs/benchmarks.md ("Ghost norm: one cost rule"), one repeat."""
    out = subprocess.run(
        [sys.executable, "bench/ghost_norm.py", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| bigrec") or "| tiger" in line]
    assert len(rows) == 16 and all(float(r.split("|")[-2]) > 0 for r in rows)
