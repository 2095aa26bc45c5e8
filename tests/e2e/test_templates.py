"""Template expansion end to end: real sockets, the backend records the exact body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from bioproxy.config import load
from bioproxy.service import makeService

from ..helpers import Recorder, asyncTest, boundPort, client, listen

R: Any = reactor


class ExpansionTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        (self.dir / "templates").mkdir(parents=True)
        (self.dir / "templates/code.txt").write_text("SYSTEM: code.\n<{guide.md}>\nQ: <{message}>")
        (self.dir / "templates/guide.md").write_text("Be brief. <{message}> stays literal here.")
        config = self.dir / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "prefixes": {"@code": "templates/code.txt"},
                    "listen": "tcp:0:interface=127.0.0.1",
                    "admin_listen": "tcp:0:interface=127.0.0.1",
                    "health_check_interval": 60,
                }
            )
        )
        self.backend = Recorder(R)
        service = makeService(load(str(config), {"backend_url": listen(R, self.backend, self)}), R)
        service.startService()
        self.addCleanup(service.stopService)
        self.proxy = f"http://127.0.0.1:{boundPort(service, 'proxy')}"
        self.admin = f"http://127.0.0.1:{boundPort(service, 'admin')}"
        self.http = client(self)

    def received(self) -> dict[str, Any]:
        [last] = [s for s in self.backend.seen if s["uri"] != "/health"][-1:]
        return json.loads(last["body"])

    expanded = "SYSTEM: code.\nBe brief. <{message}> stays literal here.\nQ: why <{/etc/passwd}>?"

    @asyncTest
    async def test_chatBothWays(self) -> None:
        for stream in (False, True):
            body = {
                "model": "m",
                "stream": stream,
                "x_custom": {"keep": [1, 2.5, None]},
                "messages": [
                    {"role": "system", "content": "@code as a system prompt"},
                    {"role": "user", "content": "@code why <{/etc/passwd}>?"},
                    {"role": "assistant", "content": "@code not written by a user"},
                ],
            }
            response = await self.http.post(self.proxy + "/v1/chat/completions", json=body)
            self.assertEqual(response.headers.getRawHeaders("x-bioproxy-template"), ["@code"])
            await treq.content(response)
            sent = self.received()
            self.assertEqual(sent["messages"][1]["content"], self.expanded)
            body["messages"][0]["content"] = self.expanded.replace(
                "why <{/etc/passwd}>?", "as a system prompt"
            )
            body["messages"][1]["content"] = self.expanded
            # A backend without /props is not llama-server: nothing is pinned.
            self.assertEqual(sent, body)

    @asyncTest
    async def test_completionFormats(self) -> None:
        for path in ("/v1/completions", "/completion"):
            for stream in (False, True):
                body = {"prompt": "@code why <{/etc/passwd}>?", "stream": stream, "n_predict": 4}
                response = await self.http.post(self.proxy + path, json=body)
                await treq.content(response)
                self.assertEqual(self.received(), {**body, "prompt": self.expanded})

    @asyncTest
    async def test_untemplatedBodyKeepsItsBytes(self) -> None:
        """The client's own bytes are untouched (a backend that is not llama-server gets no pin)."""
        raw = b' {"messages": [{"role": "user", "content": "@nope hi"}],   "z": 1.0}'
        response = await self.http.post(self.proxy + "/v1/chat/completions", data=raw)
        self.assertIsNone(response.headers.getRawHeaders("x-bioproxy-template"))
        await treq.content(response)
        self.assertEqual(self.backend.seen[-1]["body"], raw)
        pinned = b'{"id_slot": 0, "prompt": "x"}'
        await treq.content(await self.http.post(self.proxy + "/completion", data=pinned))
        self.assertEqual(self.backend.seen[-1]["body"], pinned)

    @asyncTest
    async def test_badBodiesAre400AndNotForwarded(self) -> None:
        for raw in (
            b"{oops",
            b"\xff\xfe{}",
            b'{"messages": "hi"}',
            b'{"messages": [{"role": "user", "content": 3}]}',
        ):
            response = await self.http.post(self.proxy + "/v1/chat/completions", data=raw)
            self.assertEqual(response.code, 400)
            self.assertEqual((await response.json())["error"]["type"], "invalid_request_error")
        self.assertEqual([s for s in self.backend.seen if s["uri"] != "/health"], [])

    @asyncTest
    async def test_adminTemplatesAndMetrics(self) -> None:
        await treq.content(
            await self.http.post(
                self.proxy + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "@code x"}]},
            )
        )
        [entry] = (await (await self.http.get(self.admin + "/templates")).json())["templates"]
        self.assertEqual(entry["prefix"], "@code")
        self.assertEqual(entry["path"], str(self.dir / "templates/code.txt"))
        self.assertEqual(entry["includes"], {"guide.md": str(self.dir / "templates/guide.md")})
        self.assertEqual(len(entry["hash"]), 64)
        self.assertIsNone(entry["last_error"])
        metrics = await (await self.http.get(self.admin + "/metrics")).text()
        self.assertIn('path="/v1/chat/completions",prefix="@code",status="200"', metrics)
        self.assertIn('bioproxy_template_size_bytes{prefix="@code"}', metrics)
