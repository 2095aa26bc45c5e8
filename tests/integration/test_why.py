"""
The reasons that need the real llama-server (bioproxy/why.py): the first
request after a llama-server restart, on a dense model (its head restored
from its file) and on a sliding-window one (no file serves it: llama-server
reuses nothing of a restored slot file there), read from /status as the
status page reads them. bioproxy's warmer is stopped before the restart, so
that the request meets the restart itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from ..helpers import asyncTest, until
from .llama import LlamaServer
from .test_llama import RealStack, texts

R: Any = reactor


class RestartReasonTests(TestCase):
    timeout = 300

    async def reasonAfterARestart(self, arch: str) -> dict[str, Any]:
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        server = LlamaServer(R, directory, None, arch=arch)
        await server.start()
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        stack = RealStack(self, server, texts(1, rules=20))
        await stack.allWarm()
        await stack.ask("@t0", "before the restart")
        stack.service.getServiceNamed("warmup").stopService()
        await server.stop()
        await server.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.ask("@t0", "after the restart")
        status = await (await stack.http.get(stack.admin + "/status")).json()
        [record] = [r for r in status["requests"] if r["prefix"] == "@t0"][-1:]
        return dict(record)

    @asyncTest
    async def test_denseRestoresItsHead(self) -> None:
        record = await self.reasonAfterARestart("llama")
        self.assertEqual(record["reason"], "restored", record)
        self.assertRegex(record["request_id"], r"^[0-9a-f]{16}$")

    @asyncTest
    async def test_slidingWindowSaysWhyNoFileServes(self) -> None:
        record = await self.reasonAfterARestart("gemma3")
        self.assertEqual(record["reason"], "restarted", record)
        self.assertIn("sliding-window", record["reason_text"])
        self.assertGreater(record["computed"], 1000, record)
