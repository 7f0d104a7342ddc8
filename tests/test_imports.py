"""The package's import graph has no cycles: every `import` of a dllm module, at module
level or inside a function (a lazy import only hides a cycle), read from the source."""
import ast
from pathlib import Path

import dllm

PACKAGE = Path(dllm.__file__).parent


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, modules):
    """The dllm modules that the module at `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:     # `from . import kernels` names a module
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph():
    paths = sorted(PACKAGE.rglob("*.py"))
    # compiled extensions (dllm._gemm_q40_q80) are modules too, with no imports of ours
    extensions = {".".join(c.relative_to(PACKAGE.parent).with_suffix("").parts)
                  for c in PACKAGE.rglob("*.c")}
    modules = {module_name(p) for p in paths} | extensions
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    return {**graph, **{e: set() for e in extensions}}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_imports():
    graph = import_graph()
    assert "dllm.model" in graph["dllm.loading"] and "dllm.comm" in graph["dllm.pipeline"]
    assert graph["dllm.kernels_fast"] >= {"dllm._gemm_q40_q80", "dllm.quant"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []
