"""The package layout reads as the data flow and has no import cycles (README "Layout").

Every ``import`` statement counts, including the ones inside functions: a lazy import still makes
one module depend on the other, and hiding a cycle in a function body is how the earlier cycles
(bench.py <-> benchmarks, protocol <-> speed, backbones <-> pretrain) crept in. Imports under
``if TYPE_CHECKING:`` do not count (they never run).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "methods", "baselines", "reports")
# The order in which a batch travels, file to result: a sub-package may import only those before it.
BENCHMARK_LAYERS = ["benchmarks.config", "benchmarks.metrics", "benchmarks.diagnostics", "benchmarks.data",
                    "benchmarks.cost", "benchmarks.run", "benchmarks.tables", "benchmarks.tools"]
# What methods/ and baselines/ may use of benchmarks/: the config vocabulary, the data (the micro-ViT
# pretraining reads it) and the protocol's training helpers (seeding, loaders, lr schedules: OVOR
# runs its own outlier epochs at the end of a task with them). Never cost, tables, tools or reports.
METHOD_MAY_USE = ("benchmarks.config", "benchmarks.data", "benchmarks.run.protocol")


def module_files(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for bench.py and every module of the project's packages."""
    out = {"bench": root / "bench.py"} if (root / "bench.py").exists() else {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """Module -> the project modules it imports (anywhere in the file)."""
    mods = module_files(root)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import module` depends on the module, `from module import name` on the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                o = owner(t)
                if o and o != mod:
                    graph[mod].add(o)
    return graph


def cycles(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str) -> str | None:
    for layer in BENCHMARK_LAYERS:
        if mod == layer or mod.startswith(layer + "."):
            return layer
    return None


def test_cycle_finder_finds_a_planted_cycle_and_ignores_type_checking(tmp_path):
    (tmp_path / "benchmarks" / "run").mkdir(parents=True)
    for d in ("methods", "baselines", "reports"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "run" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "run" / "a.py").write_text("def f():\n    from benchmarks.run import b\n")
    (tmp_path / "benchmarks" / "run" / "b.py").write_text("from .c import x\n")
    (tmp_path / "benchmarks" / "run" / "c.py").write_text("import benchmarks.run.a\nx = 1\n")
    (tmp_path / "methods" / "m.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from benchmarks.run.a import f\n")
    g = import_graph(tmp_path)
    assert g["benchmarks.run.a"] == {"benchmarks.run.b"}
    assert g["benchmarks.run.b"] == {"benchmarks.run.c"}
    assert g["methods.m"] == set()
    assert cycles(g) == [["benchmarks.run.a", "benchmarks.run.b", "benchmarks.run.c"]]


def test_no_module_imports_bench_py():
    g = import_graph(ROOT)
    assert [m for m, ts in g.items() if "bench" in ts] == []


def test_no_import_cycle_between_modules():
    assert cycles(import_graph(ROOT)) == []


def test_benchmark_subpackages_follow_the_data_flow():
    """data -> cost -> run -> tables -> tools: no sub-package imports one that comes after it."""
    g = import_graph(ROOT)
    back = []
    for m, ts in g.items():
        lm = layer_of(m)
        for t in ts:
            lt = layer_of(t)
            if lm and lt and BENCHMARK_LAYERS.index(lt) > BENCHMARK_LAYERS.index(lm):
                back.append(f"{m} -> {t}")
    assert back == []


def test_methods_use_only_the_config_data_and_protocol_helpers_of_benchmarks():
    """What is compared (methods/, baselines/) must not reach into how it is costed, tabled or reported."""
    g = import_graph(ROOT)
    bad = [f"{m} -> {t}" for m, ts in g.items() if m.split(".")[0] in ("methods", "baselines")
           for t in ts if t.split(".")[0] in ("reports", "bench")
           or (t.startswith("benchmarks") and not any(t == a or t.startswith(a + ".") for a in METHOD_MAY_USE))]
    assert bad == []
