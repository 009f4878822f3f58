#!/usr/bin/env python3
"""The coordinator's modules may not import each other in a cycle.

Reads every `crate::<module>` reference in src/ (code, not comments) and
fails, naming the cycle, when a top-level module reaches itself again. The
pure core and the worker library are crates of their own (crates/), where
the compiler keeps the arrows; this keeps them inside the coordinator.
"""
import collections
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
uses = collections.defaultdict(set)
for folder, _, names in os.walk(ROOT):
    for name in names:
        if not name.endswith(".rs"):
            continue
        path = os.path.join(folder, name)
        top = os.path.relpath(path, ROOT).split(os.sep)[0].removesuffix(".rs")
        if top in ("lib", "main"):
            continue
        code = re.split(r"#\[cfg\(test\)\]", open(path).read())[0]
        for line in code.splitlines():
            line = line.split("//", 1)[0]
            for m in re.finditer(r"\bcrate::([a-z_]+)", line):
                if m.group(1) != top:
                    uses[top].add(m.group(1))

cycles = set()


def visit(module, path):
    for used in uses.get(module, ()):
        if used in path:
            cycle = path[path.index(used):]
            start = cycle.index(min(cycle))
            cycles.add(tuple(cycle[start:] + cycle[:start]))
        else:
            visit(used, path + [used])


for module in list(uses):
    visit(module, [module])
for cycle in sorted(cycles):
    print("import cycle: " + " -> ".join(cycle + (cycle[0],)))
sys.exit(1 if cycles else 0)
