"""The import graph of mmserve/ and training/: no cycle (imports inside functions included), mmserve never imports
training, and the engine knows no HTTP."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mmserve", "training")


def module_name(path: Path) -> str:
    """Dotted module name of a file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file: top level, in functions, under TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (read once per session)."""
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_cycle_finder_sees_a_lazy_cycle(tmp_path):
    """The walker finds an import inside a function, and the cycle finder reports the loop it closes."""
    lazy = tmp_path / "b.py"
    lazy.write_text("def f():\n    from a import x\n    return x\n")
    assert imports_of("b", lazy, {"a", "b"}) == {"a"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    """No two modules of mmserve/ or training/ import each other, directly or through others, lazily or not."""
    graph = import_graph()
    assert "mmserve.registry" in graph and "mmserve.builders" in graph["mmserve.snapshot"]
    assert cycles(graph) == []


def test_mmserve_never_imports_training():
    """training/ builds on mmserve/, never the reverse."""
    graph = import_graph()
    offenders = {m: sorted(t for t in deps if t.startswith("training")) for m, deps in graph.items()
                 if m.startswith("mmserve")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_bench_does_not_import_the_cli():
    """`mmserve bench` is a library section; the command line imports it, not the other way round."""
    graph = import_graph()
    bench = {m: deps for m, deps in graph.items() if m.startswith("mmserve.bench")}
    assert bench and not any("mmserve.cli" in deps for deps in bench.values())


def test_registry_storage_builds_no_module():
    """The storage format (mmserve.registry) imports no module builder, prompt method or backbone."""
    deps = import_graph()["mmserve.registry"]
    assert not deps & {"mmserve.builders", "mmserve.backbone", "mmserve.fusion", "mmserve.prompts"}


def test_engine_knows_no_http():
    """No HTTP status code or route in the inference engine's modules: the service maps errors to statuses."""
    status = re.compile(r"\b(200|4\d\d|5\d\d)\b|status_code|/classify|/fuse")
    for name in ("mmserve.engine", "mmserve.snapshot", "mmserve.answers", "mmserve.runtime"):
        path = project_modules().get(name)
        if path is None:
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not status.findall(code), f"{path.name} mentions HTTP: {[m.group(0) for m in status.finditer(code)][:5]}"
