"""
The layout is the architecture: these tests read every module's imports
(at any depth, type-checking ones included) and fail if a layer reaches
where it must not, or if two modules import each other, directly or round
a loop.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

from twisted.trial.unittest import SynchronousTestCase

from tests.support import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "broadcaster")

#: What the domain may import from outside itself: Deferreds, time, logging
#: and Pillow, nothing that touches the network.
CORE_ALLOWED = ("twisted.internet.defer", "twisted.internet.interfaces", "twisted.logger", "PIL")

#: Which layers each layer may import (besides itself).
LAYERS = {
    "core": set(),
    "protocols": {"core"},
    "http": {"core", "protocols"},
    "redis": {"core"},
    "clients": {"core", "protocols"},
    "service": {"core", "protocols", "http", "redis"},
}


def modules() -> Dict[str, str]:
    """Every module of the package, by dotted name, to its file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: Set[str]) -> Set[str]:
    """The modules ``path`` imports: of this package, resolved to modules; others as named."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = "{}.{}".format(node.module, alias.name)
                found.add(candidate if candidate in known else node.module)
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


class LayerTests(SynchronousTestCase):
    def setUp(self):
        self.modules = modules()
        self.graph = {
            name: {m for m in imports(path, set(self.modules)) if m in self.modules}
            for name, path in self.modules.items()
        }

    def test_the_domain_imports_no_networking(self):
        """broadcaster.core imports nothing but itself, Deferreds, time, logging and Pillow."""
        for name, path in self.modules.items():
            if layer(name) != "core":
                continue
            for imported in imports(path, set(self.modules)):
                if imported.startswith("broadcaster."):
                    self.assertEqual(layer(imported), "core", "{} imports {}".format(name, imported))
                elif imported.split(".")[0] in ("twisted", "autobahn", "txredisapi", "treq", "PIL", "zope"):
                    self.assertTrue(
                        imported.startswith(CORE_ALLOWED), "{} imports {}".format(name, imported)
                    )
                else:
                    self.assertNotIn(imported.split(".")[0], ("socket", "ssl", "select"), name)

    def test_layers_import_only_those_below(self):
        """Each layer imports only the layers it builds on (core at the bottom, service at the top)."""
        for name, targets in self.graph.items():
            own = layer(name)
            if own not in LAYERS:
                continue
            for target in targets:
                other = layer(target)
                if other and other != own:
                    self.assertIn(other, LAYERS[own], "{} imports {}".format(name, target))

    def test_no_import_cycles(self):
        """No two modules import each other, directly or through others."""
        cycles = _cycles(self.graph)
        self.assertEqual(cycles, [], "import cycles: {}".format(cycles))

    def test_the_plugin_imports_only_a_service_maker(self):
        """The twistd dropin names the service module and imports nothing of ours."""
        path = os.path.join(REPO_ROOT, "twisted", "plugins", "broadcaster_plugin.py")
        self.assertEqual(imports(path, set()), {"twisted.application.service"})


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            # A package's __init__ is imported by its modules' imports.
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
