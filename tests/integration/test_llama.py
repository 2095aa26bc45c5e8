"""
bioproxy in front of a real llama-server on the tiny generated model: the
slot API, save/restore, id_slot and timings as the design assumes them, and
the scheduler issue's workloads a) to e) asserted on real cache_n/prompt_n.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.trial.unittest import TestCase

from ..helpers import asyncTest, cacheFiles, until
from ..stack import Bioproxy, templateText
from .llama import LlamaServer

R: Any = reactor


def texts(count: int, rules: int = 12) -> dict[str, str]:
    return {f"@t{i}": templateText(i, rules=rules) for i in range(count)}


class RealStack(Bioproxy):
    def __init__(self, test: TestCase, llama: LlamaServer, templates: dict[str, str], **config: Any) -> None:
        self.llama = llama
        self.texts = templates
        super().__init__(test, llama.dir / "proxy", llama.url, templates, **config)

    async def ask(self, prefix: str, message: str, stream: bool = False) -> dict[str, Any]:
        return await self.chat(f"{prefix} {message}", stream, max_tokens=2)

    async def assertBound(self, prefix: str, message: str, timings: dict[str, Any], slack: int = 0) -> None:
        """The request computed the message and the chat tail, and at most slack tokens of the head."""
        content = self.texts[prefix].replace("<{message}>", message)
        bound = 1.1 * await self.llama.messageAndTail(content, message) + slack
        self.test.assertLessEqual(timings["prompt_n"], bound, (prefix, timings))


class RealTestCase(TestCase):
    timeout = 300
    slots = 4

    async def llamaServer(self, slots: int | None = None) -> LlamaServer:
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        server = LlamaServer(R, directory, slots or self.slots)
        await server.start()
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        return server


class ProtocolTests(RealTestCase):
    @asyncTest
    async def test_streamArrivesEventByEvent(self) -> None:
        stack = RealStack(self, await self.llamaServer(), texts(0))
        response = await stack.http.post(
            stack.proxy + "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 24,
                "ignore_eos": True,
            },
            unbuffered=True,
        )
        chunks: list[bytes] = []
        await treq.collect(response, chunks.append)
        events = [e for e in b"".join(chunks).split(b"\n\n") if e.startswith(b"data: {")]
        self.assertGreaterEqual(len(events), 5)
        self.assertGreaterEqual(len(chunks), len(events) / 2, "events were held back and sent together")
        self.assertIn(b'"timings"', events[-1])

    @asyncTest
    async def test_templateExpandedAndPinned(self) -> None:
        llama = await self.llamaServer()
        stack = RealStack(self, llama, texts(1))
        await stack.allWarm()
        response = await stack.http.post(
            stack.proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "@t0 what is 2+2?"}], "max_tokens": 2},
        )
        self.assertEqual(response.headers.getRawHeaders("x-bioproxy-template"), ["@t0"])
        body = await response.json()
        content = stack.texts["@t0"].replace("<{message}>", "what is 2+2?")
        prompt = (
            await llama.json("POST", "/apply-template", {"messages": [{"role": "user", "content": content}]})
        )["prompt"]
        self.assertEqual(body["usage"]["prompt_tokens"], await llama.tokens(prompt))
        self.assertGreater(
            body["timings"]["cache_n"], 0.9 * (await stack.templates())["@t0"]["reusable_tokens"]
        )

    @asyncTest
    async def test_warmupLeavesASaveFileAndRestoresAfterRestart(self) -> None:
        llama = await self.llamaServer()
        stack = RealStack(self, llama, texts(2))
        await stack.allWarm()
        files = cacheFiles(llama.saveDir)
        self.assertEqual(len(files), 2)
        self.assertTrue(all(f.startswith("_t") and f.endswith(".bin") for f in files), files)
        await llama.stop()
        await until(R, lambda: stack.metric("bioproxy_backend_up") == 0, what="the outage")
        await llama.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(4)
        self.assertEqual(stack.total("bioproxy_warmup_total", how="restore"), 2)
        self.assertEqual(stack.total("bioproxy_kv_cache_saves_total"), 2)
        for prefix in stack.prefixes:
            await stack.assertBound(prefix, "after restart", await stack.ask(prefix, "after restart"))

    @asyncTest
    async def test_originalConfigFormat(self) -> None:
        llama = await self.llamaServer()
        directory = llama.dir / "original"
        directory.mkdir()
        (directory / "code.txt").write_text("You review code.\n<{message}>")
        (directory / "config.json").write_text(
            json.dumps(
                {
                    "proxy_host": "127.0.0.1",
                    "proxy_port": 0,
                    "admin_host": "127.0.0.1",
                    "admin_port": 0,
                    "backend_url": llama.url,
                    "warmup_check_interval": 1,
                    "prefixes": {"@code": "code.txt"},
                },
                indent=2,
            )
        )
        from bioproxy.config import load
        from bioproxy.service import makeService

        from ..helpers import boundPort, client

        service = makeService(load(str(directory / "config.json")), R)
        service.startService()
        self.addCleanup(service.stopService)
        proxy = f"http://127.0.0.1:{boundPort(service, 'proxy')}"
        response = await client(self).post(
            proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "@code print(1)"}], "max_tokens": 2},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("x-bioproxy-template"), ["@code"])
        self.assertIn("choices", await response.json())

    @asyncTest
    async def test_openaiClient(self) -> None:
        import openai

        stack = RealStack(self, await self.llamaServer(), texts(1))
        await stack.allWarm()

        def use() -> list[Any]:
            api = openai.OpenAI(base_url=stack.proxy + "/v1", api_key="unused", max_retries=0)
            results = []
            for content in ("@t0 a question", "no template here"):
                whole = api.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": content}], max_tokens=3
                )
                results.append(whole.choices[0].message.content)
                stream = api.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": content}],
                    max_tokens=5,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                chunks = list(stream)
                # How many chunks is up to llama-server: the tiny model's random bytes are held
                # back until they make whole characters. The stream must end as a stream does.
                results.append((len(chunks), chunks[-1].choices[0].finish_reason if chunks else None))
            return results

        results = await threads.deferToThread(use)
        self.assertEqual([type(r) for r in results], [str, tuple, str, tuple])
        for count, finish in results[1::2]:
            self.assertGreaterEqual(count, 1, results)
            self.assertEqual(finish, "length", results)


class WorkloadTests(RealTestCase):
    @asyncTest
    async def test_a_cold(self) -> None:
        stack = RealStack(self, await self.llamaServer(), texts(3))
        await stack.allWarm()
        for prefix in stack.prefixes:
            await stack.assertBound(prefix, "first question", await stack.ask(prefix, "first question"))

    @asyncTest
    async def test_b_switch(self) -> None:
        stack = RealStack(self, await self.llamaServer(), texts(6))
        await stack.allWarm()
        for round in range(5):
            for prefix in stack.prefixes:
                message = f"round {round}"
                await stack.assertBound(
                    prefix, message, await stack.ask(prefix, message, stream=round % 2 == 1)
                )
        self.assertEqual(stack.total("bioproxy_kv_cache_saves_total"), 6)
        self.assertEqual(stack.total("bioproxy_cache_misses_total"), 0)

    @asyncTest
    async def test_c_restart(self) -> None:
        llama = await self.llamaServer()
        stack = RealStack(self, llama, texts(3))
        await stack.allWarm()
        await llama.stop()
        await llama.start()
        await until(R, lambda: stack.metric("bioproxy_backend_restarts_total") == 1, what="the restart")
        await stack.allWarm(6)
        self.assertEqual(stack.total("bioproxy_warmup_total", how="restore"), 3)
        for prefix in stack.prefixes:
            await stack.assertBound(prefix, "after the restart", await stack.ask(prefix, "after the restart"))

    @asyncTest
    async def test_d_edit(self) -> None:
        stack = RealStack(self, await self.llamaServer(), texts(2))
        await stack.allWarm()
        stack.texts["@t1"] = templateText(1, "v2")
        (stack.dir / "t1.txt").write_text(stack.texts["@t1"])
        await until(
            R, lambda: stack.metric("bioproxy_warmup_total", prefix="@t1", how="prefill") == 2, what="re-warm"
        )
        await stack.assertBound("@t1", "after the edit", await stack.ask("@t1", "after the edit"))


class OneSlotTests(RealTestCase):
    slots = 1

    @asyncTest
    async def test_e_priority(self) -> None:
        # Long templates so that six warmups in a row take a while on one slot.
        stack = RealStack(self, await self.llamaServer(), texts(6, rules=45))
        scheduler = stack.service.getServiceNamed("warmup").scheduler
        # A warmup on the slot and more queued: the slot never falls free
        # between them, so the user can only get it by preempting one.
        await until(R, lambda: scheduler.slots[0].lease is not None and scheduler.waiting("warmup") >= 2)
        timings = await stack.chat("a user who must not wait", max_tokens=2)
        self.assertLess(stack.warmed(), 6, "the user request waited for the warmups")
        self.assertEqual(stack.total("bioproxy_warmup_cancellations_total"), 1)
        self.assertGreater(timings["prompt_n"], 0)
        await stack.allWarm()

    @asyncTest
    async def test_disconnectFreesTheSlot(self) -> None:
        llama = await self.llamaServer()
        stack = RealStack(self, llama, texts(0))
        await until(R, lambda: stack.metric("bioproxy_backend_up") == 1)
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "go on"}],
                "stream": True,
                "max_tokens": 3000,
                "ignore_eos": True,
            }
        ).encode()
        port = int(stack.proxy.rsplit(":", 1)[1])
        reader = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(R, "127.0.0.1", port), _FirstBytes()
        )
        reader.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await until(R, lambda: b"data: {" in reader.received, what="the first event")
        self.assertEqual([s["is_processing"] for s in await llama.json("GET", "/slots")], [True])
        reader.transport.abortConnection()  # the client goes away mid-stream
        await until(R, lambda: stack.service.getServiceNamed("warmup").scheduler.slots[0].lease is None)
        timings = await stack.chat("the next one", max_tokens=2)
        self.assertGreater(timings["prompt_n"], 0)
        processing = [s["is_processing"] for s in await llama.json("GET", "/slots")]
        self.assertEqual(processing, [False])
        # llama-server's own account: the abandoned task stopped long before 3,000 tokens.
        stopped = re.findall(r"task (\d+) \| stop processing: n_tokens = (\d+)", llama.logPath.read_text())
        self.assertLess(int(stopped[0][1]), 1000, stopped)


class _FirstBytes(protocol.Protocol):
    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
