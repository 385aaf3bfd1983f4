"""The package's layers: every import (function-level ones included) points down the order below, and no
module imports itself back through others.

Read top to bottom, a layer may import any layer *below* it and nothing above. Layers on one line are
peers that do not import each other. A new package (or root module) must be placed here, or this test fails.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lrcompress"

# Highest first. "core" and "errors" are the ground floor: every layer may import them.
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "__main__"),            # the public API (lrcompress.run, .load) and ``python -m``
    ("cli",),                            # commands: parse, call the library, render
    ("api",),                            # lrcompress.run: a recipe with a model/data already in memory
    ("runner",),                         # one run's phases
    ("residency",),                      # resident or lazy model, and how it is evaluated
    ("preflight",),                      # everything checked before the weights are loaded
    ("results",),                        # a run's records: metrics.json, report, compare, gate, inspect
    ("eval",),                           # perplexity, lm-eval tasks, streamed evaluation
    ("pipeline",),                       # the layer-wise engine, pre-passes, allocation, resume
    ("data",),                           # datasets, tokenization, windows
    ("recipe",),                         # the recipe schema (validates each stage's config)
    ("compressor",),                     # methods: statistics in, replacement modules out
    ("_hf_registration",),               # transformers' quantizer hook for written checkpoints
    ("models",),                         # loading, adapters, capture, lazy layer stores
    ("checkpoint",),                     # reading and writing compressed checkpoints
    ("modules",),                        # the nn.Modules compressed weights become
    ("triton_kernels",),                 # GPU kernels and their torch references
    ("core",),                           # ground floor: devices, cache root, packing, version
    ("errors",),                         # the exceptions every layer raises
]
RANK = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The lrcompress modules an ``import``/``from ... import`` names (a ``from .. import x`` names x)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("lrcompress"):
        return []
    named = [f"{target}.{alias.name}" for alias in node.names]
    submodules = [name for name in named if _exists(name)]
    return submodules or [target]


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).is_dir() or (PACKAGE / relative).with_suffix(".py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module → the lrcompress modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                graph[module].update(_resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name.startswith("lrcompress"))
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    missing = sorted({_layer(module) for module in import_graph()} - set(RANK))
    assert not missing, f"place these in LAYERS (tests/test_layering.py): {missing}"


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                    if _layer(target) != _layer(module) and RANK[_layer(target)] >= RANK[_layer(module)])
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    edges = {module: {t for t in targets if t in graph and t != module and not _is_parent(t, module)}
             for module, targets in graph.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _is_parent(package: str, module: str) -> bool:
    """Importing a module runs its packages' ``__init__`` first: that edge is not a cycle of the code."""
    return module.startswith(package + ".")


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}             # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checks_catch_what_they_guard():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    node = ast.parse("from .. import triton_kernels").body[0]
    assert _resolve("lrcompress.modules.quantized", False, node) == ["lrcompress.triton_kernels"]
    node = ast.parse("from ..errors import LrcompressError").body[0]
    assert _resolve("lrcompress.pipeline", True, node) == ["lrcompress.errors"]


def test_no_pipeline_function_takes_more_than_five_parameters():
    """The pipeline's state travels in objects (``LayerWalk``, the engine's ``Segment``), not in long signatures."""
    long = []
    for path in sorted((PACKAGE / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                if len(names) > 5:
                    long.append(f"pipeline/{path.name}:{node.lineno} {node.name}({', '.join(names)})")
    assert not long, "more than 5 parameters:\n" + "\n".join(long)
