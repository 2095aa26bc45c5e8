"""
Issue 16: several backends behind one bioproxy, each a fakellama on its
own port. Each template's requests land where it is warm, and a backend
that goes down hands its templates to another, which serves them warm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource

from ..helpers import asyncTest, membersSettled, until
from ..stack import Bioproxy, templateText

R: Any = reactor


class _Site(Site):
    """A Site that can be killed: its port closed and its connections cut, as a dead process's are."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel


class Backend:
    """One fakellama on a fixed port, which can be stopped and started again (a new process)."""

    def __init__(self, test: TestCase, saveDir: Path) -> None:
        self.test = test
        self.saveDir = saveDir
        self.port: Any = None
        self.number = 0
        self.start()
        self.url = f"http://127.0.0.1:{self.number}"

    def start(self) -> None:
        self.llama = FakeLlama(R, slots=2, saveDir=self.saveDir)
        self.site = _Site(FakeLlamaResource(self.llama))
        self.port = R.listenTCP(self.number, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.test.addCleanup(self.stop)

    async def stop(self) -> None:
        if self.port is None:
            return
        port, self.port = self.port, None
        await port.stopListening()
        for channel in list(self.site.channels):
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()

    def prompts(self) -> list[bytes]:
        return [r["prompt"] for r in self.llama.log]


class Scaled(Bioproxy):
    def __init__(self, test: TestCase, backends: int, templates: int, **config: Any) -> None:
        directory = Path(test.mktemp()).absolute()
        (directory / "slots").mkdir(parents=True)
        # One --slot-save-path shared by all: a file saved by one is restored by another.
        self.backends = [Backend(test, directory / "slots") for _ in range(backends)]
        super().__init__(
            test,
            directory,
            self.backends[0].url,
            {f"@t{i}": templateText(i) for i in range(templates)},
            backends=[b.url for b in self.backends],
            **config,
        )

    def members(self) -> list[Any]:
        return list(self.service.getServiceNamed("proxy").factory.resource.dispatcher.members)

    async def settled(self) -> None:
        """Every backend up or known down, and no warmup left to run on any."""

        await until(R, lambda: membersSettled(self.members()), timeout=60, what="warmups on every backend")

    async def ask(self, prefix: str, message: str) -> tuple[str, dict[str, Any]]:
        response = await self.http.post(
            self.proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"{prefix} {message}"}]},
        )
        body = await response.json()
        self.test.assertEqual(response.code, 200, body)
        [backend] = response.headers.getRawHeaders("x-bioproxy-backend")
        return backend, body.get("timings", {})

    def byHash(self, prefix: str) -> str:
        from bioproxy.heads import templateHead
        from bioproxy.router import rendezvous

        template = self.service.getServiceNamed("templates").library.templates[prefix]
        return rendezvous(templateHead(template).key, self.members())[0].name

    def warmOn(self) -> dict[str, list[str]]:
        """Where the router keeps each template warm."""
        router = self.service.getServiceNamed("proxy").factory.resource.dispatcher
        library = self.service.getServiceNamed("templates").library
        from bioproxy.heads import templateHead

        return {
            prefix: [m.name for m in router.warmTargets(templateHead(template))]
            for prefix, template in library.templates.items()
        }


class AffinityTests(TestCase):
    @asyncTest
    async def test_eachTemplateLandsWhereItIsWarm(self) -> None:
        stack = Scaled(self, backends=2, templates=6)
        await stack.settled()
        targets = stack.warmOn()
        self.assertEqual(sorted(len(t) for t in targets.values()), [1] * 6, "warm_on: 1")
        for prefix, [target] in targets.items():  # spread by hashing, as nothing was warm before
            self.assertEqual(target, stack.byHash(prefix), prefix)
        # Each template was warmed on its own backend only.
        for b in stack.backends:
            warmed = {
                p for p in targets if any(b"You are reviewer %s." % p[2:].encode() in x for x in b.prompts())
            }
            self.assertEqual(warmed, {p for p, t in targets.items() if t == [b.url]}, b.url)
        for prefix, [target] in sorted(targets.items()):
            backend, timings = await stack.ask(prefix, f"a question for {prefix}")
            self.assertEqual(backend, target, prefix)
            self.assertGreater(timings["cache_n"], timings["prompt_n"], f"{prefix} came warm")

    @asyncTest
    async def test_passThroughSaysWhichBackend(self) -> None:
        stack = Scaled(self, backends=2, templates=1)
        await stack.settled()
        response = await stack.http.get(stack.proxy + "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertIn(
            response.headers.getRawHeaders("x-bioproxy-backend")[0], [b.url for b in stack.backends]
        )
        [answered] = response.headers.getRawHeaders("x-bioproxy-backend")
        status = await (await stack.http.get(stack.admin + "/status")).json()
        self.assertEqual(status["requests"][-1]["backend"], answered, "the access record says which")
        health = await (await stack.http.get(stack.admin + "/health")).json()
        self.assertEqual([b["url"] for b in health["backends"]], [b.url for b in stack.backends])
        slots = await (await stack.http.get(stack.admin + "/slots")).json()
        self.assertEqual([len(b["slots"]) for b in slots["backends"]], [2, 2])
        [template] = (await (await stack.http.get(stack.admin + "/templates")).json())["templates"]
        states = {b["url"]: b["warm_state"] for b in template["backends"]}
        home = stack.warmOn()["@t0"][0]
        self.assertNotIn(states[home], ("cold", "queued"), states)
        self.assertEqual([s for url, s in states.items() if url != home], ["cold"], "warm on one: warm_on 1")
        ready = await stack.http.get(stack.admin + "/ready")
        self.assertEqual(ready.code, 200, await ready.text())


class FailoverTests(TestCase):
    @asyncTest
    async def test_aBackendGoesDownAndComesBack(self) -> None:
        stack = Scaled(self, backends=2, templates=4)
        await stack.settled()
        targets = stack.warmOn()
        # The backend that holds the most templates goes down.
        down, up = sorted(stack.backends, key=lambda b: -sum(t == [b.url] for t in targets.values()))
        moved = [p for p, t in targets.items() if t == [down.url]]
        self.assertTrue(moved, targets)
        [gone] = [m for m in stack.members() if m.name == down.url]
        await down.stop()
        await until(R, lambda: gone.monitor.reachable is False, what="the backend to be seen down")
        await stack.settled()
        self.assertEqual({t[0] for t in stack.warmOn().values()}, {up.url}, "its templates warmed elsewhere")
        for prefix in sorted(targets):
            backend, timings = await stack.ask(prefix, f"after the failure, {prefix}")
            self.assertEqual(backend, up.url)
            self.assertGreater(timings["cache_n"], timings["prompt_n"], f"{prefix} came warm")
        down.start()  # a new process on the same port
        await until(R, lambda: gone.backend.ready, what="the backend to come back")
        await stack.settled()
        for prefix in moved:  # warm where they are: not moved back
            backend, _ = await stack.ask(prefix, f"after the return, {prefix}")
            self.assertEqual(backend, up.url, prefix)
        response = await stack.http.get(stack.proxy + "/v1/models")
        await treq.content(response)
