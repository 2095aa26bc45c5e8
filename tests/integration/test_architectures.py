"""
The warm start on each kind of model people run, against the real
llama-server with its default flags: a dense model, a sliding-window one
(gemma3) and two hybrids (qwen35's gated delta net, lfm2's short
convolution), and `-np 4` on a hybrid. Each runs the same scenarios side
by side with llama-server alone on the same model: cold start, switching
among more templates than slots, a system prompt before a template, a
conversation's next turn, a llama-server restart and a template edit.

Each asserts the prompt tokens llama-server computed: at most the message
and the chat tail for every templated request through bioproxy, never more
than alone in any scenario, and over the whole run, warmups and probes
included, at most 1.15 times what llama-server alone computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from bioproxy.testing.llamalog import promptTokens

from ..helpers import asyncTest, client, until
from ..stack import templateText
from .llama import LlamaServer
from .test_llama import RealStack, texts

R: Any = reactor
TEMPLATES = 5  # more than llama-server's 4 automatic slots
RULES = 20  # about 1,400 tokens a template: past gemma3's window and a ubatch
TAIL = 60  # the message and the chat tail of a short question, in tokens
TOTAL = 1.15  # all prompt tokens of a run, against llama-server alone's


class DenseModel(TestCase):
    """`llama-server -m model --slot-save-path DIR`, on a dense model."""

    timeout = 900
    arch = "llama"
    slots: int | None = None
    reuses = "any shared prefix"  # what the backend's restore probe finds
    restores = True  # a restart is warmed from the files
    # Tokens of the head a templated request may compute again: on a
    # sliding-window model, llama-server reuses a RAM-cache entry only up to
    # its last checkpoint, a few tokens before the head's end.
    slack = 0

    async def llamaServer(self) -> LlamaServer:
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        server = LlamaServer(R, directory, self.slots, arch=self.arch)
        await server.start()
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        return server

    async def exchange(self, url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.http.post(
            url + "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4, "temperature": 0},
        )
        body = json.loads(await response.content())
        self.assertEqual(response.code, 200, body)
        result: dict[str, Any] = body
        return result

    async def settled(self, stack: RealStack) -> None:
        """bioproxy's background work is done: what it costs is in its llama-server's log."""
        warmer = stack.service.getServiceNamed("warmup")
        await until(R, lambda: warmer.ready and not warmer.jobs and not warmer.wanted, 60, "warmups")

    @asyncTest
    async def test_everyScenario(self) -> None:
        self.http = client(self)
        ours, alone = await self.llamaServer(), await self.llamaServer()
        stack = RealStack(self, ours, texts(TEMPLATES, rules=RULES))
        await stack.allWarm()
        backend = (await (await stack.http.get(stack.admin + "/templates")).json())["backend"]
        self.assertEqual(backend["restore_reuses"], self.reuses, backend)
        self.assertEqual(backend["model"]["name"], self.arch, backend)
        spent: dict[str, list[int]] = {}

        def expanded(content: str) -> str:
            prefix, _, message = content.partition(" ")
            template = stack.texts.get(prefix)
            return template.replace("<{message}>", message) if template else content

        async def send(scenario: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
            """messages through bioproxy and to llama-server alone; prompt tokens of each counted."""
            through = await self.exchange(stack.proxy, messages)
            direct = await self.exchange(
                alone.url, [{**m, "content": expanded(m["content"])} for m in messages]
            )
            counts = spent.setdefault(scenario, [0, 0])
            counts[0] += through["timings"]["prompt_n"]
            counts[1] += direct["timings"]["prompt_n"]
            await self.settled(stack)
            return through

        async def templated(scenario: str, prefix: str, message: str) -> None:
            timings = (await send(scenario, [{"role": "user", "content": f"{prefix} {message}"}]))["timings"]
            self.assertLess(timings["prompt_n"], TAIL, (scenario, prefix, timings))
            await stack.assertBound(prefix, message, timings, self.slack)

        for prefix in stack.prefixes:
            await templated("cold", prefix, "the first question")
        for round in range(2):
            for prefix in stack.prefixes:
                await templated("switching", prefix, f"round {round}")

        system = {"role": "system", "content": "You answer as a ship's captain would. " * 20}
        for n, question in enumerate(("where are we?", "and the weather?", "how long to port?")):
            body = await send("system prompt first", [system, {"role": "user", "content": f"@t0 {question}"}])
            if n:  # its head is warm now, though other templates ran in between
                self.assertLess(body["timings"]["prompt_n"], TAIL + self.slack, (question, body["timings"]))
            for prefix in ("@t3", "@t4"):
                await templated("switching", prefix, f"in between {n}")

        first = [{"role": "user", "content": "@t1 tell me about the sea"}]
        reply = (await send("conversation", first))["choices"][0]["message"]["content"]
        await send(
            "conversation",
            [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}],
        )

        warmed, restored = stack.warmed(), stack.total("bioproxy_warmup_total", how="restore")
        self.assertEqual(warmed, TEMPLATES, "each template warmed once in this llama-server process")
        for server in (ours, alone):
            await server.stop()
            await server.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(warmed + TEMPLATES)
        self.assertEqual(
            stack.total("bioproxy_warmup_total", how="restore") - restored,
            TEMPLATES if self.restores else 0,
            "warmed from the files after the restart",
        )
        for prefix in stack.prefixes:
            await templated("restart", prefix, "after the restart")

        warmed = stack.warmed()
        stack.texts["@t2"] = templateText(2, "v2", rules=RULES)
        (stack.dir / "t2.txt").write_text(stack.texts["@t2"])
        await until(R, lambda: stack.warmed() > warmed, 30, "the edited template's warmup")
        await self.settled(stack)
        await templated("edit", "@t2", "after the edit")

        for scenario, (through, direct) in spent.items():
            self.assertLessEqual(through, direct, (scenario, spent))
        total = promptTokens(ours.logPath.read_bytes()), promptTokens(alone.logPath.read_bytes())
        self.assertLessEqual(total[0], TOTAL * total[1], (total, spent))
        self.assertEqual(stack.total("bioproxy_cache_misses_total"), 0)


class SlidingWindowModel(DenseModel):
    """gemma3, a 128-token window: restores give nothing, so templates are computed again after a restart."""

    arch = "gemma3"
    reuses = "nothing"
    restores = False
    slack = 8


class GatedDeltaNetHybrid(DenseModel):
    """qwen35: a restored file serves the requests that extend it, which every templated one does."""

    arch = "qwen35"
    reuses = "strict extensions"


class ShortConvolutionHybrid(GatedDeltaNetHybrid):
    arch = "lfm2"


class HybridExplicitSlots(GatedDeltaNetHybrid):
    """`-np 4` on qwen35: slots keep their contents; bioproxy pins, and restores into a slot to switch."""

    slots = 4
