"""An import-linter contract: no import cycle between the modules of a package.

import-linter's own `acyclic_siblings` folds each subpackage into one node (all of `sft.data`
is one sibling of `sft.config`), so it also refuses layering that is not a cycle between
modules. This contract looks at modules: within each listed package, no module imports
(directly or through others, lazily inside a function or under TYPE_CHECKING included) a
module that imports it back (STYLE.md 15). Registered in pyproject.toml's `contract_types`;
`lint-imports` puts the repository root on sys.path, so run it from there:

    $ PYTHONPATH=... .venvs/torch/bin/lint-imports
"""

from __future__ import annotations

from typing import Any

from importlinter import Contract, ContractCheck, fields, output


class ModuleCyclesContract(Contract):
    type_name = "no_module_cycles"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        cycles = {}
        for package in self.packages:  # type: ignore[attr-defined]
            modules = graph.find_descendants(package) | {package}
            found = [(sorted(scc), _example(graph, sorted(scc))) for scc in _cycles(graph, modules)]
            if found:
                cycles[package] = found
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for package, found in check.metadata["cycles"].items():
            for members, chain in found:
                output.print_error(f"{package}: import cycle among {', '.join(members)}")
                output.print(f"  for example {' -> '.join(chain)}")
                output.new_line()


def _cycles(graph: Any, modules: set[str]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(_imports(graph, root, modules))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        scc.add(m)
                        if m == node:
                            break
                    if len(scc) > 1:
                        out.append(scc)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(_imports(graph, child, modules)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def _imports(graph: Any, module: str, within: set[str]) -> set[str]:
    return graph.find_modules_directly_imported_by(module) & within


def _example(graph: Any, members: list[str]) -> list[str]:
    """One concrete cycle through the first member, module by module."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth-first within the component, back to `start`
        node = queue.pop(0)
        for nxt in sorted(_imports(graph, node, inside)):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return members
