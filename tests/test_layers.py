"""The package's layers hold (ARCHITECTURE.md, "Layers"): walks every import of every module with
``ast`` -- imports inside functions and under ``TYPE_CHECKING`` included, since a function-level
import is still an arrow a reader must follow -- and checks that

- a module imports its own package and lower layers only (train and eval share a layer and
  never import each other);
- a command module (``lmforge/commands/<stage>.py``) imports no other stage's command module
  (the flags they share, ``commands/options.py``, aside);
- no two modules import each other, directly or through others (no circle of files).

The figures the rules replace (issue 16): 12 modules outside train/ imported train/checkpoint.py,
model/quant -> io/hf -> model/peft/io -> train/checkpoint -> model/quant was a circle, train and
eval imported each other and cli <-> quickstart did too. (`lmforge --help` importing no torch:
tests/test_cli_help.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "lmforge"

#: Bottom to top. A module of one of these may import its own package and packages listed before it.
LAYERS: list[set[str]] = [
    {"__init__", "errors", "paths", "fileio", "config", "hardware"},
    {"tokenizer"},
    {"data"},
    {"runs"},
    {"model"},
    {"checkpoint"},
    {"io"},
    {"infer"},
    {"train", "eval"},
    {"serve"},
    {"commands"},
    {"quickstart"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
#: The core modules are one package for this test: they may import each other (config -> errors).
GROUP = {name: "core" for name in LAYERS[0]}
SHARED_COMMAND_MODULES = {"lmforge.commands", "lmforge.commands.options"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every lmforge module `path` imports (absolute names), wherever the import statement is."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lmforge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lmforge":
                continue
            # `from .x import y` may name a module y or a name in x: count the module where one exists
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    return out


def _exists(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _layer(mod: str) -> tuple[int, str]:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYER_OF:
        raise AssertionError(f"{mod}: its package {top!r} has no layer in ARCHITECTURE.md's table (and this test's)")
    return LAYER_OF[top], GROUP.get(top, top)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_package_has_a_layer() -> None:
    for m in MODULES:
        _layer(m)


def test_no_module_imports_a_higher_layer_or_a_sibling_stage() -> None:
    bad = []
    for m, deps in GRAPH.items():
        lm, pm = _layer(m)
        for d in deps:
            ld, pd = _layer(d)
            if pd == pm:
                if pm == "commands" and d not in SHARED_COMMAND_MODULES:
                    bad.append(f"{m} -> {d} (a command imports another stage's command)")
            elif ld >= lm:
                bad.append(f"{m} (layer {lm}) -> {d} (layer {ld})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_circles() -> None:
    # Tarjan's strongly connected components over the file graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its modules, which import each other through it, is one idea
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)
