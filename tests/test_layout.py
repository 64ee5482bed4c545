"""The code's layout holds: no import circles (imports inside functions count: a lazy import only hides a
circle), no module grown past what one reader takes in, and each package's docstring names its modules."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "data_prep", "kernels")
MAX_LINES = 420  # ~400: past it a module holds more than one job


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "kernels":  # the folder is imported as lm.kernels
        parts = ("lm",) + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `path` imports anywhere in it (from X import y: X.y when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    modules = sources()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    assert circles(graph) == []


def test_no_module_past_one_readers_length():
    """In lm/ (kernels/ holds Triton kernels, forward and backward side by side)."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "lm").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_each_package_docstring_names_its_modules():
    for init in (ROOT / "lm").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        modules = [p.name for p in init.parent.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        if init.parent.name == "kernels":  # its files are the top-level kernels/ folder
            continue
        missing = [m for m in modules if not re.search(rf"\b{m[:-3]}\b", doc)]
        assert not missing, f"{init.relative_to(ROOT)} does not name {missing}"
