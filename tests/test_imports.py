"""The package's import graph has no cycles, counting imports inside functions too: a function-level import that
hides a cycle still ties the two modules together, and breaks as soon as someone moves it to the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_pipeline"
NAME = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's own modules that one import statement in `module` loads (the package itself not counted)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolved against the importing module's package
            parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(parent + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # `from . import model` names a module; `from .runs import read_run` names something in one
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # `import dpo_pipeline.hub.x` -> dpo_pipeline.hub
            name = name.rpartition(".")[0]
        if name and name != NAME:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (module level, functions, __main__ blocks)."""
    files = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, path.name == "__init__.py", set(files))
        graph[module] = edges - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for group in groups:  # a shortest way back to the start, inside the group
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                cycles.append(path + [start])
                break
            for n in nxt:
                if n not in seen:
                    seen.add(n)
                    paths.append(path + [n])
    return cycles


def test_find_cycles_names_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a", "p.d"}, "p.d": set()}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "dpo_pipeline.pipeline" in graph["dpo_pipeline.cli"]  # imported inside main()
    assert "dpo_pipeline.model" in graph["dpo_pipeline.pipeline"]  # `from . import model as model_lib`
    assert graph["dpo_pipeline.errors"] == set()


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in dpo_pipeline: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.slow  # starts a process
def test_card_and_hub_import_without_torch():
    """Writing a model card or checking the Hub must not pay for torch's import."""
    code = ("import sys; import dpo_pipeline.card, dpo_pipeline.hub, dpo_pipeline.hf; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def top_level_imports(folder: Path) -> dict[str, set[str]]:
    """file -> the top-level names its absolute imports load (`from dpo_pipeline.x import y` -> dpo_pipeline)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.partition(".")[0])
        found[path.name] = names
    return found


def test_layers_only_import_down():
    # offline_models < dpo_pipeline < app, experiments: the offline stand-ins know nothing of the pipeline, and the
    # pipeline nothing of the app or the experiments built on it
    root = PACKAGE.parent
    above = {"offline_models": {NAME, "app", "experiments"}, NAME: {"app", "experiments", "chat_session", "votes"}}
    for folder, forbidden in above.items():
        for name, imports in top_level_imports(root / folder).items():
            assert not imports & forbidden, f"{folder}/{name} imports {imports & forbidden}"
