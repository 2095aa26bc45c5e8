# -*- test-case-name: tests.unit.test_policy,tests.unit.test_conversations -*-
"""
The test harness: bioproxy's objects over fakellama, all in memory (one
backend built as makeService builds each, by backend.member.build): a LlamaClient on
treq's StubTreq wrapping fakellama's resource, a Clock for time, no ports.
(A plain treq HTTPClient hangs here: its body producer runs on the global
reactor. StubTreq's is synchronous.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from bioproxy.backend.member import Member, build
from bioproxy.config import BackendSpec, Config
from bioproxy.heads import HeadBook
from bioproxy.metrics import Metrics
from bioproxy.proxy import ProxyResource
from bioproxy.serve import ProxySite
from bioproxy.templates import Sources, Template, TemplateLibrary, load
from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource, FakeRouter
from bioproxy.wire import LeanAgent

T = TypeVar("T")


MEMORY_CONFIG = Config(backend_timeout=30.0, health_check_interval=60.0)
ROUTER_CONFIG = Config(backend_timeout=30.0, health_check_interval=1.0)


class Memory:
    """One fake llama-server and the bioproxy objects that own its facts, wired as makeService does."""

    def __init__(
        self, directory: Path, persistent: bool = True, url: str = "http://llama", **fake: Any
    ) -> None:
        saveDir = self._begin(directory)
        self.fake = FakeLlama(self.clock, saveDir=saveDir if persistent else None, **fake)
        retry = self._reach(lambda: FakeLlamaResource(self.fake))
        spec = BackendSpec(url, slot_save_path=str(saveDir) if persistent else None)
        # As makeService builds each backend (backend.member.build), with the timeouts of old tests.
        self.member = build(
            spec, MEMORY_CONFIG, self.book, self.metrics, self.clock, self.stub, self.agent.lean, retry
        )
        member = self.member
        self.llama, self.monitor, self.scheduler = member.llama, member.monitor, member.scheduler
        self.backend, self.cache, self.warmer = member.backend, member.cache, member.warmer
        self.cacheIO = member.cacheIO
        self.warmer.startService()
        forwarder, dispatcher = member.forwarder, member.dispatcher
        self.site = ProxySite(
            ProxyResource(forwarder, self.library, dispatcher, self.book), self.metrics, self.clock, 1 << 20
        )

    def _begin(self, directory: Path) -> Path:
        """The clock, metrics, templates and head book every harness has; the slot directory."""
        self.clock = Clock()
        self.dir = directory
        saveDir = directory / "slots"
        saveDir.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics()
        self.library = TemplateLibrary()
        self.book = HeadBook(self.library, self.clock.seconds)
        return saveDir

    def _reach(self, resource: Callable[[], Resource]) -> LeanAgent:
        """
        The ways to the fake: bioproxy's own calls on treq's StubTreq;
        forwarding through bioproxy's own client (wire.py), over in-memory
        connections; bodies in files, through treq's. Returns the agent
        that retries on a fresh connection.
        """
        self.stub = StubTreq(resource())
        self.endpoints = MemoryEndpoints(Site(resource(), reactor=self.clock), self.clock)
        files = RequestTraversalAgent(resource())
        self.agent = _Both(LeanAgent(self.clock, self.endpoints, files, 2), self.endpoints)
        return LeanAgent(self.clock, self.endpoints, files, 2, fresh=True)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One request through the proxy site; its status and JSON answer."""
        status, answer = self.postRaw(path, body)
        return status, json.loads(answer)

    def postRaw(
        self, path: str, body: dict[str, Any], method: bytes = b"POST", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request through the proxy site; its status and body (unchunked); its head in lastHead."""
        raw = json.dumps(body).encode()
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        transport.protocol = channel
        channel.makeConnection(transport)
        channel.dataReceived(
            b"%s %s HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (method, path.encode(), extra, len(raw), raw)
        )
        for _ in range(50):
            self.settle()
            self.agent.flush()
        head, _, answer = transport.value().partition(b"\r\n\r\n")
        self.lastHead = head
        if b"chunked" in head.lower():
            answer = _unchunk(answer)
        return int(head.split(b" ", 2)[1]), answer

    def template(self, prefix: str, text: str) -> Template:
        path = self.dir / f"{prefix.strip('@')}.txt"
        path.write_text(text)
        template = load(prefix, path, Sources.build(self.dir, [str(path)], []))
        self.library.put(template)
        return template

    def settle(self) -> None:
        """Deliver every request and answer, with no time passing."""
        for _ in range(200):
            self.stub.flush()
            self.clock.advance(0)

    def advanceUntil(self, predicate: Any, step: float = 0.05, limit: float = 600.0) -> None:
        """Let fake time pass until predicate holds."""
        deadline = self.clock.seconds() + limit
        self.settle()
        while not predicate():
            assert self.clock.seconds() < deadline, "never happened"
            self.clock.advance(step)
            self.settle()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        d = defer.ensureDeferred(work)
        self.settle()
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "the work did not finish in memory"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]  # type: ignore[no-any-return]

    def found(self) -> None:
        """The monitor found the backend: it is probed, then warmed."""
        self.backend.backendReady(self.fake.props(), restarted=False)
        self.settle()

    def restarted(self) -> None:
        self.fake.restart()
        self.backend.backendLost()
        self.backend.backendReady(self.fake.props(), restarted=True)
        self.settle()

    def completions(self) -> list[dict[str, Any]]:
        return [r for r in self.fake.log if b"bioproxy probe" not in r["prompt"]]

    def metric(self, name: str, **labels: str) -> float:
        return metricSum(self.metrics.registry, name, **labels)


class RouterMemory(Memory):
    """
    llama-server's router mode (fakellama.FakeRouter, one FakeLlama per
    model, modelsMax loaded at once) and bioproxy over it as makeService
    wires it: the configured backend, a unit per model as models.ModelWatch
    finds them, the router above; monitors and the watch running on the clock.
    """

    def __init__(
        self,
        directory: Path,
        models: tuple[str, ...] = ("alpha", "beta"),
        modelsMax: int = 1,
        config: Config = ROUTER_CONFIG,
        **fake: Any,
    ) -> None:
        from bioproxy.models import ModelWatch
        from bioproxy.router import Router

        saveDir = self._begin(directory)
        self.fakes = {name: FakeLlama(self.clock, saveDir=saveDir, **fake) for name in models}
        self.router = FakeRouter(self.fakes, modelsMax)
        retry = self._reach(lambda: self.router)

        def unit(spec: BackendSpec) -> Member:
            return build(spec, config, self.book, self.metrics, self.clock, self.stub, self.agent.lean, retry)

        self.member = unit(BackendSpec("http://llama", slot_save_path=str(saveDir)))
        self.placement = Router(
            [self.member], config.warm_on, models=config.models, templateModels=config.template_models
        )
        self.units: dict[str, Member] = {}

        def joined(member: Member) -> None:
            assert member.model is not None
            self.units[member.model] = member
            member.warmer.startService()
            member.monitor.startService()

        self.watch = ModelWatch(
            [self.member], unit, self.placement, self.clock, config.health_check_interval, joined
        )
        self.site = ProxySite(
            ProxyResource(self.placement, self.library, self.placement, self.book),
            self.metrics,
            self.clock,
            1 << 20,
        )
        self.member.monitor.startService()
        self.watch.startService()
        self.settle()

    def chat(self, model: str, text: str) -> dict[str, Any]:
        """A chat request for model through bioproxy; the child's record of it (cache_n, prompt_n, prompt)."""
        before = len(self.fakes[model].log)
        status, answer = self.post(
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1},
        )
        assert status == 200, answer
        needle = (text.split(" ", 1)[1] if text.startswith("@") else text).encode()  # a template's message
        mine = [r for r in self.fakes[model].log[before:] if needle in r["prompt"]]
        assert len(mine) == 1, mine
        return mine[0]

    def stop(self) -> None:
        for member in [self.member, *self.units.values()]:
            member.monitor.stopService()
            member.warmer.stopService()
            member.backend.stop()
        self.watch.stopService()


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if not n:
            break
        out.append(data[:n])
        data = data[n + 2 :]
    return b"".join(out)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, owner: MemoryEndpoints) -> None:
        self.owner = owner

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        owner = self.owner
        address = IPv4Address("TCP", "127.0.0.1", 8081)
        server, client = owner.site.buildProtocol(address), factory.buildProtocol(address)
        serverIO = iosim.FakeTransport(server, isServer=True, hostAddress=address, peerAddress=address)
        clientIO = iosim.FakeTransport(client, isServer=False, hostAddress=address, peerAddress=address)
        owner.pumps.append(iosim.connect(server, serverIO, client, clientIO, greet=False, clock=owner.clock))
        return defer.succeed(client)


@implementer(IAgentEndpointFactory)
class MemoryEndpoints:
    """Connections to a site in memory, moved along by flush()."""

    def __init__(self, site: Site, clock: Clock) -> None:
        self.site = site
        self.clock = clock
        self.pumps: list[Any] = []

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return _Endpoint(self)

    def flush(self) -> None:
        for pump in list(self.pumps):
            pump.flush(advanceClock=False)
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.remove(pump)


class _Both:
    """The forwarder's lean agent and its fallback, flushed together."""

    def __init__(self, lean: LeanAgent, endpoints: MemoryEndpoints) -> None:
        self.lean = lean
        self.endpoints = endpoints

    def flush(self) -> None:
        self.endpoints.flush()
        fallback: Any = self.lean.fallback
        fallback.flush()


class Alone:
    """llama-server used straight, as the comparisons need: its own fake, on the same clock, nothing in front."""

    def __init__(self, harness: Memory, **fake: Any) -> None:
        self.memory = harness
        self.fake = FakeLlama(harness.clock, **fake)
        self.stub = StubTreq(FakeLlamaResource(self.fake))

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request; the fake's record of it (slot, cache_n, prompt_n, prompt)."""
        before = len(self.fake.log)
        done: list[Any] = []
        self.stub.post("http://llama" + path, json=body).addCallback(done.append)  # type: ignore[attr-defined]
        for _ in range(50):
            self.stub.flush()
            self.memory.clock.advance(0)
        assert done and len(self.fake.log) == before + 1, "the request did not finish in memory"
        assert done[0].code == 200, done[0].code
        record: dict[str, Any] = self.fake.log[-1]
        return record


def metricSum(registry: Any, name: str, **labels: str) -> float:
    """The samples of name whose labels include these, summed (over backends, say)."""
    return float(
        sum(
            sample.value
            for family in registry.collect()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )
    )
