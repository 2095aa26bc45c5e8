"""
The clients people use, through bioproxy to the real llama-server in its
default mode: the `openai` SDK with a system message first, the
`anthropic` SDK on /v1/messages, and the Responses API. Each gets its
template expanded and, on the repeat of its shape after other traffic and
after a llama-server restart, a warm start.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor, threads

from ..helpers import asyncTest, sdkStreams, sleep, until
from .test_llama import RealStack, RealTestCase, texts

R: Any = reactor
SYSTEM = "You answer as a ship's captain would, briefly and in the present tense. " * 12
CONTEXT = "Context: the project is a Python package, tested with trial. " * 2


def learned(stack: RealStack, name: str, **labels: str) -> float:
    """A per-prefix metric summed over the learned heads (labelled `@t0+…`, `~…`)."""
    registry = stack.service.getServiceNamed("warmup").metrics.registry
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
        and sample.labels.get("prefix", "") not in stack.prefixes
        and sample.labels.get("prefix", "")[:1] in ("@", "~")
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class ClientTests(RealTestCase):
    timeout = 300

    def closed(self, api: Any) -> Any:
        """Close a client's kept-alive connections, and let bioproxy see them go."""
        api.close()
        return defer.ensureDeferred(sleep(R, 0.2))

    def openai(self, stack: RealStack) -> Any:
        """The openai SDK's client on bioproxy, closed at the test's end."""
        import openai

        api = openai.OpenAI(base_url=stack.proxy + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(self.closed, api)
        return api

    async def stack(self) -> RealStack:
        stack = RealStack(self, await self.llamaServer(), texts(3))
        await stack.allWarm()
        return stack

    @asyncTest
    async def test_openaiSystemFirst(self) -> None:
        stack = await self.stack()
        api = self.openai(stack)

        def ask(content: str) -> Any:
            raw = api.chat.completions.with_raw_response.create(
                model="tiny",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                max_tokens=2,
                temperature=0,
            )
            self.assertEqual(raw.headers.get("x-bioproxy-template"), "@t0")
            return raw.parse().model_extra["timings"]

        first = await threads.deferToThread(ask, "@t0 the first question")
        for prefix in ("@t1", "@t2"):
            await stack.ask(prefix, "traffic in between")
        second = await threads.deferToThread(ask, "@t0 the second question")
        self.assertGreater(first["prompt_n"], 300, first)
        self.assertLess(second["prompt_n"], 60, second)
        await until(
            R, lambda: learned(stack, "bioproxy_kv_cache_saves_total") >= 1, what="the variant's save"
        )

        await stack.llama.stop()
        await stack.llama.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(6)
        await until(
            R,
            lambda: learned(stack, "bioproxy_warmup_total", how="restore") >= 1,
            what="the variant's restore",
        )
        after = await threads.deferToThread(ask, "@t0 after the restart")
        self.assertLess(after["prompt_n"], 60, after)

    @asyncTest
    async def test_anthropicMessages(self) -> None:
        import anthropic

        stack = await self.stack()
        api = anthropic.Anthropic(base_url=stack.proxy, api_key="unused", max_retries=0)
        self.addCleanup(self.closed, api)

        def ask(message: str, stream: bool) -> tuple[str | None, Any]:
            kwargs: dict[str, Any] = {
                "model": "tiny",
                "max_tokens": 2,
                "system": [{"type": "text", "text": SYSTEM}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": message}]}],
            }
            if stream:
                # llama-server 11434 sends message_start with the first
                # token's partial; when that partial is held back (a stop
                # string being matched) the stream has none, and no usage.
                raw = api.messages.with_raw_response.create(stream=True, **kwargs)
                events = list(raw.parse())
                self.assertEqual(events[-1].type, "message_stop")
                return raw.headers.get("x-bioproxy-template"), None
            raw = api.messages.with_raw_response.create(**kwargs)
            return raw.headers.get("x-bioproxy-template"), raw.parse().usage

        header, first = await threads.deferToThread(ask, "@t0 the first question", False)
        self.assertEqual(header, "@t0")
        await stack.ask("@t1", "traffic in between")
        header, _ = await threads.deferToThread(ask, "@t0 streamed", True)
        self.assertEqual(header, "@t0")
        await stack.ask("@t2", "more traffic in between")
        header, second = await threads.deferToThread(ask, "@t0 the second question", False)
        self.assertEqual(header, "@t0")
        self.assertGreater(first.input_tokens, 300, first)
        self.assertLess(second.input_tokens, 60, second)
        self.assertGreater(second.cache_read_input_tokens, 300, second)

    @asyncTest
    async def test_sdkStreams(self) -> None:
        """The anthropic SDK's messages.stream() and the openai SDK's Responses stream, as against the fake."""
        stack = await self.stack()
        got = await threads.deferToThread(sdkStreams, stack.proxy, "@t0 what does this do?")
        self.assertEqual(got["anthropic_final"][0], "assistant")
        self.assertEqual(got["anthropic_final"][1], got["anthropic_text"])
        self.assertEqual(got["responses_final"][0], "completed")
        self.assertEqual(got["responses_final"][1], got["responses_text"])
        kinds = got["responses_kinds"]
        self.assertEqual((kinds[0], kinds[-1]), ("response.created", "response.completed"))

    @asyncTest
    async def test_responses(self) -> None:
        stack = await self.stack()
        api = self.openai(stack)

        def ask(text: str) -> Any:
            raw = api.responses.with_raw_response.create(
                model="tiny", instructions=SYSTEM, input=text, max_output_tokens=2, temperature=0
            )
            self.assertEqual(raw.headers.get("x-bioproxy-template"), "@t0")
            return raw.parse().usage

        computed = "bioproxy_prompt_tokens_total"
        before = stack.metric(computed, prefix="@t0", kind="computed")
        first = await threads.deferToThread(ask, "@t0 the first question")
        await stack.ask("@t1", "traffic in between")
        second = await threads.deferToThread(ask, "@t0 the second question")
        # Counted from their usage by the dispatcher: they went through a lease.
        self.assertGreater(stack.metric(computed, prefix="@t0", kind="computed"), before)
        self.assertGreater(first.input_tokens - first.input_tokens_details.cached_tokens, 300, first)
        self.assertLess(second.input_tokens - second.input_tokens_details.cached_tokens, 60, second)

    @asyncTest
    async def test_claudeCodeShaped(self) -> None:
        """
        Claude Code's request shape: a billing-header block whose version
        suffix changes per conversation, its system prompt, tools, a
        `<system-reminder>` part before the user's prompt, a system message
        after it, `?beta=true`, a stream. A new conversation, and the first after a restart, compute
        only what follows the shared start.
        """
        stack = await self.stack()
        tools = [
            {
                "name": f"tool_{n}",
                "description": f"Does thing {n} to the files of the project, carefully. " * 4,
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
            }
            for n in range(4)
        ]

        async def conversation(suffix: str, prompt: str, stream: bool = False) -> dict[str, Any]:
            body = {
                "model": "tiny",
                "max_tokens": 2,
                "stream": stream,
                "system": [
                    {
                        "type": "text",
                        "text": f"x-anthropic-billing-header: cc_version=2.1.197.{suffix}; cc_entrypoint=cli;",
                    },
                    {
                        "type": "text",
                        "text": "You are an agent for software engineering. " * 40,
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
                "tools": tools,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "text",
                                "text": "<system-reminder>CLAUDE.md: keep it short.</system-reminder>",
                            },
                            {"type": "text", "text": prompt},
                        ],
                    },
                    # Claude Code follows the prompt with a system message of its own.
                    {"role": "system", "content": CONTEXT},
                ],
            }
            response = await stack.http.post(stack.proxy + "/v1/messages?beta=true", json=body)
            text = (await response.content()).decode()
            self.assertEqual(response.code, 200, text)
            if stream:
                # llama-server 11434 can leave message_start (the usage) out
                # of a stream; that it streams to the end is what is checked.
                self.assertIn('"message_stop"', text)
                return {}
            usage: dict[str, Any] = json.loads(text)["usage"]
            return usage

        # What follows the prompt is computed anew by every conversation; a
        # tiny-model token is at least a byte.
        after = 60 + len(CONTEXT.encode())
        first = await conversation("e77", "list the files")
        self.assertGreater(first["input_tokens"], 500, first)
        await conversation("c0f", "a streamed conversation", stream=True)
        await stack.ask("@t1", "traffic in between")
        second = await conversation("db3", "fix the failing test")
        self.assertLess(second["input_tokens"], after, second)

        await stack.llama.stop()
        await stack.llama.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(6)
        await until(
            R,
            lambda: learned(stack, "bioproxy_warmup_total", how="restore") >= 1,
            what="the learned head's restore",
        )
        restarted = await conversation("3d0", "write the release notes")
        self.assertLess(restarted["input_tokens"], after, restarted)
