"""
What a user is in the middle of survives a llama-server restart, against
the real llama-server with its default flags, on a dense and a hybrid
model: a conversation's next turn, a Claude Code-shaped agent session
(/v1/messages, tools, tool results, its session_id) and a Codex-shaped one
(/v1/responses, function calls, prompt_cache_key), each resumed after a
restart, computing at most its last answer and its new message, where
llama-server alone computes all of it.

"At most its last answer and its new message" is measured by llama-server
itself: its token count of the resumed request less that of the one before
it (the count endpoints of each API).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ..helpers import asyncTest, client, sleep, until
from .llama import LlamaServer
from .test_llama import RealStack, texts

R: Any = reactor
SYSTEM = "You are a patient assistant who answers every question in full, citing the manual. " * 30
AGENT = "You are an agent for software engineering. Use the tools; report what you changed. " * 30
TOOLS = [
    {
        "name": f"tool_{n}",
        "description": f"Does thing {n} to the files of the project, carefully. " * 3,
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for n in range(3)
]
IDLE = 0.3  # conversation_idle: seconds without a turn before a conversation is saved


def computedTokens(answer: dict[str, Any]) -> int:
    """The prompt tokens llama-server computed for an answer, in each API's own terms."""
    if "timings" in answer:
        return int(answer["timings"]["prompt_n"])
    usage = answer["usage"]
    if "cache_read_input_tokens" in usage:  # Anthropic: input_tokens are those not read from the cache
        return int(usage["input_tokens"])
    return int(usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"])


class DenseResume(TestCase):
    """`llama-server -m model --slot-save-path DIR`, a dense model."""

    timeout = 600
    arch = "llama"

    async def setUpStack(self) -> None:
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        self.llama = LlamaServer(R, directory, None, arch=self.arch)
        await self.llama.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.llama.stop()))
        self.stack = RealStack(self, self.llama, {}, conversation_idle=IDLE)
        self.http = client(self)
        await self.ready()

    async def ready(self) -> None:
        warmer = self.stack.service.getServiceNamed("warmup")
        await until(R, lambda: warmer.ready and not warmer.jobs and not warmer.wanted, 60, "ready")

    async def post(self, base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(base + path, json=body)
        answer = json.loads(await response.content())
        self.assertEqual(response.code, 200, answer)
        result: dict[str, Any] = answer
        return result

    async def count(self, path: str, body: dict[str, Any]) -> int:
        """llama-server's own count of the prompt tokens of body."""
        counted = await self.post(self.llama.url, path, body)
        return int(counted.get("input_tokens", counted.get("tokens", -1)))

    async def saved(self) -> None:
        """The last turn's conversation (the longest kept) is saved: it went idle, and the warmer is done."""
        warmer = self.stack.service.getServiceNamed("warmup")
        last: list[bool] = [False]

        async def check() -> None:
            view = await (await self.http.get(self.stack.admin + "/templates")).json()
            kept = view["conversations"]["conversations"]
            longest = max(kept, key=lambda c: c["messages"]) if kept else None
            last[0] = longest is not None and longest["file_bytes"] > 0 and not warmer.jobs

        for _ in range(300):
            await check()
            if last[0]:
                return
            await sleep(R, 0.1)
        self.fail("the conversation's last turn was never saved")

    async def restart(self) -> None:
        restarts = self.stack.metric("bioproxy_backend_restarts_total")
        await self.llama.stop()
        await self.llama.start()
        await until(R, lambda: self.stack.metric("bioproxy_backend_restarts_total") > restarts, 30, "restart")
        await self.ready()

    async def resumed(self, path: str, countPath: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        """after, the turn that follows before, sent after a restart: it computes what was added, and no more."""
        await self.saved()
        await self.restart()
        added = await self.count(countPath, after) - await self.count(countPath, before)
        whole = await self.count(countPath, after)
        answer = await self.post(self.stack.proxy, path, after)
        computed = computedTokens(answer)
        self.assertLessEqual(computed, 1.1 * added + 8, (computed, added, whole))
        self.assertGreater(whole, 5 * added, "the test means something: most of it was restored")

    @asyncTest
    async def test_conversation(self) -> None:
        await self.setUpStack()
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        body: dict[str, Any] = {}
        for turn in range(4):
            messages.append({"role": "user", "content": f"Question {turn}: how is step {turn} done?"})
            body = {"messages": list(messages), "max_tokens": 24, "temperature": 0}
            answer = await self.post(self.stack.proxy, "/v1/chat/completions", body)
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": "And after the restart, what comes next?"})
        after = {"messages": messages, "max_tokens": 4, "temperature": 0}
        await self.resumed("/v1/chat/completions", "/v1/chat/completions/input_tokens", body, after)

    @asyncTest
    async def test_claudeCodeSession(self) -> None:
        """Many turns of tool calls and results, on /v1/messages with Claude Code's session_id."""
        await self.setUpStack()
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "text", "text": "Fix the failing test, please."}]}
        ]
        metadata = {"user_id": json.dumps({"session_id": "3f2a-session"})}

        def request(messages: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
            return {
                "model": "tiny",
                "max_tokens": tokens,
                "system": [{"type": "text", "text": AGENT, "cache_control": {"type": "ephemeral"}}],
                "tools": TOOLS,
                "messages": messages,
                "metadata": metadata,
            }

        body: dict[str, Any] = {}
        for turn in range(5):
            body = request(list(messages), 16)
            answer = await self.post(self.stack.proxy, "/v1/messages", body)
            said = [b for b in answer["content"] if b.get("type") == "text"]
            call = {
                "type": "tool_use",
                "id": f"call_{turn}",
                "name": "tool_1",
                "input": {"path": f"f{turn}.py"},
            }
            messages.append({"role": "assistant", "content": [*said, call]})
            result = {"type": "tool_result", "tool_use_id": f"call_{turn}", "content": f"ok: line {turn}"}
            messages.append({"role": "user", "content": [result]})
        after = request(messages, 4)
        await self.resumed("/v1/messages", "/v1/messages/count_tokens", body, after)

    @asyncTest
    async def test_codexSession(self) -> None:
        """Function calls and their outputs, on /v1/responses with prompt_cache_key."""
        await self.setUpStack()
        items: list[dict[str, Any]] = [{"role": "user", "content": "Rename the module, please."}]

        def request(items: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
            return {
                "model": "tiny",
                "instructions": AGENT,
                "input": items,
                "max_output_tokens": tokens,
                "prompt_cache_key": "codex-session-1",
                "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
            }

        body: dict[str, Any] = {}
        for turn in range(5):
            body = request(list(items), 16)
            answer = await self.post(self.stack.proxy, "/v1/responses", body)
            said = [o for o in answer["output"] if o.get("type") == "message"]
            items.extend({k: v for k, v in o.items() if k != "id"} for o in said)
            call = {
                "type": "function_call",
                "call_id": f"c{turn}",
                "name": "shell",
                "arguments": '{"cmd":"ls"}',
            }
            items.append(call)
            items.append({"type": "function_call_output", "call_id": f"c{turn}", "output": f"file{turn}.py"})
        after = request(items, 4)
        await self.resumed("/v1/responses", "/v1/responses/input_tokens", body, after)


class HybridResume(DenseResume):
    """qwen35 (gated delta net): a file serves only the requests that extend it."""

    arch = "qwen35"


class FirstSecondAfterARestart(TestCase):
    """
    A client whose request failed while llama-server was down sends it again
    the moment the new process answers: before any poll of bioproxy's has
    seen that process (the poll is made rare here), the request restores its
    template's file, and computes only its message.
    """

    timeout = 300

    @asyncTest
    async def test_requestRightAfterTheRestart(self) -> None:
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        llama = LlamaServer(R, directory, None)
        await llama.start()
        self.addCleanup(lambda: defer.ensureDeferred(llama.stop()))
        stack = RealStack(self, llama, texts(2), health_check_interval=600)
        await stack.allWarm()
        await llama.stop()
        response = await stack.http.post(
            stack.proxy + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "@t0 hi"}]}
        )
        self.assertEqual(response.code, 502, "llama-server is down")
        await response.content()
        await llama.start()  # returns once llama-server answers /health
        timings = await stack.ask("@t0", "the first question after the restart")
        await stack.assertBound("@t0", "the first question after the restart", timings)
        self.assertEqual(stack.metric("bioproxy_backend_restarts_total"), 1)
