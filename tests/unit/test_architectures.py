"""
Warmups and restores on each kind of model memory, in memory over fakellama
(bioproxy/testing/memory.py), which reuses slots as llama-server 11434 does for a
dense, a hybrid and a sliding-window model: what the restore probe
concludes, where a head's warmup ends, that no file is restored where it
cannot serve, and that reuse stopping at a checkpoint never warms a head again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend import Reuse
from bioproxy.backend.cacheio import FOLLOWERS, CacheIO
from bioproxy.backend.kvcache import KVCache
from bioproxy.backend.model import ModelFacts, factsOf, readFacts
from bioproxy.heads import MARK, templateHead
from bioproxy.metrics import Metrics
from bioproxy.testing import tinymodel
from bioproxy.testing.fakellama import chatPrompt
from bioproxy.testing.memory import Alone, Memory

from ..helpers import cacheFiles

TEMPLATE = "You are a careful reviewer. Follow every rule. " * 30 + "\nHere is the input: <{message}>"
KINDS = {"dense": Reuse.PREFIX, "hybrid": Reuse.EXTENSION, "swa": Reuse.NOTHING}
TAIL = 60


def warmed(test: SynchronousTestCase, memory: str, unified: bool = True, templates: int = 1) -> Memory:
    m = Memory(Path(test.mktemp()), unified=unified, memory=memory)
    for i in range(templates):
        m.template(f"@t{i}", TEMPLATE.replace("reviewer", f"reviewer {i}"))
    m.found()
    m.advanceUntil(lambda: m.warmer.ready and not m.warmer.jobs and not m.warmer.wanted)
    return m


def ask(m: Memory, content: str, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    status, answer = m.post(
        "/v1/chat/completions", {"messages": [*messages, {"role": "user", "content": content}]}
    )
    assert status == 200, answer
    m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
    message = content.split(" ", 1)[-1].encode()
    record: dict[str, Any] = [r for r in m.completions() if message in r["prompt"]][-1]
    return record


def warmups(m: Memory) -> float:
    return sum(m.metric("bioproxy_warmup_total", how=how) for how in ("prefill", "restore", "resident"))


class ProbeTests(SynchronousTestCase):
    def test_whatARestoreGivesIsProbed(self) -> None:
        for memory, reuse in KINDS.items():
            for unified in (True, False):
                m = warmed(self, memory, unified)
                self.assertEqual(m.backend.reuse, reuse, (memory, unified))
                self.assertEqual(m.backend.view()["restore_reuses"], reuse.value)

    def test_modelFactsFromTheHeader(self) -> None:
        """The GGUF header of each test model says what the probe finds."""
        expected = {
            "llama": Reuse.PREFIX,
            "gemma3": Reuse.NOTHING,
            "qwen35": Reuse.EXTENSION,
            "lfm2": Reuse.EXTENSION,
        }
        for arch in tinymodel.ARCHITECTURES:
            facts = readFacts(tinymodel.write(Path(self.mktemp()), arch=arch))
            self.assertEqual((facts.architecture, facts.expected()), (arch, expected[arch]))
        self.assertEqual(readFacts(tinymodel.write(Path(self.mktemp()), arch="gemma3")).slidingWindow, 128)

    def test_swaFullIsOnlyTrustedWithExtensions(self) -> None:
        """A sliding-window model whose file passes both probes (--swa-full) holds only the window."""
        m = Memory(Path(self.mktemp()), unified=True, memory="dense")
        m.backend.readModel = lambda path: defer.succeed(ModelFacts("gemma3", 1024, False))
        m.found()
        self.assertEqual(m.backend.reuse, Reuse.EXTENSION)
        self.assertIn("gemma3", m.backend.view()["model"]["name"])

    def test_recurrentKeys(self) -> None:
        self.assertTrue(factsOf({"general.architecture": "mamba2", "mamba2.ssm.state_size": 16}).recurrent)
        self.assertFalse(factsOf({"general.architecture": "llama", "llama.block_count": 2}).recurrent)


class BoundaryTests(SynchronousTestCase):
    def test_warmupEndsWhereTheMessageBegins(self) -> None:
        """What each warmup sends, and each file holds, is a prefix of every request that uses the head."""
        text = TEMPLATE.replace("reviewer", "reviewer 0")
        head = chatPrompt([{"role": "user", "content": text.replace("<{message}>", MARK)}]).partition(MARK)[0]
        for memory in KINDS:
            m = warmed(self, memory)
            warm = [r for r in m.completions() if r["prompt"].startswith(b"<|im_start|>user")][0]
            self.assertEqual(warm["prompt"], head.encode(), memory)
            request = ask(m, "@t0 what changed?")
            self.assertTrue(request["prompt"].startswith(warm["prompt"]), memory)

    def test_cutBackPastTokensThatMerge(self) -> None:
        """Where the text before the message ends in a token that merges with what follows, it is left out."""
        cache = KVCache(_MergingBackend(), Metrics())  # type: ignore[arg-type]
        cacheIO = CacheIO(cache, Metrics())
        m = Memory(Path(self.mktemp()))
        head = templateHead(m.template("@t", "Question:<{message}>"))
        tokens = _run(cacheIO.boundary(head))
        self.assertEqual(
            tokens, _merging("<|im_start|>user\nQuestion")
        )  # the ":" merges with a letter after it
        self.assertEqual(cache.state(head).reusable, len(tokens))

    @settings(max_examples=50, deadline=None)
    @given(st.text(min_size=1, max_size=40), st.sampled_from(FOLLOWERS))
    def test_boundaryIsAPrefixOfEveryRequest(self, before: str, message: str) -> None:
        """Whatever the text and the message's start, the request's tokens begin with the head's."""
        cache = KVCache(_MergingBackend(), Metrics())  # type: ignore[arg-type]
        cacheIO = CacheIO(cache, Metrics())
        m = Memory(Path(self.mktemp()))
        head = templateHead(m.template("@t", before.replace("<", "(") + "<{message}>"))
        tokens = _run(cacheIO.boundary(head))
        assert tokens is not None
        prompt = chatPrompt([{"role": "user", "content": before.replace("<", "(") + message + " rest"}])
        self.assertEqual(_merging(prompt)[: len(tokens)], tokens)


def _merging(text: str) -> list[int]:
    """A tokenizer in which a ':' or a space merges with the letter after it, as BPE merges do."""
    out: list[int] = []
    for char in text:
        if out and out[-1] in (ord(":"), ord(" ")) and char.isalpha():
            out[-1] = 100000 + out[-1] * 1000 + ord(char) % 1000
        else:
            out.append(ord(char))
    return out


class _MergingClient:
    async def applyTemplate(self, body: dict[str, Any]) -> str:
        return chatPrompt(body["messages"])

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        return _merging(text)


class _MergingBackend:
    llama = _MergingClient()
    fingerprint = "f"


def _run(work: Any) -> Any:
    results: list[Any] = []
    defer.ensureDeferred(work).addBoth(results.append)
    assert results, "not finished in memory"
    return results[0]


class ReuseTests(SynchronousTestCase):
    """Templated requests on each kind of model: the message and the tail, and no warm loops."""

    def test_firstUseAndSwitching(self) -> None:
        for memory in KINDS:
            for unified in (True, False):
                m = warmed(self, memory, unified, templates=6)
                for round in range(3):
                    for i in range(6):
                        record = ask(m, f"@t{i} round {round} for {i}")
                        self.assertLess(record["prompt_n"], TAIL, (memory, unified, round, i))
                self.assertEqual(warmups(m), 6, (memory, unified, "each template warmed once"))

    def test_restart(self) -> None:
        """Dense and hybrid models are warmed from their files; a sliding-window one by prefill, with no files."""
        for memory, reuse in KINDS.items():
            for unified in (True, False):
                m = warmed(self, memory, unified, templates=2)
                m.restarted()
                m.advanceUntil(lambda m=m: m.warmer.ready and not m.warmer.jobs and not m.warmer.wanted)
                restored = m.metric("bioproxy_warmup_total", how="restore")
                self.assertEqual(restored, 0 if reuse is Reuse.NOTHING else 2, (memory, unified))
                for i in range(2):
                    record = ask(m, f"@t{i} after the restart")
                    self.assertLess(record["prompt_n"], TAIL, (memory, unified, i))
                files = cacheFiles(m.dir / "slots")
                self.assertEqual(len(files), 0 if reuse is Reuse.NOTHING else 2, (memory, files))
                if reuse is Reuse.NOTHING:
                    state = m.cache.state(templateHead(m.library.templates["@t0"])).view(m.backend)
                    self.assertEqual(state["warmup_mode"], "prefill")
                    self.assertIn("sliding-window", state["warmup_mode_reason"])

    def test_checkpointMissIsNoReasonToWarm(self) -> None:
        """A request that reuses the head up to a checkpoint short of its end is counted, not re-warmed."""
        m = warmed(self, "hybrid", unified=True)
        head = templateHead(m.library.templates["@t0"])
        state = m.cache.state(head)
        assert state.reusable is not None
        self.assertEqual(
            m.cache.learn(head, None, {"cache_n": state.reusable * 7 // 10}, False, True), "checkpoint"
        )
        self.assertEqual(m.cache.learn(head, None, {"cache_n": 3}, False, True), "lost")
        self.assertEqual(m.cache.learn(head, None, {"cache_n": state.reusable}, False, True), "hit")
        self.assertTrue(state.inRam)

    def test_variantIsWarmedToItsBoundary(self) -> None:
        """
        A head learned from a request (a template behind a system prompt)
        is not saved from the slot that served it on a hybrid (that file
        would hold the message and the answer): it is warmed to its
        boundary, unpinned, so that llama-server takes the first request's
        RAM-cache entry to compute it (an older entry that shares as much
        would otherwise be chosen before it, and reused only up to a
        checkpoint).
        """
        for memory in ("dense", "hybrid", "swa"):
            m = warmed(self, memory, unified=True, templates=3)
            alone = Alone(m, unified=True, memory=memory)
            system = "You answer as a ship's captain would. " * 20
            spent = [0, 0]

            def direct(prefix: str, message: str, system: str | None = None, alone: Alone = alone) -> int:
                text = TEMPLATE.replace("reviewer", f"reviewer {prefix[2:]}").replace("<{message}>", message)
                messages = [{"role": "system", "content": system}] if system else []
                body = {"messages": [*messages, {"role": "user", "content": text}]}
                return int(alone.post("/v1/chat/completions", body)["prompt_n"])

            for n, question in enumerate(("where are we?", "and the weather?", "how long to port?")):
                computed = ask(m, f"@t0 {question}", system)["prompt_n"]
                if n:  # other templates in between, then the variant again: its boundary is found
                    self.assertLess(computed, TAIL, (memory, question))
                spent[0] += computed
                spent[1] += direct("@t0", question, system)
                for other in ("@t1", "@t2"):  # the same traffic to both
                    ask(m, f"{other} in between {n}")
                    direct(other, f"in between {n}")
            self.assertLessEqual(spent[0], spent[1], memory)
            [variant] = m.book.variantsOf("@t0")
            saves = [a for a in m.fake.actions if a[0] == "save" and a[2].startswith("_t0_")]
            self.assertEqual(len(saves), 0 if memory == "swa" else 1, memory)
            if memory == "swa":
                continue
            held = (m.dir / "slots" / saves[0][2]).read_bytes().partition(b"\n")[2]
            # Dense: the served slot is the file (a prefix serves any request that shares it).
            # Hybrid: the boundary, which every request extends.
            boundary = len(held) == m.cache.state(variant).reusable
            self.assertEqual(boundary, memory == "hybrid", (memory, len(held)))


class ProbeFailureTests(SynchronousTestCase):
    def test_aRefusedSaveLeavesReuseUnknown(self) -> None:
        """A slot directory llama-server cannot write: the probe still ends, and the backend is ready."""
        m = Memory(Path(self.mktemp()), unified=True, memory="hybrid")
        m.fake.saveDir = m.dir / "slots" / "missing"  # a save there fails as llama-server's does
        m.found()
        self.assertTrue(m.backend.ready)
        self.assertEqual(m.backend.reuse, Reuse.UNKNOWN)


class StoppedTests(SynchronousTestCase):
    def test_aRequestEndingAsBioproxyStopsStartsNoSave(self) -> None:
        """Its slot is not saved once the warmer has stopped: nothing may outlive the service's HTTP pool."""
        m = warmed(self, "dense")
        m.warmer.stopService()
        status, _ = m.post(
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "Be terse. " * 30},
                    {"role": "user", "content": "@t0 hi"},
                ]
            },
        )
        self.assertEqual(status, 200)
        self.assertEqual(m.warmer.jobs, {})
        self.assertEqual([a for a in m.fake.actions if a[0] == "save" and a[2].startswith("_t0_")], [])
