"""The state file: learned heads and their files outlive a restart of bioproxy itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.state import StateFile
from bioproxy.testing.memory import Memory

TEMPLATE = "You are a careful reviewer. " * 30 + "\n<{message}>"
SYSTEM = "You speak as a pirate and never break character. " * 10


class StateFileTests(SynchronousTestCase):
    def start(self, directory: Path, path: Path) -> tuple[Memory, StateFile]:
        """A bioproxy (and, as after a reboot, a new llama-server) on the same disk."""
        m = Memory(directory, unified=True)
        m.book.maxConversations = 0  # learned heads alone (test_conversations keeps conversations)
        m.template("@t", TEMPLATE)
        state = StateFile(path, m.book, [("http://llama", m.cache)], m.clock)
        state.read()
        state.startService()
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        return m, state

    def ask(self, m: Memory, question: str) -> dict[str, Any]:
        body = {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"@t {question}"}]
        }
        status, answer = m.post("/v1/chat/completions", body)
        self.assertEqual(status, 200, answer)
        record: dict[str, Any] = m.completions()[-1]
        return record

    def test_learnedHeadsOutliveBioproxy(self) -> None:
        directory = Path(self.mktemp())
        path = directory / "state" / "state.json"
        m, state = self.start(directory, path)
        first = self.ask(m, "the first question")
        self.assertGreater(first["prompt_n"], 500)
        (variant,) = m.book.variantsOf("@t")
        m.advanceUntil(lambda: m.cache.saved(variant))
        state.stopService()
        written = json.loads(path.read_text())
        self.assertEqual([h["digest"] for h in written["heads"]], [m.book.entries[variant.name].shell.digest])

        again, _ = self.start(directory, path)
        self.assertEqual([h.name for h in again.book.variantsOf("@t")], [variant.name])
        self.assertEqual(again.metric("bioproxy_warmup_total", prefix=variant.name, how="restore"), 1)
        self.assertLess(self.ask(again, "after both restarted")["prompt_n"], 60)

    def test_writesOnlyChanges(self) -> None:
        directory = Path(self.mktemp())
        path = directory / "state.json"
        m, state = self.start(directory, path)
        m.clock.advance(state.interval)
        self.assertEqual(json.loads(path.read_text())["heads"], [])  # the template's file is known
        path.unlink()
        m.clock.advance(state.interval)
        self.assertFalse(path.exists(), "unchanged: not written again")
        self.ask(m, "a question")
        m.clock.advance(state.interval)
        self.assertEqual(len(json.loads(path.read_text())["heads"]), 1)
        path.unlink()
        self.ask(m, "another question")  # a use of the same head: it waits for the stop
        m.clock.advance(state.interval)
        self.assertFalse(path.exists())
        state.stopService()
        self.assertEqual([h["uses"] for h in json.loads(path.read_text())["heads"]], [2])

    def test_noStateFileStopsStartUp(self) -> None:
        """Issue 26, item 2: numbers past a float, Infinity, nesting past Python's limit."""
        entry = {"kind": "learned", "template": None, "digest": "ab" * 32, "last_used": 0, "file_bytes": 0}
        entry["view"] = {"messages": [{"role": "user", "content": "\u2063bioproxy-message\u2063"}]}

        def stateWith(head: dict[str, Any], old: str = "", new: str = "") -> str:
            heads = json.dumps(head).replace(old, new)
            return '{"format": 1, "files": [], "heads": [' + heads + "]}"

        message = '"content": "\\u2063bioproxy-message\\u2063"'
        held = {
            "uses 1e999": stateWith({**entry, "uses": 1}, '"uses": 1', '"uses": 1e999'),
            "uses Infinity": stateWith({**entry, "uses": 1}, '"uses": 1', '"uses": Infinity'),
            "nested": '{"format": 1, "heads": ' + "[" * 100000 + "]" * 100000 + "}",
            "nested view": stateWith(
                {**entry, "uses": 1, "kind": "conversation"}, message, '"content": ' + "[" * 5000 + "]" * 5000
            ),
        }
        for what, text in held.items():
            directory = Path(self.mktemp())
            directory.mkdir()
            path = directory / "state.json"
            path.write_text(text)
            m, state = self.start(directory, path)  # no exception: it starts
            self.assertEqual(m.book.entries, {}, what)
            state.stopService()
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_unreadableFileIsSetAside(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / "state.json"
        path.write_text("{not json")
        m, state = self.start(directory, path)
        self.assertEqual(m.book.entries, {})
        self.assertEqual((directory / "state.json.unreadable").read_text(), "{not json")
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        state.stopService()


class SeveralBackendsTests(SynchronousTestCase):
    def test_eachBackendsFilesAreKept(self) -> None:
        """Issues 16 and 27: with several backends, each one's saved files come back to it, by URL."""
        directory = Path(self.mktemp())
        path = directory / "state.json"
        first, second = Memory(directory / "a"), Memory(directory / "b")
        first.cache.files.update({"x.bin"})
        second.cache.files.update({"y.bin", "z.bin"})
        state = StateFile(
            path, first.book, [("http://a:1", first.cache), ("http://b:1", second.cache)], first.clock
        )
        state.write()
        written = json.loads(path.read_text())
        self.assertEqual(
            (written["format"], written["backends"]),
            (2, {"http://a:1": ["x.bin"], "http://b:1": ["y.bin", "z.bin"]}),
        )
        # Another order in the configuration: the files follow their URLs.
        again, other = Memory(directory / "c"), Memory(directory / "d")
        StateFile(
            path, again.book, [("http://b:1", other.cache), ("http://a:1", again.cache)], again.clock
        ).read()
        self.assertEqual((again.cache.files, other.cache.files), ({"x.bin"}, {"y.bin", "z.bin"}))
        second.cache.files.add("w.bin")  # a change of the second's alone is written
        path.unlink()
        state.write()
        self.assertIn("w.bin", json.loads(path.read_text())["backends"]["http://b:1"])

    def test_formatOneStillLoads(self) -> None:
        """The file of an earlier bioproxy: "files" were the first backend's, the rest by URL."""
        directory = Path(self.mktemp())
        path = directory / "state.json"
        directory.mkdir()
        path.write_text(
            json.dumps(
                {
                    "format": 1,
                    "heads": [],
                    "files": ["x.bin"],
                    "other_backends_files": {"http://b:1": ["y.bin"]},
                }
            )
        )
        first, second = Memory(directory / "a"), Memory(directory / "b")
        StateFile(
            path, first.book, [("http://a:1", first.cache), ("http://b:1", second.cache)], first.clock
        ).read()
        self.assertEqual((first.cache.files, second.cache.files), ({"x.bin"}, {"y.bin"}))
        self.assertTrue(path.exists(), "not set aside")


class PrivacyAndBudgetTests(SynchronousTestCase):
    def test_stateFileIsReadableByItsOwnerAlone(self) -> None:
        """It holds prompt text."""
        directory = Path(self.mktemp())
        path = directory / "state.json"
        m = Memory(directory, unified=True)
        state = StateFile(path, m.book, [("http://llama", m.cache)], m.clock)
        path.with_name("state.json.tmp").parent.mkdir(parents=True, exist_ok=True)
        path.with_name("state.json.tmp").write_text("{}")  # left over, world-readable
        path.with_name("state.json.tmp").chmod(0o644)
        state.write(force=True)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)

    def test_learnedBytesAreBounded(self) -> None:
        """max_learned_bytes counts the files' real sizes: past it, the least recently used head goes."""
        m = Memory(Path(self.mktemp()), unified=True)
        m.book.maxConversations = 0
        m.template("@t", TEMPLATE)
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        names = []
        for n in range(3):
            body = {
                "messages": [
                    {"role": "system", "content": f"You are voice {n}. " * 40},
                    {"role": "user", "content": f"@t question {n}"},
                ]
            }
            status, _ = m.post("/v1/chat/completions", body)
            self.assertEqual(status, 200)
            m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
            [entry] = [e for e in m.book.entries.values() if e.shell.name not in names]
            names.append(entry.shell.name)
            self.assertGreater(entry.bytes, 0, "its file's size is known")
            if n == 1:
                m.book.maxBytes = sum(e.bytes for e in m.book.entries.values())  # room for two
        self.assertEqual(list(m.book.entries), names[1:], "the least recently used went")
