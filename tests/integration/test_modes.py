"""
The warm start on every llama-server configuration users run, against the
real server on the tiny model: llama-server's default first (auto slots,
unified KV, idle slots cleared into its RAM cache), then explicit slots,
one slot, no RAM cache, no idle-slot caching, no --slot-save-path, and
--api-key. Each runs the same scenarios: cold start, switching among more
templates than slots, a template edit, a backend restart, a conversation's
second turn and a repeated untemplated system prompt after other traffic
(never more recomputed, and never more idle slots copied, than through
llama-server alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from bioproxy.testing import llamalog

from ..helpers import asyncTest, client, sleep, until
from ..stack import templateText
from .llama import LlamaServer
from .test_llama import RealStack, texts

R: Any = reactor
KEY = "integration-secret"


def ramCopies(server: LlamaServer) -> int:
    """Slot states llama-server has copied into its RAM cache so far (bioproxy.testing.llamalog)."""
    return llamalog.ramCopies(server.logPath.read_bytes())


class DefaultServer(TestCase):
    """`llama-server -m model -c N --slot-save-path DIR`: what its README shows."""

    timeout = 300
    slots: int | None = None
    flags: tuple[str, ...] = ()
    persistent = True
    apiKey: str | None = None
    mode = "cleared"
    pinned = False
    copiesCompared = True  # never more slot states copied into the RAM cache than alone

    async def llamaServer(self, debug: bool = False) -> LlamaServer:
        """debug: llama-server logs at debug level, which says when it copies a slot's state."""
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        flags = self.flags + (llamalog.VERBOSITY if debug else ())
        server = LlamaServer(
            R, directory, self.slots, flags=flags, persistent=self.persistent, apiKey=self.apiKey
        )
        await server.start()
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        return server

    async def stack(self, templates: int, debug: bool = False) -> RealStack:
        llama = await self.llamaServer(debug)
        config: dict[str, Any] = {}
        if self.apiKey:
            keyFile = llama.dir / "proxy" / "backend.key"
            keyFile.write_text(self.apiKey + "\n")
            config["backend_api_key_file"] = "backend.key"
        stack = RealStack(self, llama, texts(templates), **config)
        stack.headers = llama.auth
        await stack.allWarm()
        view = (await (await stack.http.get(stack.admin + "/templates")).json())["backend"]
        self.assertEqual(view["slot_mode"], self.mode, view)
        self.assertEqual(view["pinned"], self.pinned, view)
        self.assertEqual(view["persistence"], "files" if self.persistent else "none", view)
        return stack

    async def exchange(self, url: str, headers: dict[str, str], messages: list[dict[str, Any]]) -> Any:
        response = await self.http.post(
            url + "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4, "temperature": 0},
            headers=headers,
        )
        body = json.loads(await response.content())
        self.assertEqual(response.code, 200, body)
        return body

    async def talk(
        self, url: str, headers: dict[str, str], expand: Any, copies: Any
    ) -> tuple[list[int], int]:
        """
        A conversation and a repeated system prompt, with other traffic
        between: prompt_n of each, and the slot states llama-server copied
        into its RAM cache from the second request on (copies() counts them
        so far).
        """
        computed: list[int] = []

        async def send(messages: list[dict[str, Any]]) -> Any:
            body = await self.exchange(
                url, headers, [{**m, "content": expand(m["content"])} for m in messages]
            )
            computed.append(body["timings"]["prompt_n"])
            return body

        first = [{"role": "user", "content": "@t0 the first question"}]
        reply = (await send(first))["choices"][0]["message"]["content"]
        # The first request copies the slot the last warmup left (bioproxy's
        # warm state going into the RAM cache); llama-server alone has none.
        copiedBefore = copies()
        system = {"role": "system", "content": "You answer as a ship's captain would. " * 30}
        await send([system, {"role": "user", "content": "where are we?"}])
        for prefix in ("@t1", "@t2"):
            await send([{"role": "user", "content": f"{prefix} traffic in between"}])
        await send([{"role": "user", "content": "an unrelated question"}])
        await send(
            [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
        )
        await send([system, {"role": "user", "content": "and the weather?"}])
        # A conversation with no template at all, two turns.
        opening = [{"role": "user", "content": "Tell me about the sea. " * 20}]
        answer = (await send(opening))["choices"][0]["message"]["content"]
        await send([*opening, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}])
        return computed, copies() - copiedBefore

    @asyncTest
    async def test_coldSwitchAndEdit(self) -> None:
        stack = await self.stack(6)
        for round in range(3):
            for prefix in stack.prefixes:
                message = f"round {round} for {prefix}"
                await stack.assertBound(prefix, message, await stack.ask(prefix, message, stream=round == 1))
        self.assertEqual(stack.total("bioproxy_cache_misses_total"), 0)
        saves = stack.total("bioproxy_kv_cache_saves_total")
        self.assertEqual(saves, 6 if self.persistent else 0, "each template saved once, never on a switch")
        warmed = stack.warmed()
        await sleep(R, 1.0)
        self.assertEqual(stack.warmed(), warmed, "warmups ran again with nothing changed")

        stack.texts["@t1"] = templateText(1, "v2")
        (stack.dir / "t1.txt").write_text(stack.texts["@t1"])
        await until(R, lambda: stack.warmed() > warmed, what="the edited template's warmup")
        await stack.allWarm(warmed + 1)
        await stack.assertBound("@t1", "after the edit", await stack.ask("@t1", "after the edit"))

    @asyncTest
    async def test_restart(self) -> None:
        stack = await self.stack(3)
        await stack.llama.stop()
        await stack.llama.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(6)
        restored = stack.total("bioproxy_warmup_total", how="restore")
        self.assertEqual(restored, 3 if self.persistent else 0)
        for prefix in stack.prefixes:
            await stack.assertBound(prefix, "after the restart", await stack.ask(prefix, "after the restart"))

    @asyncTest
    async def test_conversationAndSystemPrompt(self) -> None:
        """Side by side with llama-server alone, on the same configuration: never more recomputed."""
        self.http = client(self)
        stack = await self.stack(3, debug=True)
        alone = await self.llamaServer(debug=True)

        def expanded(content: str) -> str:
            prefix, _, message = content.partition(" ")
            template = stack.texts.get(prefix)
            return template.replace("<{message}>", message) if template else content

        through, ourCopies = await self.talk(
            stack.proxy, stack.headers, lambda content: content, lambda: ramCopies(stack.llama)
        )
        direct, theirCopies = await self.talk(alone.url, alone.auth, expanded, lambda: ramCopies(alone))
        if self.mode == "cleared":
            # Idle slots are cleared into the RAM cache: alone, llama-server copies some. A count
            # of none means its log's wording changed and the comparison below measures nothing.
            self.assertGreater(theirCopies, 0, "llama-server's log names no copy into its RAM cache")
        if self.copiesCompared:
            self.assertLessEqual(ourCopies, theirCopies, "slot states copied into the RAM cache")
        # Per scenario: the conversation's two turns, the system prompt's two requests, the
        # untemplated conversation's two turns.
        for steps in ((0, 5), (1, 6), (7, 8)):
            ours, theirs = (sum(path[i] for i in steps) for path in (through, direct))
            self.assertLessEqual(ours, 1.1 * theirs + 16, (steps, through, direct))
        if self.mode == "cleared":
            # The default server: second turns and the repeated system prompt reuse what they share.
            for turn in (5, 6, 8):
                self.assertLess(through[turn], 100, through)


class ExplicitSlots(DefaultServer):
    """`-np 4`: slots keep their contents; bioproxy places and pins."""

    slots = 4
    mode = "retained"
    pinned = True


class OneSlot(DefaultServer):
    slots = 1
    mode = "retained"
    pinned = True


class NoRamCache(DefaultServer):
    """`--cache-ram 0`: no RAM cache, so idle slots are not cleared either."""

    flags = ("--cache-ram", "0")
    mode = "retained"
    pinned = True


class NoIdleSlotCache(DefaultServer):
    """
    Slots are copied into the RAM cache only when a task takes one whose
    contents it would lose. With every slot holding something, bioproxy
    gives an unrelated request the least recently used slot whose contents
    a file gives back: here the conversation's, which its next turn then
    takes from another slot (two copies, where llama-server's own choice
    happened to make one). Not compared: neither choice knows which
    contents come back.
    """

    flags = ("--no-cache-idle-slots",)
    mode = "retained"
    pinned = True
    copiesCompared = False


class NoSlotSavePath(DefaultServer):
    """No --slot-save-path: slot actions answer 501; warm by prefill, never loop."""

    persistent = False

    @asyncTest
    async def test_templatesSaySo(self) -> None:
        stack = await self.stack(1)
        state = (await stack.templates())["@t0"]
        self.assertEqual(state["warmup_mode"], "prefill")
        self.assertIn("--slot-save-path", state["warmup_mode_reason"])
        self.assertIsNone(state["warmup_error"])


class ApiKey(DefaultServer):
    """`--api-key`: bioproxy's own calls carry backend_api_key (here from a file)."""

    apiKey = KEY


class QuickRestartTests(TestCase):
    timeout = 300

    @asyncTest
    async def test_shutdownNeverWaitsOnBioproxy(self) -> None:
        """
        llama-server, on SIGTERM, finishes its current task and then waits
        for every request it had accepted. A warmup of bioproxy's queued
        behind a client that bypasses bioproxy would hold it until the
        warmup's timeout; bioproxy drops its calls as soon as the listener
        is gone.
        """
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        llama = LlamaServer(R, directory, 1, size="slow")
        await llama.start()
        self.addCleanup(lambda: defer.ensureDeferred(llama.stop()))
        stack = RealStack(self, llama, {"@t0": "Short template.\n<{message}>"})
        await stack.allWarm()
        bypass = defer.ensureDeferred(
            llama.json(
                "POST", "/completion", {"prompt": " ".join(f"w{i}" for i in range(400)), "n_predict": 1}
            )
        )
        bypass.addErrback(lambda _: None)  # cut off by the shutdown
        await sleep(R, 0.3)
        response = await stack.http.post(stack.admin + "/templates/%40t0/warmup")
        self.assertEqual(response.code, 202)
        warmer = stack.service.getServiceNamed("warmup")
        await until(R, lambda: warmer.jobs, what="the warmup to be sent")
        await sleep(R, 0.3)
        # Measured against llama-server's own work, not a wall-clock figure:
        # on loaded cores its current task (the bypass) can outlast any bound.
        started = R.seconds()
        ended: list[float] = []
        bypass.addBoth(lambda result: ended.append(R.seconds() - started))
        took = await llama.stop(grace=60)
        await bypass
        # Its task ends, its listener closes, and bioproxy drops the warmup it had
        # queued: the process exits then, not at the warmup's timeout (or the kill).
        [done] = ended
        self.assertLess(took, done + 5.0, f"llama-server waited for bioproxy's warmup ({took:.1f} s)")
