"""Templates in every API's shape, the chat view of each, and the heads learned from them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from bioproxy.body import Body
from bioproxy.expand import chatView, expand, marksBreakpoint, normaliseBillingHeader
from bioproxy.heads import MARK, MIN_LEARNED_TOKENS, HeadBook, Kind, estimatedTokens, locate, shellOf
from bioproxy.routes import ROUTES, Shape, route
from bioproxy.templates import Sources, Template, TemplateLibrary, load
from bioproxy.timings import TimingsReader

jsonValues = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


def library(root: Path) -> TemplateLibrary:
    root.mkdir()
    (root / "t.txt").write_text("T[<{message}>]")
    return TemplateLibrary([load("@t", root / "t.txt", Sources.build(root, cwd=root))])


class RouteTests(TestCase):
    def test_slotRoutes(self) -> None:
        for path in (
            b"/v1/messages",
            b"/v1/responses",
            b"/responses",
            b"/v1/chat/completions",
            b"/completion",
        ):
            found = route(b"POST", path)
            assert found is not None
            self.assertTrue(found.slot, path)
        messages = route(b"POST", b"/v1/messages")
        assert messages is not None
        self.assertFalse(messages.pins)
        counted = route(b"POST", b"/v1/messages/count_tokens")
        assert counted is not None
        self.assertFalse(counted.slot)
        self.assertIsNone(route(b"GET", b"/v1/messages"))
        self.assertIsNone(route(b"POST", b"/v1/some-future-route"))
        self.assertIn(b"/slots", ROUTES)


class ShapeTests(TestCase):
    def setUp(self) -> None:
        self.library = library(Path(self.mktemp()).absolute())

    def test_anthropic(self) -> None:
        body = {
            "system": [{"type": "text", "text": "@t sys"}, {"type": "text", "text": "rest"}],
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "@t q"}],
                },
                {"role": "assistant", "content": "@t not mine"},
            ],
            "max_tokens": 5,
        }
        self.assertEqual(expand(Shape.ANTHROPIC, body, self.library), "@t")
        self.assertEqual(body["system"][0]["text"], "T[sys]")
        self.assertEqual(body["messages"][0]["content"][1]["text"], "T[q]")
        self.assertEqual(body["messages"][0]["content"][0]["text"], "<reminder>")
        self.assertEqual(body["messages"][1]["content"], "@t not mine")
        view = chatView(Shape.ANTHROPIC, body)
        assert view is not None
        self.assertEqual(view.messages[0], {"role": "system", "content": "T[sys]rest"})

    def test_responses(self) -> None:
        body: dict[str, Any] = {
            "instructions": "@t be",
            "input": [
                {"role": "developer", "content": "@t dev"},
                {"role": "user", "content": [{"type": "input_text", "text": "@t q"}]},
            ],
        }
        self.assertEqual(expand(Shape.RESPONSES, body, self.library), "@t")
        self.assertEqual(body["instructions"], "T[be]")
        self.assertEqual(body["input"][0]["content"], "T[dev]")
        self.assertEqual(body["input"][1]["content"][0]["text"], "T[q]")
        view = chatView(Shape.RESPONSES, body)
        assert view is not None
        self.assertEqual(
            view.messages[:2],
            [
                {"role": "system", "content": "T[be]"},
                {"role": "developer", "content": [{"text": "T[dev]", "type": "text"}]},
            ],
        )
        plain = {"input": "@t x"}
        expand(Shape.RESPONSES, plain, self.library)
        self.assertEqual(plain, {"input": "T[x]"})

    @given(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in ("system", "messages")), jsonValues, max_size=5
        )
    )
    def test_anthropicRestSurvives(self, extra: dict[str, Any]) -> None:
        body = {**extra, "system": "@t s", "messages": [{"role": "user", "content": "@t m", "x": [1]}]}
        before = copy.deepcopy(body)
        expand(Shape.ANTHROPIC, body, self.library)
        self.assertEqual({k: v for k, v in body.items() if k not in ("system", "messages")}, extra)
        self.assertEqual(body["messages"][0], {**before["messages"][0], "content": "T[m]"})

    @given(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in ("instructions", "input")), jsonValues, max_size=5
        )
    )
    def test_responsesRestSurvives(self, extra: dict[str, Any]) -> None:
        body = {**extra, "input": [{"role": "user", "content": "@t m", "status": "x"}]}
        expand(Shape.RESPONSES, body, self.library)
        self.assertEqual({k: v for k, v in body.items() if k != "input"}, extra)
        self.assertEqual(body["input"], [{"role": "user", "content": "T[m]", "status": "x"}])

    def test_billingHeader(self) -> None:
        header = "x-anthropic-billing-header: cc_version=2.1.197.e77; cc_entrypoint=sdk-cli; cch=ab12c;"
        one = {"system": [{"type": "text", "text": header}, {"type": "text", "text": "You are"}]}
        other = {"system": [{"type": "text", "text": header.replace("e77", "db3").replace("ab12c", "99f00")}]}
        self.assertTrue(normaliseBillingHeader(one))
        self.assertTrue(normaliseBillingHeader(other))
        self.assertEqual(one["system"][0], other["system"][0])
        self.assertIn("cc_version=2.1.197.000;", one["system"][0]["text"])
        self.assertEqual(one["system"][1]["text"], "You are")
        untouched = {"system": "You are x-anthropic-billing-header: cch=ab12c;"}
        self.assertFalse(normaliseBillingHeader(untouched))


class HeadTests(TestCase):
    def setUp(self) -> None:
        self.library = library(Path(self.mktemp()).absolute())
        self.now = 0.0
        self.book = HeadBook(self.library, lambda: self.now, learnAfter=2, maxLearned=2)

    def shell(self, shape: Shape, body: dict[str, Any]) -> Any:
        position = locate(chatView(shape, body), self.library)
        expand(shape, body, self.library)
        return shellOf(shape, chatView(shape, body), position)

    def test_plainTemplateIsNoShell(self) -> None:
        self.assertIsNone(self.shell(Shape.CHAT, {"messages": [{"role": "user", "content": "@t x"}]}))

    def test_variantIgnoresTheMessage(self) -> None:
        a = self.shell(
            Shape.CHAT,
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "@t x"}]},
        )
        b = self.shell(
            Shape.CHAT,
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "@t y"}]},
        )
        c = self.shell(
            Shape.CHAT,
            {"messages": [{"role": "system", "content": "S2"}, {"role": "user", "content": "@t y"}]},
        )
        self.assertEqual(a.kind, Kind.VARIANT)
        self.assertEqual(a.name, b.name)
        self.assertNotEqual(a.name, c.name)
        head = self.book.observe(a, None)
        assert head is not None
        warm = head.warmBody(3)
        self.assertEqual(
            warm["messages"], [{"role": "system", "content": "S"}, {"role": "user", "content": "T[]"}]
        )
        self.assertEqual(warm["id_slot"], 3)
        self.assertIsNone(self.book.get(a.name))  # one use of two: not yet worth a warmup
        self.book.observe(b, None)
        self.assertEqual(self.book.get(a.name), head)

    def test_learnedHeadEndsBeforeThePrompt(self) -> None:
        system = "x" * 4 * MIN_LEARNED_TOKENS
        body = {
            "system": system,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "<r>"}, {"type": "text", "text": "hello"}],
                }
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        }
        shell = self.shell(Shape.ANTHROPIC, body)
        self.assertEqual(shell.kind, Kind.LEARNED)
        body["messages"][0]["content"][1]["text"] = "another prompt"
        self.assertEqual(self.shell(Shape.ANTHROPIC, body).name, shell.name)
        # Claude Code follows the prompt with a system message of its own.
        body["messages"].append({"role": "system", "content": "<context>" * 100})
        self.assertEqual(self.shell(Shape.ANTHROPIC, body).name, shell.name)
        head = self.book.observe(shell, None)
        assert head is not None and head.view is not None
        self.assertEqual(head.view.messages[-1]["content"][-1]["text"], MARK)
        self.assertEqual(head.view.head["tools"][0]["function"]["name"], "f")
        short = {"messages": [{"role": "system", "content": "short"}, {"role": "user", "content": "hi"}]}
        self.assertIsNone(self.shell(Shape.CHAT, short))

    def test_breakpointsMarkWhatIsWorthKeeping(self) -> None:
        """A cache_control breakpoint before the prompt keeps a short start, and from its first use."""

        def body(system: Any, parts: list[dict[str, Any]]) -> dict[str, Any]:
            return {"system": system, "messages": [{"role": "user", "content": parts}]}

        def shell(b: dict[str, Any]) -> Any:
            return shellOf(Shape.ANTHROPIC, chatView(Shape.ANTHROPIC, b), None, marksBreakpoint(b))

        prompt = {"type": "text", "text": "the question", "cache_control": {"type": "ephemeral"}}
        short = [{"type": "text", "text": "A short system prompt.", "cache_control": {"type": "ephemeral"}}]
        marked = shell(body(short, [prompt]))
        self.assertTrue(marked.marked)
        head = self.book.observe(marked, None)
        self.assertEqual(self.book.get(marked.name), head, "kept at its first use, though learn_after is 2")
        # A breakpoint only on the prompt marks the whole prompt, not a start to keep.
        self.assertIsNone(shell(body("A short system prompt.", [prompt])))
        reminder = {"type": "text", "text": "<reminder>", "cache_control": {"type": "ephemeral"}}
        self.assertTrue(shell(body("A short system prompt.", [reminder, prompt])).marked)

    def test_leastRecentlyUsedGoes(self) -> None:
        dropped: list[str] = []
        self.book.dropped.append(dropped.append)
        shells = [
            self.shell(
                Shape.CHAT,
                {"messages": [{"role": "system", "content": s}, {"role": "user", "content": "@t x"}]},
            )
            for s in "ABC"
        ]
        for shell in shells[:2]:
            self.book.observe(shell, None)
        self.book.observe(shells[0], None)
        self.book.observe(shells[2], None)
        self.assertEqual(dropped, [shells[1].name])
        self.assertEqual(set(self.book.entries), {shells[0].name, shells[2].name})


class UsageTests(TestCase):
    def test_anthropicStream(self) -> None:
        reader = TimingsReader()
        reader.feed(
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
            b'{"cache_read_input_tokens":90,"input_tokens":10,"output_tokens":0}}}\n\n'
        )
        reader.feed(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        self.assertEqual(reader.timings, {"cache_n": 90, "prompt_n": 10})

    def test_responses(self) -> None:
        reader = TimingsReader()
        reader.feed(b'{"usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":70}}}')
        self.assertEqual(reader.timings, {"cache_n": 70, "prompt_n": 30})

    def test_generatedFromAWholeAnswer(self) -> None:
        """What an answer generated finds the slot that holds it (CacheIO.slotHolding)."""
        reader = TimingsReader()
        reader.feed(b'{"usage":{"cache_read_input_tokens":90,"input_tokens":10,"output_tokens":24}}')
        self.assertEqual(reader.timings, {"cache_n": 90, "prompt_n": 10, "predicted_n": 24})


class ConversationTests(TestCase):
    """The clients' own names for a conversation, which placement uses where slots keep their contents."""

    def conversation(self, parsed: dict[str, Any]) -> str | None:
        return Body(b"", parsed).conversation

    def test_promptCacheKey(self) -> None:
        self.assertEqual(self.conversation({"prompt_cache_key": "019a-conv", "input": "hi"}), "019a-conv")

    def test_claudeCodeSession(self) -> None:
        user = json.dumps({"device_id": "d0", "account_uuid": "", "session_id": "ee24c542"})
        self.assertEqual(self.conversation({"metadata": {"user_id": user}}), "session:ee24c542")

    def test_noneGiven(self) -> None:
        for parsed in (
            {},
            {"metadata": {"user_id": "user-42"}},
            {"metadata": {"user_id": "{broken"}},
            {"prompt_cache_key": 3},
        ):
            self.assertIsNone(self.conversation(parsed), parsed)


class EstimatedTokensTests(TestCase):
    def test_anyScript(self) -> None:
        """A 1,000-token system prompt is learned in English and in Japanese; a short one in neither."""
        for text, learned in (
            ("You answer as a careful reviewer would. " * 100, True),  # about 1,000 tokens
            (
                "\u3042\u306a\u305f\u306f\u6ce8\u610f\u6df1\u3044\u30ec\u30d3\u30e5\u30a2\u30fc\u3067\u3059\u3002"
                * 70,
                True,
            ),
            ("Be brief. " * 20, False),
            ("\u7b80\u6d01\u3002" * 30, False),
        ):
            body = {"messages": [{"role": "system", "content": text}, {"role": "user", "content": "hello"}]}
            shell = shellOf(Shape.CHAT, chatView(Shape.CHAT, body), None)
            kept = shell is not None and not shell.short  # short by estimate: kept once measured long
            self.assertEqual(kept, learned, (estimatedTokens(text), text[:20]))


class ListingTests(TestCase):
    def test_variantsOfLooksAtTheEntriesAlone(self) -> None:
        """Issue 26, item 1: a listing asks each template for its variants; that must not render every template."""
        library = TemplateLibrary()
        book = HeadBook(library, lambda: 0.0)
        renders = [0]
        for i in range(50):
            library.put(_counting(f"@t{i}", renders))
        before = renders[0]
        for i in range(50):
            book.variantsOf(f"@t{i}")
        self.assertEqual(renders[0], before, "no template was rendered to list the variants")


class _Counted(Template):
    counter: list[int] = [0]

    def render(self, message: str) -> str:
        _Counted.counter[0] += 1
        return super().render(message)


def _counting(prefix: str, renders: list[int]) -> Template:
    _Counted.counter = renders
    return _Counted(prefix, Path(prefix), "<{message}>", {}, {}, {}, prefix * 4, 11)
