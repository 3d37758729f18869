"""The package's layering (issue #21), read from the source: every import counts, including the lazy ones
inside function bodies. Floors, lowest first (a package may import only its own floor's package and lower ones,
never a sibling on the same floor):

    core <- families <- trainer | diffusers_host <- evaluation | world <- nodes | webui <- benchmarks | testing <- cli

with the exceptions spelled out below: `world` may import `evaluation` (the demo world is a plug-in on top of
evaluation), `benchmarks` builds its models with `testing`, and nothing but the command line and the dev tools
(cli, benchmarks, testing) imports `world`. Also: argparse only in cli/ and scripts/, no
module-level import cycle, no private name imported across packages.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", ".git", "build", "runs", "docs", "web", "example_workflows", "configs"}
FLOOR = {"core": 0, "families": 1, "trainer": 2, "diffusers_host": 2, "evaluation": 3, "world": 3,
         "nodes": 4, "webui": 4, "benchmarks": 5, "testing": 5, "cli": 6}
ALLOWED_SIDEWAYS = {("world", "evaluation"), ("benchmarks", "testing")}
WORLD_USERS = ("cli", "benchmarks", "testing")  # the command line and the dev tools: never product code


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        if rel.parts[0] in SKIP or "assets" in rel.parts or rel.parts[0].startswith("."):
            continue
        mods[".".join(rel.with_suffix("").parts).removesuffix(".__init__") or "(root)"] = f
    return mods


def _imports(mods):
    """(module, target module, imported names, lineno) for every relative import, lazy ones included."""
    out = []
    for name, f in mods.items():
        base = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base.split(".") if base else []
                parts = parts[: len(parts) - (node.level - 1)]
                target = ".".join(parts + ([node.module] if node.module else []))
                out.append((name, target, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("npo_suite"):
                out.append((name, node.module.removeprefix("npo_suite").lstrip("."), [a.name for a in node.names],
                            node.lineno))
    return out


def _top(mod: str) -> str:
    return mod.split(".")[0] if mod else "(root)"


def test_packages_import_only_downward():
    mods = _modules()
    bad = []
    for name, target, _, line in _imports(mods):
        a, b = _top(name), _top(target)
        if a == b or a not in FLOOR or b not in FLOOR:
            continue
        if b == "world" and a not in WORLD_USERS:
            bad.append(f"{name}:{line} imports the demo world ({target})")
        elif FLOOR[b] > FLOOR[a] or (FLOOR[b] == FLOOR[a] and (a, b) not in ALLOWED_SIDEWAYS):
            bad.append(f"{name}:{line} imports {target} ({a} may not import {b})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_core_imports_no_project_package():
    bad = [f"{n}:{line} -> {t}" for n, t, _, line in _imports(_modules()) if _top(n) == "core" and _top(t) != "core"]
    assert not bad, bad


def test_no_private_name_imported_across_packages():
    bad = [f"{n}:{line} imports {names} from {t}" for n, t, names, line in _imports(_modules())
           if _top(n) != _top(t) and any(x.startswith("_") and not x.startswith("__") for x in names)]
    assert not bad, "\n".join(bad)


def test_argparse_only_in_cli_and_scripts():
    bad = []
    for name, f in _modules().items():
        if _top(name) in ("cli", "scripts", "(root)"):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                bad.append(name)
            if isinstance(node, ast.ImportFrom) and node.module == "argparse":
                bad.append(name)
    assert not bad, f"argparse outside cli/: {sorted(set(bad))}"


def test_no_module_import_cycle():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, target, names, _ in _imports(mods):
        for cand in [f"{target}.{x}" for x in names] + [target]:
            c = cand
            while c and c not in mods and "." in c:
                c = c.rpartition(".")[0]
            if c in mods and c != name and not mods[c].name == "__init__.py":
                graph[name].add(c)
                break
    # Tarjan's strongly connected components
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                comps.append(sorted(comp))

    import sys
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not comps, f"module import cycles: {comps}"
