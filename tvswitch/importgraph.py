"""The package's import graph, read from the source (lazy imports inside functions included).

    python -m tvswitch.importgraph [--modules]

prints which layer imports which (and with ``--modules`` every module's imports), then
the cycles (none) and the imports against the layers' direction (none).  The layers, top
to bottom: the CLI (``tvswitch.cli``, ``tvswitch.commands``), ``export``, ``runtime``,
``kernels``, and the shared base (``tvswitch.errors``, ``tvswitch.files``); an import
may only go down.  ``jetson`` is a leaf: it imports nothing of tvswitch outside itself,
so it runs on a device's system Python before anything else is installed.
tests/test_importgraph.py holds the tree to this.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

#: Folder of each part of the namespace (pyproject.toml's package-dir), from the repository root.
PARTS = {"tvswitch": "tvswitch", "tvswitch.commands": "tvswitch/commands", "tvswitch.export": "export",
         "tvswitch.runtime": "runtime", "tvswitch.runtime.bundle": "runtime/bundle",
         "tvswitch.runtime.engines": "runtime/engines", "tvswitch.kernels": "kernels", "tvswitch.jetson": "jetson"}
#: Layers from the top; a module may import its own layer and those below it.
LAYERS = ("cli", "export", "runtime", "kernels", "base")
LEAF = "jetson"


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("export", "runtime", "kernels", "jetson"):
        return parts[1]
    if module.startswith("tvswitch.commands") or module in ("tvswitch.cli", "tvswitch.__main__",
                                                               "tvswitch.importgraph"):
        return "cli"
    return "base"


def modules(root: str) -> Dict[str, str]:
    """Module name -> source file, for every module of the namespace."""
    found = {}
    for package, folder in PARTS.items():
        path = os.path.join(root, folder)
        for name in sorted(os.listdir(path)):
            if name.endswith(".py"):
                found[package if name == "__init__.py" else package + "." + name[:-3]] = os.path.join(path, name)
    return found


def _resolve(name: str, known: Set[str]) -> Optional[str]:
    """The longest known module a dotted import name refers to (``a.b.c`` -> ``a.b`` if ``c`` is a name)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: str, module: str, known: Set[str]) -> Set[str]:
    """The namespace's modules that ``path`` imports, anywhere in it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base + "." + a.name for a in node.names]  # a submodule, else a name of ``base``
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def graph(root: str) -> Dict[str, Set[str]]:
    found = modules(root)
    known = set(found)
    return {m: imports(p, m, known) for m, p in found.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work: List[Tuple[str, List[str]]] = [(start, sorted(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def against_direction(edges: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    """Imports that go up a layer, or out of the leaf."""
    bad = []
    for module, targets in sorted(edges.items()):
        src = layer_of(module)
        for target in sorted(targets):
            dst = layer_of(target)
            if src == LEAF or dst == LEAF:
                if src == LEAF and dst != LEAF:
                    bad.append((module, target))
                continue
            if LAYERS.index(dst) < LAYERS.index(src):
                bad.append((module, target))
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="every module's imports too")
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository root (default: this file's)")
    args = ap.parse_args(argv)
    edges = graph(args.root)
    counts: Dict[Tuple[str, str], int] = {}
    for module, targets in edges.items():
        for target in targets:
            pair = (layer_of(module), layer_of(target))
            counts[pair] = counts.get(pair, 0) + 1
    print("%d modules, %d imports between them" % (len(edges), sum(len(t) for t in edges.values())))
    for src in LAYERS + (LEAF,):
        row = ["%s (%d)" % (dst, counts[(src, dst)]) for dst in LAYERS + (LEAF,) if (src, dst) in counts]
        print("%-8s -> %s" % (src, ", ".join(row) or "nothing"))
    if args.modules:
        for module in sorted(edges):
            print("  %s -> %s" % (module, ", ".join(sorted(edges[module])) or "-"))
    found, bad = cycles(edges), against_direction(edges)
    print("cycles: %s" % ("; ".join(" -> ".join(c) for c in found) or "none"))
    print("against the layers: %s" % (", ".join("%s -> %s" % p for p in bad) or "none"))
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
