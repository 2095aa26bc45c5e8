"""The template poller on a Clock, against a real temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from bioproxy.metrics import Metrics
from bioproxy.templates import Sources, Template, TemplateLibrary
from bioproxy.watcher import TemplateWatcher


class _Watched(TestCase):
    """A watcher over @code (code.txt, including ref.md) in a temporary directory."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.write("code.txt", "CODE <{ref.md}> <{message}>")
        self.write("ref.md", "ref v1")
        self.clock = Clock()
        self.metrics = Metrics()
        self.library = TemplateLibrary()
        self.watcher = TemplateWatcher(
            self.library,
            {"@code": "code.txt"},
            Sources.build(self.dir, ["code.txt"], cwd=self.dir),
            self.clock,
            30,
            self.metrics,
            defer.maybeDeferred,
        )
        self.changes: list[Template] = []
        self.watcher.listeners.append(self.changes.append)
        self.watcher.loadAll()
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def write(self, name: str, text: str) -> None:
        path = self.dir / name
        path.write_text(text)
        # A fresh mtime even within the filesystem's timestamp granularity.
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    def rendered(self) -> str:
        return self.library.templates["@code"].render("m")


class WatcherTests(_Watched):
    def test_editTemplate(self) -> None:
        self.assertEqual(self.rendered(), "CODE ref v1 m")
        self.write("code.txt", "CODE2 <{message}>")
        self.clock.advance(29)
        self.assertEqual(self.rendered(), "CODE ref v1 m")
        self.clock.advance(1)
        self.assertEqual(self.rendered(), "CODE2 m")
        self.assertEqual([t.render("") for t in self.changes], ["CODE ref v1 ", "CODE2 "])
        self.assertEqual(self.watcher.status["@code"].lastChange, 30)

    def test_editInclude(self) -> None:
        self.write("ref.md", "ref v2")
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "CODE ref v2 m")
        self.assertEqual(len(self.changes), 2)

    def test_unchangedIsNotReported(self) -> None:
        self.clock.advance(300)
        self.assertEqual(len(self.changes), 1)

    def test_deleteKeepsLastGoodThenRecreate(self) -> None:
        (self.dir / "code.txt").unlink()
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "CODE ref v1 m")
        self.assertIn("does not exist", self.watcher.status["@code"].lastError or "")
        errors = self.metrics.registry.get_sample_value(
            "bioproxy_template_errors_total", {"prefix": "@code", "kind": "missing"}
        )
        self.assertEqual(errors, 1.0)
        self.clock.advance(30)  # the same error is not counted twice
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "bioproxy_template_errors_total", {"prefix": "@code", "kind": "missing"}
            ),
            1.0,
        )
        self.write("code.txt", "BACK <{message}>")
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "BACK m")
        self.assertIsNone(self.watcher.status["@code"].lastError)

    def test_brokenIncludeKeepsLastGood(self) -> None:
        (self.dir / "ref.md").unlink()
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "CODE ref v1 m")
        self.assertIn("'ref.md'", self.watcher.status["@code"].lastError or "")

    def test_reloadAddsAndRemoves(self) -> None:
        self.write("debug.txt", "DEBUG <{message}>")
        sources = Sources.build(self.dir, ["debug.txt"], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@debug": "debug.txt"}, sources))
        self.assertEqual(set(self.library.templates), {"@debug"})
        self.assertEqual(set(self.watcher.status), {"@debug"})
        self.assertIsNone(
            self.metrics.registry.get_sample_value("bioproxy_template_size_bytes", {"prefix": "@code"})
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value("bioproxy_template_size_bytes", {"prefix": "@debug"}),
            float(len("DEBUG ")),
        )

    def test_reloadWithBrokenNewTemplate(self) -> None:
        sources = Sources.build(self.dir, ["code.txt", "gone.txt"], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@code": "code.txt", "@gone": "gone.txt"}, sources))
        self.assertEqual(set(self.library.templates), {"@code"})
        self.assertIn("does not exist", self.watcher.status["@gone"].lastError or "")


class ReloadTests(_Watched):
    """Issue 13, item 7: a reload does what it says."""

    def test_reloadRepointsAPrefix(self) -> None:
        self.write("other.txt", "OTHER <{message}>")
        sources = Sources.build(self.dir, ["other.txt"], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@code": "other.txt"}, sources))
        self.assertEqual(self.rendered(), "OTHER m")
        self.assertEqual(self.watcher.status["@code"].path, self.dir / "other.txt")
        self.assertEqual([t.path.name for t in self.changes], ["code.txt", "other.txt"])

    def test_repointedToABrokenFileKeepsTheLastGood(self) -> None:
        sources = Sources.build(self.dir, ["gone.txt"], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@code": "gone.txt"}, sources))
        self.assertEqual(self.rendered(), "CODE ref v1 m")
        self.assertIn("does not exist", self.watcher.status["@code"].lastError or "")

    def test_narrowedRootsRecheckLoadedTemplates(self) -> None:
        shared = self.dir.parent / (self.dir.name + "-shared")
        shared.mkdir()
        (shared / "rules.md").write_text("shared rules")
        self.write("code.txt", f"CODE <{{{shared / 'rules.md'}}}> <{{message}}>")
        wide = Sources.build(self.dir, ["code.txt"], [shared], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@code": "code.txt"}, wide))
        self.assertEqual(self.rendered(), "CODE shared rules m")
        narrow = Sources.build(self.dir, ["code.txt"], cwd=self.dir)
        self.successResultOf(self.watcher.reload({"@code": "code.txt"}, narrow))
        self.assertNotIn("@code", self.library.templates)
        self.assertIn("outside the template roots", self.watcher.status["@code"].lastError or "")

    def test_repointedSymlinkIncludeIsNoticed(self) -> None:
        for name, text in (("a.md", "text A"), ("b.md", "text B")):
            self.write(name, text)
        stamp = (self.dir / "a.md").stat()
        os.utime(self.dir / "b.md", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same size, same time
        (self.dir / "ref.md").unlink()
        (self.dir / "ref.md").symlink_to("a.md")
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "CODE text A m")
        (self.dir / "ref.md").unlink()
        (self.dir / "ref.md").symlink_to("b.md")
        self.clock.advance(30)
        self.assertEqual(self.rendered(), "CODE text B m")
