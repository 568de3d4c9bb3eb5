#!/usr/bin/env python3
"""Which top-level modules of a crate reach each other (issue #24).

Reads every .rs file under a crate's src/, drops test code (everything from a
`#[cfg(test)]` line on, which is where this project keeps its unit tests),
and records an edge A -> B for each `crate::B` path in module A, and for each
`super::B` in a file of a nested module of A. Prints the strongly connected
components with more than one module: each is a set of modules that all
reach each other, which cannot be read, tested or replaced alone.

    scripts/module-cycles.py server/src                 # report
    scripts/module-cycles.py server/src --max-largest 28  # CI: fail if it grows

`--max-largest N` exits 1 when the largest component has more than N
modules, so the knot can only shrink. It is a ratchet, not the goal: #24
asks for no cycle at all between top-level modules.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)::([a-z_][a-z0-9_]*)")
GROUP = re.compile(r"\b(crate|super)::\{([^}]*)\}")


def top_module(src: Path, file: Path) -> str | None:
    rel = file.relative_to(src).with_suffix("")
    parts = rel.parts
    if parts[0] in ("lib", "main"):
        return None  # the crate root declares modules; it is not one
    return parts[0]


def code_of(file: Path) -> str:
    lines = []
    for line in file.read_text(errors="replace").splitlines():
        if line.strip().startswith("#[cfg(test)]"):
            break
        # Comments and doc links name modules without depending on them.
        lines.append(line.split("//", 1)[0])
    return "\n".join(lines)


def graph(src: Path) -> dict[str, set[str]]:
    modules = {top_module(src, f) for f in src.rglob("*.rs")} - {None}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for f in src.rglob("*.rs"):
        m = top_module(src, f)
        if m is None:
            continue
        nested = len(f.relative_to(src).parts) > 1 and f.name != "mod.rs"
        text = code_of(f)
        refs = [(k, n) for k, n in PATH.findall(text)]
        for k, names in GROUP.findall(text):
            refs += [(k, n.strip().split("::")[0]) for n in names.split(",") if n.strip()]
        for kind, name in refs:
            if kind == "crate":
                target = name
            elif nested:
                target = name  # super:: from a nested file is a sibling in m
                if target not in modules:
                    continue
                target = m
            else:
                continue  # super:: at the top level is the crate root
            if target in modules and target != m:
                edges[m].add(target)
    return edges


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
            out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a crate's src/ directory")
    ap.add_argument("--max-largest", type=int, help="fail when the largest cycle has more modules")
    args = ap.parse_args()
    edges = graph(args.src)
    comps = sorted(components(edges), key=len, reverse=True)
    print(f"{args.src}: {len(edges)} top-level modules, {sum(len(e) for e in edges.values())} edges")
    if not comps:
        print("no cycle between top-level modules")
    for c in comps:
        print(f"cycle of {len(c)}: {' '.join(c)}")
    largest = len(comps[0]) if comps else 0
    if args.max_largest is not None and largest > args.max_largest:
        print(f"the largest cycle has {largest} modules, more than the allowed {args.max_largest}: "
              "a change made more modules depend on each other", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
