"""The house rules, read from the source (ast, nothing imported): imports point one way (no cycle in the
package), the model never loads files, the checkpoint format stands on the ground floor, and no file or
function grows past what a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "swin_train"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# Trees whose files and functions are held to the size limits (tests are not).
SIZED_TREES = ("swin_train", "scripts")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (inside functions too), resolving
    relative imports and `from package import submodule`."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != module)
    return found


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {module: imported_modules(module, path, known) for module, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module that importing `module` imports, directly or through others."""
    found: set[str] = set()
    todo = [module]
    while todo:
        for target in graph[todo.pop()] - found:
            found.add(target)
            todo.append(target)
    return found


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_reachable_follows_imports_through_other_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}
    assert reachable(graph, "a") == {"b", "c"}
    assert reachable(graph, "c") == set()


def test_the_model_package_never_imports_what_loads_files_or_the_config():
    # through other modules too: `from swin_train import create_model` (the package's __init__) or
    # swin_train.predict would bring in loading.py as surely as importing it by name
    graph = import_graph()
    above_models = {"swin_train.loading", "swin_train.config", "swin_train.run", "swin_train.trainer"}
    for module in graph:
        if module.startswith("swin_train.models"):
            reached = reachable(graph, module) & above_models
            assert not reached, f"{module} imports {sorted(reached)}"


def test_the_checkpoint_format_imports_nothing_of_ours_but_the_ground_floor():
    ground_floor = {"swin_train.errors", "swin_train.leftovers"}
    assert reachable(import_graph(), "swin_train.checkpoint") <= ground_floor
    assert import_graph()["swin_train.leftovers"] == set()


def sized_files() -> list[Path]:
    return sorted(path for tree in SIZED_TREES for path in (ROOT / tree).rglob("*.py"))


@pytest.mark.parametrize("path", sized_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_is_longer_than_a_reader_takes_in(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def long_functions(path: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES in `path`; argument parser builders (`*parser`) are exempt."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and not node.name.endswith("parser")
    ]


@pytest.mark.parametrize("path", sized_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_a_screen(path):
    assert long_functions(path) == []


def test_the_function_length_rule_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(f"def long():\n{body}\n\n\ndef build_parser():\n{body}\n")
    assert long_functions(source) == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
