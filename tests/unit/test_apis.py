"""
Each API's body shape through bioproxy to fakellama, in memory, in both of
llama-server's modes: the template is expanded where that API puts a
user's text, the request is scheduled (pinned only where llama-server
honours `id_slot`), its usage is read, and the next request is warm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.testing.memory import Memory

TEMPLATE = "You are a careful reviewer. " * 30 + "\n<{message}>"
SYSTEM = "You answer as a lighthouse keeper would. " * 10


def events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: {")]


class ApiTests(SynchronousTestCase):
    def memory(self, unified: bool) -> Memory:
        m = Memory(Path(self.mktemp()), unified=unified)
        m.template("@t", TEMPLATE)
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        return m

    def exchange(
        self, m: Memory, path: str, body: dict[str, Any], stream: bool
    ) -> tuple[Any, dict[str, Any]]:
        """The answer (events when streamed) and the fake's record of the completion."""
        before = len(m.completions())
        status, raw = m.postRaw(path, {**body, "stream": stream})
        self.assertEqual(status, 200, raw)
        self.assertEqual(len(m.completions()), before + 1, "one completion ran")
        answer = events(raw) if stream else json.loads(raw)
        return answer, m.completions()[-1]

    def test_anthropic(self) -> None:
        for unified in (True, False):
            for stream in (False, True):
                self.anthropic(unified, stream)

    def test_anthropicStreamWithoutUsage(self) -> None:
        for unified in (True, False):
            self.anthropic(unified, True, usage=False)

    def anthropic(self, unified: bool, stream: bool, usage: bool = True) -> None:
        m = self.memory(unified)
        m.fake.faults.noMessageStart = not usage

        def ask(question: str) -> tuple[Any, dict[str, Any]]:
            body = {
                "model": "m",
                "max_tokens": 2,
                "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "<reminder>"},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
            }
            return self.exchange(m, "/v1/messages", body, stream)

        answer, first = ask("@t the first question")
        where = (unified, stream)
        self.assertIn(TEMPLATE.split("\n")[0].encode(), first["prompt"], where)
        self.assertIsNone(first["pinned"], where)  # llama-server drops id_slot on this route
        if stream:
            self.assertEqual(answer[0]["type"] == "message_start", usage, where)
            self.assertEqual(answer[-1]["type"], "message_stop", where)
        else:
            self.assertEqual(answer["usage"]["input_tokens"], first["prompt_n"], where)
        _, second = ask("@t the second question")
        self.assertLess(second["prompt_n"], 60, where)
        variants = m.book.variantsOf("@t")
        self.assertEqual(len(variants), 1, where)
        m.advanceUntil(lambda: m.cache.saved(variants[0]))
        # Saved from the slot the first request left it in: no warmup computed it again.
        self.assertEqual(m.metric("bioproxy_warmup_total", prefix=variants[0].name, how="prefill"), 0, where)
        # The lease ended with the exchange, and the usage was counted.
        self.assertEqual([s.id for s in m.scheduler.slots if s.lease is not None], [], where)
        if usage:
            self.assertGreater(m.metric("bioproxy_prompt_tokens_total", prefix="@t", kind="cached"), 0, where)

    def test_responses(self) -> None:
        for unified in (True, False):
            for stream in (False, True):
                self.responses(unified, stream)

    def responses(self, unified: bool, stream: bool) -> None:
        m = self.memory(unified)

        def ask(question: str) -> tuple[Any, dict[str, Any]]:
            body = {
                "model": "m",
                "instructions": SYSTEM,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": question}]}],
                "max_output_tokens": 2,
            }
            return self.exchange(m, "/v1/responses", body, stream)

        answer, first = ask("@t the first question")
        where = (unified, stream)
        self.assertIn(TEMPLATE.split("\n")[0].encode(), first["prompt"], where)
        # Pinned where slots keep their contents, as chats are.
        self.assertEqual(first["pinned"] is not None, not unified, where)
        last = answer[-1]["response"] if stream else answer
        self.assertEqual(last["usage"]["input_tokens_details"]["cached_tokens"], first["cache_n"], where)
        _, second = ask("@t the second question")
        self.assertLess(second["prompt_n"], 60, where)
        self.assertEqual([s.id for s in m.scheduler.slots if s.lease is not None], [], where)

    def test_completionPrompt(self) -> None:
        for unified in (True, False):
            m = self.memory(unified)
            records = []
            for question in ("first", "second"):
                status, answer = m.post(
                    "/completion", {"prompt": f"@t the {question} question", "n_predict": 2}
                )
                self.assertEqual(status, 200, answer)
                records.append(m.completions()[-1])
            self.assertIn(TEMPLATE.split("\n")[0].encode(), records[0]["prompt"])
            self.assertLess(records[1]["prompt_n"], 60, (unified, records[1]))
