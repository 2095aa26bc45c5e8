"""
The plan of the code, checked (issue 27): bioproxy's modules in layers,
each importing only from its own layer or those below, and no import
circle, TYPE_CHECKING imports included.

- foundation: what every part uses (HTTP on both sides, templates, heads,
  bodies, metrics, errors, config);
- backend: `bioproxy/backend/`, built once per llama-server
  (backend.member.build);
- over the backends: the router, the proxy's resource, the operator's
  views, the state file;
- the program: the service that wires it all, the command, the plugin.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parents[2] / "bioproxy"

LAYERS = {
    "over": {"router", "models", "proxy", "snapshot", "state", "admin", "site"},
    "program": {"service", "reload", "tap", "cli", "__main__", "testing.memory"},
}
ORDER = ["foundation", "backend", "over", "program"]


def layerOf(module: str) -> str:
    """module: a dotted name under bioproxy ("backend.kvcache", "serve", "" for the package)."""
    if module == "backend" or module.startswith("backend."):
        return "backend"
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    return "foundation"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of other bioproxy modules, by dotted name under bioproxy."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1] if node.level > 1 else package
                    module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                elif node.module and node.module.startswith("bioproxy"):
                    module = node.module.removeprefix("bioproxy").lstrip(".")
                else:
                    continue
                targets = [module, *(f"{module}.{a.name}".lstrip(".") for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("bioproxy").lstrip(".")
                    for a in node.names
                    if a.name.startswith("bioproxy")
                ]
            found.update(t for t in targets if t in known and t != name)
        graph[name] = found
    return graph


class LayerTests(SynchronousTestCase):
    def test_noUpwardImport(self) -> None:
        known = modules()
        upward = [
            f"{name} ({layerOf(name)}) imports {target} ({layerOf(target)})"
            for name, targets in imports(known).items()
            for target in targets
            if ORDER.index(layerOf(target)) > ORDER.index(layerOf(name))
        ]
        self.assertEqual(upward, [])

    def test_noCircle(self) -> None:
        graph = imports(modules())
        circles = []
        for start in graph:
            stack, seen = [(start, [start])], set()
            while stack:
                node, path = stack.pop()
                for target in graph[node]:
                    if target == start:
                        circles.append(" -> ".join([*path, start]))
                    elif target not in seen:
                        seen.add(target)
                        stack.append((target, [*path, target]))
        self.assertEqual(circles, [])

    def test_theCheckSeesImports(self) -> None:
        """The graph is not empty by mistake: known edges of each kind are in it."""
        graph = imports(modules())
        self.assertIn("backend.process", graph["backend.kvcache"] | graph["backend"])
        self.assertIn("backend.scheduler", graph["router"])
        self.assertIn("heads", graph["body"])
        self.assertIn("serve", graph["errors"] | graph["forward"])

    def test_oneWriterOfCacheFacts(self) -> None:
        """
        A head's cache facts (WarmState) and the backend's known files are
        written by the KVCache alone; the warmer, the dispatcher and the
        state file report to it (issue 27: inRam was written from 8 places
        in two classes).
        """
        import dataclasses

        from bioproxy.backend.kvcache import WarmState

        fields = {f.name for f in dataclasses.fields(WarmState)}
        writes = []
        for name, path in modules().items():
            if name == "backend.kvcache":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                    targets = [node.target]
                for target in targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Attribute) and t.attr in fields and _aWarmState(t.value):
                            writes.append(f"{name}:{node.lineno} {ast.unparse(target)}")
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    owner = node.func.value
                    if (
                        node.func.attr in ("add", "update", "discard", "clear")
                        and isinstance(owner, ast.Attribute)
                        and owner.attr in ("files", "missing")
                    ):
                        writes.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
        self.assertEqual(writes, [])

    def test_cacheFactsAskNothing(self) -> None:
        """
        kvcache.py holds facts only: no coroutine, no Deferred, no call to
        llama-server's client and no file touched; what asks is cacheio.py.
        """
        tree = ast.parse(modules()["backend.kvcache"].read_text())
        found = [
            f"{type(node).__name__}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, (ast.AsyncFunctionDef, ast.Await))
            or (isinstance(node, ast.Attribute) and node.attr in ("llama", "unlink", "Deferred", "open"))
            or (isinstance(node, ast.ImportFrom) and node.module in ("twisted.internet", "pathlib", "os"))
            or (isinstance(node, ast.alias) and node.name in ("os", "pathlib", "twisted.internet"))
        ]
        self.assertEqual(found, [])
        io = ast.parse(modules()["backend.cacheio"].read_text())
        self.assertTrue(any(isinstance(node, ast.Await) for node in ast.walk(io)), "the check sees awaits")


def _aWarmState(value: ast.expr) -> bool:
    """How the code names a head's WarmState: `state`, `...state(head)`, `...states[key]`."""
    if isinstance(value, ast.Name):
        return value.id == "state"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        return value.func.attr == "state"
    return (
        isinstance(value, ast.Subscript)
        and isinstance(value.value, ast.Attribute)
        and value.value.attr == "states"
    )


class TestCaseNameTests(SynchronousTestCase):
    def test_eachSourceNamesItsTests(self) -> None:
        """Twisted's convention: each module's first line names the tests that cover it, and they exist."""
        root = PACKAGE.parent
        sources = [*PACKAGE.rglob("*.py"), *(root / "twisted").rglob("*.py")]
        wrong = []
        for path in sources:
            first = path.read_text().split("\n", 1)[0]
            if not (first.startswith("# -*- test-case-name: ") and first.endswith(" -*-")):
                wrong.append(f"{path.relative_to(root)}: no test-case-name line")
                continue
            for name in first.removeprefix("# -*- test-case-name: ").removesuffix(" -*-").split(","):
                if not (root / (name.strip().replace(".", "/") + ".py")).exists():
                    wrong.append(f"{path.relative_to(root)}: {name} does not exist")
        self.assertEqual(wrong, [])
