"""The code's shape: the remote-code set imports nothing from the training side nor the training objectives, and no
module imports itself back through another (no import cycle), module-level or inside functions."""

import ast
from pathlib import Path

from conftest import REPO


PACKAGE = REPO / "modeling_lightclip"
REMOTE_CODE = ("configuration_lightclip", "modeling_lightclip", "processing_lightclip")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every modeling_lightclip module `path` imports (absolute or relative, anywhere in the file)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("modeling_lightclip"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("modeling_lightclip"):
                continue
            found.add(module)
            for alias in node.names:  # `from . import data` imports a module
                if (REPO / (module + "." + alias.name).replace(".", "/")).with_suffix(".py").is_file():
                    found.add(module + "." + alias.name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "metrics" not in p.parts}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_remote_code_set_imports_nothing_from_the_training_side():
    graph = _graph()
    for name in REMOTE_CODE:
        imported = graph[f"modeling_lightclip.{name}"]
        assert not [m for m in imported if m.startswith("modeling_lightclip.training")], (name, imported)
        assert imported <= {f"modeling_lightclip.{n}" for n in REMOTE_CODE}, (name, imported)
    # the objectives are training code beside the set: they read the config and never the trainer; the set reaches
    # them through `training_objectives()` only, so they are not saved with a model (test_remote_code)
    objectives = graph["modeling_lightclip.objectives_lightclip"]
    assert objectives == {"modeling_lightclip.configuration_lightclip"}, objectives


def test_no_import_cycle():
    graph = _graph()
    # package __init__ files only re-export: an edge into a package is an edge into its __init__
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_cycle_check_sees_a_cycle(monkeypatch):
    """The checker itself: a graph with a cycle is refused."""
    import pytest

    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()
