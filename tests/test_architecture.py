"""The layering of docs/architecture.md, checked: the page's stage table is the stage records'
(:func:`jaxrec.stages.stage_table`), the CLI, ``run`` and ``experiment`` read those records,
and each layer imports only what it may (that neither package has an import cycle:
``tests/llm/test_llm_structure.py``)."""

import ast
import subprocess
import sys
import typing

import llm_bridge.backend as backend_registry
from pathlib import Path

from jaxrec.stages import PER_RUN, PIPELINE, SHARED, STAGE, stage_table
from tests.support import ROOT

JAX = ("jax", "flax", "optax", "orbax")
TORCH = ("torch", "transformers", "peft", "accelerate")
HEAVY = ("scipy", "matplotlib")
# the JAX side of jaxrec (docs/architecture.md, "Layers")
JAX_SIDE = (
    "jaxrec.base",
    "jaxrec.models",
    "jaxrec.train",
    "jaxrec.metrics",
    "jaxrec.influence",
    "jaxrec.lds",
    "jaxrec.retrain",
)
# none left: every package is held to the same rules
CYCLES_PENDING: tuple[str, ...] = ()


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _import_time_names(path: Path) -> set[str]:
    """The modules a file imports when it is imported (not those imported inside functions),
    each as ``a.b`` and, for ``from a import b``, also ``a.b``."""
    names: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                names.update(subs)
                # ``from pkg import submodule`` needs only ``pkg.submodule`` (its package is
                # being imported already); ``from pkg import name`` needs ``pkg`` itself
                if not all(_is_module(n) for n in subs):
                    names.add(node.module)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return names


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_architecture_page_holds_the_stage_table():
    page = (ROOT / "docs/architecture.md").read_text()
    assert stage_table() in page
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


def test_cli_run_and_experiment_read_the_stage_records():
    from jaxrec.cli import COMMANDS
    from jaxrec.experiment import PER_RUN as experiment_per_run
    from jaxrec.pipeline import stage_argv, stage_output

    for stage in PIPELINE:
        assert COMMANDS[stage.command] == (stage.config, stage.name, stage.runner, stage.help)
        section = {"out": f"/w/{stage.output}"}
        done = Path("/w", stage.output, stage.done) if stage.done else Path("/w", stage.output)
        assert stage_output(stage.name, section) == done
        assert stage_argv(stage.name, section, Path("r.yaml"))[0] == stage.command
    assert experiment_per_run == PER_RUN == ("select", "finetune", "evaluate")
    assert SHARED == ("surrogate", "influence", "semantic_ids", "effort", "user_reps")
    # a stage reads only stages before it; shared stages read only shared ones
    order = [s.name for s in PIPELINE]
    for stage in PIPELINE:
        assert all(order.index(i) < order.index(stage.name) for i in stage.inputs)
        if stage.shared:
            assert all(STAGE[i].shared for i in stage.inputs)


def test_stage_records_match_the_config_classes():
    """``takes_backend`` stages are those whose config has ``backend``; every stage's config
    class has an ``out``; the pipeline's backend choices are the records' backends."""
    import dataclasses

    from jaxrec.pipeline import PipelineConfig
    from jaxrec.stages import BACKENDS, config_classes

    for name, cls in config_classes().items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert "out" in fields, name
        assert ("backend" in fields) == STAGE[name].takes_backend, name
    hints = typing.get_type_hints(PipelineConfig)
    assert set(typing.get_args(hints["backend"])) == set(BACKENDS)
    assert set(backend_registry.BACKENDS) == set(BACKENDS)  # every name has an implementation


def test_each_layer_imports_only_what_it_may():
    jaxrec, bridge = _modules("jaxrec"), _modules("llm_bridge")
    bad = []
    for name, path in {**jaxrec, **bridge}.items():
        imported = _import_time_names(path)
        if name.startswith("llm_bridge"):
            forbidden = JAX + JAX_SIDE
        elif _within(name, JAX_SIDE):
            forbidden = TORCH + ("llm_bridge",)
        else:  # contracts, NumPy and orchestration: neither side, nor slow imports
            forbidden = JAX + TORCH + HEAVY + JAX_SIDE
            imported -= {"llm_bridge.config"}  # a contract (the PyTorch side's options)
        bad += [f"{name} imports {m}" for m in sorted(imported) if _within(m, forbidden)]
    assert not bad, "\n".join(bad)


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import sys; from jaxrec.cli import build_parser; build_parser(); "
        f"print([m for m in {JAX + TORCH + HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_no_long_library_function():
    """No function in ``jaxrec`` or ``llm_bridge`` over 60 lines (issue 24), unless its
    docstring says why (``Long because ...``)."""
    long = []
    for name, path in {**_modules("jaxrec"), **_modules("llm_bridge")}.items():
        if _within(name, CYCLES_PENDING):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 and "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


# packages (with their submodules) whose public functions are all annotated: all of them
# (issue 24)
ANNOTATED = ("jaxrec", "llm_bridge")


def _unannotated(tree: ast.Module) -> list[str]:
    """Public functions of a module (module level, or methods of public classes) with an
    argument (``self`` / ``cls`` of a method aside) or the return not annotated."""
    out = []

    def check(fn, prefix, method):
        if fn.name.startswith("_"):
            return
        a = fn.args
        args = a.posonlyargs + a.args
        static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
        if method and args and not static:
            args = args[1:]
        every = [*args, a.vararg, *a.kwonlyargs, a.kwarg]
        missing = [x.arg for x in every if x and x.annotation is None]
        if missing or fn.returns is None:
            out.append(f"{prefix}{fn.name} ({', '.join(missing + ['->'] * (fn.returns is None))})")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            check(node, "", False)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    check(sub, f"{node.name}.", True)
    return out


def test_public_functions_are_annotated():
    """Every public function of the :data:`ANNOTATED` modules has its arguments and return
    annotated (so mypy checks its body: ``check_untyped_defs`` is off)."""
    assert _unannotated(ast.parse("def f(x: int, *a, k=1) -> int: ...")) == ["f (a, k)"]
    assert _unannotated(ast.parse("class C:\n    def m(self, y: int): ...")) == ["C.m (->)"]
    bad = []
    modules = {**_modules("jaxrec"), **_modules("llm_bridge")}
    for name, path in modules.items():
        if _within(name, ANNOTATED):
            bad += [f"{name}.{f}" for f in _unannotated(ast.parse(path.read_text()))]
    assert all(any(_within(m, (p,)) for m in modules) for p in ANNOTATED)
    assert not bad, "\n".join(bad)
