"""Rendering, includes and prefix matching."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from bioproxy.templates import Sources, TemplateError, TemplateLibrary, includeNames, load, render

# Text that may contain placeholder-looking pieces.
tricky = st.lists(
    st.sampled_from(list("ab <>{}/\n") + ["<{message}>", "<{x}>", "<{ inc }>", "<{/etc/passwd}>"]),
    max_size=20,
).map("".join)


class RenderTests(TestCase):
    @given(tricky, tricky)
    def test_neverRecursive(self, message: str, included: str) -> None:
        out = render("A<{message}>B<{ inc }>C", message, {"inc": included})
        self.assertEqual(out, "A" + message + "B" + included + "C")

    @given(st.text(max_size=200))
    def test_messageLandsVerbatim(self, message: str) -> None:
        self.assertEqual(render("<{message}>", message, {}), message)
        self.assertEqual(render("x <{ message }> y", message, {}), f"x {message} y")

    @given(tricky, tricky)
    def test_deterministic(self, template: str, message: str) -> None:
        includes = {name: f"[{name}]" for name in includeNames(template)}
        self.assertEqual(render(template, message, includes), render(template, message, dict(includes)))


class LoadTests(TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        (self.root / "conf" / "tpl").mkdir(parents=True)
        self.conf = self.root / "conf"

    def sources(self, *extra: Path) -> Sources:
        return Sources.build(self.conf, ["tpl/t.txt"], extra, cwd=self.root)

    def write(self, rel: str, text: str | bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def test_includeLookupOrder(self) -> None:
        t = self.write("conf/tpl/t.txt", "<{a.md}>|<{b.md}>|<{tpl/c.md}>")
        self.write("conf/tpl/a.md", "from template dir")
        self.write("conf/a.md", "config dir loses")
        self.write("conf/b.md", "from config dir")
        self.write("conf/tpl/c.md", "found via config dir")
        template = load("@t", t, self.sources())
        self.assertEqual(template.render(""), "from template dir|from config dir|found via config dir")
        self.assertEqual(template.includePaths["a.md"], (self.conf / "tpl/a.md").resolve())

    def test_workingDirectoryLastButConfined(self) -> None:
        t = self.write("conf/tpl/t.txt", "<{outside.md}>")
        self.write("outside.md", "in the working directory")
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources())
        self.assertEqual(e.exception.kind, "confined")
        template = load("@t", t, self.sources(self.root))
        self.assertEqual(template.render(""), "in the working directory")

    def test_symlinkEscapeRefused(self) -> None:
        secret = self.write("secret.txt", "top secret")
        os.symlink(secret, self.conf / "tpl" / "link.md")
        t = self.write("conf/tpl/t.txt", "<{link.md}>")
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources())
        self.assertIn("outside the template roots", str(e.exception))

    def test_missingIncludeNamesIt(self) -> None:
        t = self.write("conf/tpl/t.txt", "x <{nope.md}>")
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources())
        self.assertIn("'nope.md'", str(e.exception))
        self.assertIn("'@t'", str(e.exception))

    def test_invalidUtf8(self) -> None:
        t = self.write("conf/tpl/t.txt", b"ok \xff bad")
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources())
        self.assertEqual(e.exception.kind, "encoding")

    def test_sizeLimitCountsIncludes(self) -> None:
        t = self.write("conf/tpl/t.txt", "<{big.md}>")
        self.write("conf/tpl/big.md", "x" * 100)
        self.assertEqual(load("@t", t, self.sources(), maxBytes=100).size, 100)
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources(), maxBytes=99)
        self.assertEqual(e.exception.kind, "too_large")

    def test_tooLargeIsNotRead(self) -> None:
        """A file over the limit is refused by its size, before a byte of it is read."""
        t = self.write("conf/tpl/t.txt", "x" * 1000)
        reads: list[Path] = []
        original = Path.read_bytes

        def reading(path: Path) -> bytes:
            reads.append(path)
            return original(path)

        self.patch(Path, "read_bytes", reading)
        with self.assertRaises(TemplateError) as e:
            load("@t", t, self.sources(), maxBytes=999)
        self.assertEqual(e.exception.kind, "too_large")
        self.assertEqual(reads, [])

    def test_hashIsOfEmptyRendering(self) -> None:
        t = self.write("conf/tpl/t.txt", "A <{message}> B")
        first = load("@t", t, self.sources())
        self.write("conf/tpl/t.txt", "A <{message}> C")
        self.assertNotEqual(load("@t", t, self.sources()).hash, first.hash)


class MatchTests(TestCase):
    def library(self, root: Path, *prefixes: str) -> TemplateLibrary:
        root.mkdir(parents=True, exist_ok=True)
        lib = TemplateLibrary()
        for p in prefixes:
            path = root / f"{len(p)}.txt"
            path.write_text(p + ":<{message}>")
            lib.put(load(p, path, Sources.build(root, cwd=root)))
        return lib

    def test_longestPrefixWins(self) -> None:
        lib = self.library(Path(self.mktemp()), "@c", "@code")
        found = lib.match("@code   how?")
        assert found is not None
        self.assertEqual((found[0].prefix, found[1]), ("@code", "how?"))
        found = lib.match("@c how?")
        assert found is not None
        self.assertEqual(found[0].prefix, "@c")

    def test_needsWhitespaceOrEnd(self) -> None:
        lib = self.library(Path(self.mktemp()), "@code")
        self.assertIsNone(lib.match("@codex hi"))
        self.assertIsNone(lib.match("say @code hi"))
        found = lib.match("@code")
        assert found is not None
        self.assertEqual(found[1], "")
        found = lib.match("@code\nmulti\nline")
        assert found is not None
        self.assertEqual(found[1], "multi\nline")
