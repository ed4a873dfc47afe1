"""The layering of clipper/ (docs/architecture.md): the graph of its imports has no cycle, counting
imports inside functions too (a cycle closed by a late import is still a cycle of design), and the
packages a module imports from (their `__init__` runs first), except those it is inside. Imports under `if TYPE_CHECKING:`
never run and are not counted. No module imports the package itself: `clipper/__init__.py` is the
public face that imports from the modules."""

import ast
from pathlib import Path

import clipper

ROOT = Path(clipper.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """Import nodes, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def add(source: str, target: str) -> None:
        while target not in modules:  # a name imported from a module, not a module
            target = target.rsplit(".", 1)[0]
        graph[source].add(target)
        parent = target.rsplit(".", 1)[0]
        while "." in parent:  # the subpackages on the way run their __init__ first (not the root,
            if not source.startswith(parent + "."):  # nor the packages the importer is inside)
                graph[source].add(parent)
            parent = parent.rsplit(".", 1)[0]

    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "clipper":
                        add(name, alias.name)
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "clipper":
                continue
            for alias in node.names:
                add(name, f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_the_package_itself():
    graph = import_graph()
    assert [m for m, targets in graph.items() if "clipper" in targets] == []


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_graph_sees_late_and_package_imports(tmp_path):
    """The checker itself: a cycle closed inside a function, or through a package's __init__, is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]
    tree = ast.parse("def f():\n    from .x import y\nif TYPE_CHECKING:\n    from .z import w\n")
    assert [n.module for n in _runtime_imports(tree)] == ["x"]


def test_the_architecture_doc_names_every_module_and_none_is_long():
    doc = (ROOT.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    unnamed, long = [], []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py":
            named = rel.parent == Path(".") or f"`{rel.parent.name}/`" in doc or f"clipper/{rel.parent}/" in doc
        else:
            named = f"`{path.name}`" in doc
        if not named:
            unnamed.append(str(rel))
        if len(path.read_text(encoding="utf-8").splitlines()) > 500:
            long.append(str(rel))
    assert unnamed == [] and long == []
