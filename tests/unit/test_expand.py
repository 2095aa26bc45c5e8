"""Expansion inside request bodies keeps everything else as it was."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from bioproxy.expand import BadRequest, expand, parseBody
from bioproxy.routes import Shape
from bioproxy.templates import Sources, TemplateLibrary, load

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
plain_text = st.text(max_size=30).filter(lambda t: not t.startswith("@t"))
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": plain_text | st.just("@t hello"),
        },
        optional={"name": st.text(max_size=5)},
    ),
    max_size=5,
)


class ExpandTests(TestCase):
    def setUp(self) -> None:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        (root / "t.txt").write_text("T[<{message}>]")
        self.library = TemplateLibrary([load("@t", root / "t.txt", Sources.build(root, cwd=root))])

    @given(
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "messages"), json_values, max_size=5),
        messages,
    )
    def test_everythingElseSurvives(self, extra: dict[str, object], msgs: list[dict[str, str]]) -> None:
        body = {**extra, "messages": msgs}
        before = copy.deepcopy(body)
        used = expand(Shape.CHAT, body, self.library)
        self.assertEqual({k: v for k, v in body.items() if k != "messages"}, extra)
        self.assertEqual(len(body["messages"]), len(before["messages"]))
        expandedAny = False
        for old, new in zip(before["messages"], body["messages"], strict=True):
            if old["role"] in ("user", "system") and old["content"] == "@t hello":
                self.assertEqual(new, {**old, "content": "T[hello]"})
                expandedAny = True
            else:
                self.assertEqual(new, old)
        self.assertEqual(used, "@t" if expandedAny else None)

    def test_everyTextPartThatStartsWithAPrefix(self) -> None:
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:"}},
                        {"type": "text", "text": "@t look"},
                        {"type": "text", "text": "@t not me"},
                    ],
                }
            ]
        }
        self.assertEqual(expand(Shape.CHAT, body, self.library), "@t")
        parts = body["messages"][0]["content"]
        self.assertEqual([p.get("text") for p in parts], [None, "T[look]", "T[not me]"])

    def test_prompt(self) -> None:
        body = {"prompt": "@t go", "n_predict": 3}
        self.assertEqual(expand(Shape.PROMPT, body, self.library), "@t")
        self.assertEqual(body, {"prompt": "T[go]", "n_predict": 3})
        unknown = {"prompt": "@other go"}
        self.assertIsNone(expand(Shape.PROMPT, unknown, self.library))
        self.assertEqual(unknown, {"prompt": "@other go"})

    def test_badBodies(self) -> None:
        for raw in (b"{not json", b"\xff\xfe", b"[1, 2]"):
            with self.assertRaises(BadRequest):
                parseBody(raw)
        for body in (
            {"messages": "hi"},
            {"messages": [1]},
            {"messages": [{"role": "user", "content": 5}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            {},
        ):
            with self.assertRaises(BadRequest):
                expand(Shape.CHAT, json.loads(json.dumps(body)), self.library)
