"""Shared pieces for the test suite: async tests, backends, running services."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from bioproxy.testing.memory import metricSum  # noqa: F401 - the tests' name for it

T = TypeVar("T")


def asyncTest(f: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., defer.Deferred[T]]:
    """Lets trial run an `async def` test method."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return defer.ensureDeferred(f(*args, **kwargs))

    return wrapper


def sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class Recorder(Resource):
    """
    A backend that records what reached it and answers as told.

    Behaviour is chosen by the request path:
      /echo...      JSON of what arrived (method, path, headers, body length)
      /multi        two Set-Cookie headers and a fixed Content-Length
      /hang         never answers
      /sse?n=N&gap=S  N events, S seconds apart
      /big?mb=N     N MiB, written as fast as the consumer allows
      /die          half a response, then the connection drops
    """

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.seen: list[dict[str, Any]] = []
        self.closed: list[str] = []  # paths whose client went away first
        self.produced = 0

    def render(self, request: Request) -> bytes | int:
        if request.method == b"GET" and request.path in (b"/health", b"/props"):
            # bioproxy's own polling: answered as a server without /props, not recorded.
            request.setResponseCode(200 if request.path == b"/health" else 404)
            return b"{}"
        body = request.content.read()
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            "body": body,
        }
        self.seen.append(record)
        path = request.path.decode()
        request.notifyFinish().addErrback(lambda _: self.closed.append(path))
        if path == "/multi":
            request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
            request.setHeader(b"content-length", b"5")
            request.setHeader(b"content-type", b"text/plain")
            return b"hello"
        if path == "/hang":
            return NOT_DONE_YET
        if path == "/sse":
            n = int(request.args.get(b"n", [b"5"])[0])
            gap = float(request.args.get(b"gap", [b"0.1"])[0])
            request.setHeader(b"content-type", b"text/event-stream")
            self._sse(request, 0, n, gap)
            return NOT_DONE_YET
        if path == "/big":
            mb = int(request.args.get(b"mb", [b"64"])[0])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.registerProducer(_Firehose(self, request, mb * 1024 * 1024), True)
            return NOT_DONE_YET
        if path == "/die":
            request.setHeader(b"content-length", b"1000")
            request.write(b"x" * 100)
            self.reactor.callLater(0.05, request.channel.transport.abortConnection)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({**record, "body": len(body)}).encode()

    def _sse(self, request: Request, i: int, n: int, gap: float) -> None:
        if request.finished or request.channel is None:
            return
        if i == n:
            request.write(b"data: [DONE]\n\n")
            request.finish()
            return
        request.write(f"data: {json.dumps({'i': i})}\n\n".encode())
        self.reactor.callLater(gap, self._sse, request, i + 1, n, gap)


class _Firehose:
    """Writes as fast as the transport lets it: a push producer."""

    def __init__(self, recorder: Recorder, request: Request, total: int) -> None:
        self.recorder = recorder
        self.request = request
        self.left = total
        self.paused = False
        recorder.reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"z" * 65536
        while not self.paused and self.left > 0 and self.request.channel is not None:
            self.request.write(chunk)
            self.left -= len(chunk)
            self.recorder.produced += len(chunk)
        if self.left <= 0 and not self.request.finished and self.request.channel is not None:
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.left = 0


def listen(reactor: Any, resource: Resource, testCase: Any) -> str:
    """
    Serve resource on an ephemeral loopback port; return its base URL. At
    the test's end its connections are closed and waited for: a client that
    went away in the last moments leaves the server's side open a turn
    longer, which trial would report as a dirty reactor.
    """
    site = Site(resource)
    served: list[Any] = []
    build = site.buildProtocol

    def buildProtocol(address: Any) -> Any:
        protocol = build(address)
        served.append(protocol)
        return protocol

    site.buildProtocol = buildProtocol  # type: ignore[method-assign]
    port: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def closed() -> None:
        await port.stopListening()
        for protocol in served:
            transport = getattr(protocol, "transport", None)
            if transport is not None and transport.connected:
                transport.abortConnection()
        deadline = reactor.seconds() + 5
        while any(getattr(getattr(p, "transport", None), "connected", False) for p in served):
            if reactor.seconds() > deadline:
                break
            await sleep(reactor, 0.01)

    testCase.addCleanup(lambda: defer.ensureDeferred(closed()))
    return f"http://127.0.0.1:{port.getHost().port}"


def client(testCase: Any) -> HTTPClient:
    """A treq client whose connections end with the test."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    testCase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


def boundPort(service: Any, name: str) -> int:
    """The port a makeService listener got (tests listen on port 0)."""
    listener = service.getServiceNamed(name)
    port: IListeningPort = listener._waitingForPort.result
    return int(port.getHost().port)


async def until(reactor: Any, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> None:
    """Wait, on the real reactor, for predicate to hold; fail the test if it never does."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await sleep(reactor, 0.02)


def membersSettled(members: Any) -> bool:
    """Every backend known down, or up, probed and with no warmup left to run."""
    return all(
        m.monitor.reachable is False
        or (m.monitor.reachable and m.backend.ready and not m.warmer.jobs and not m.warmer.wanted)
        for m in members
    )


def cacheFiles(directory: Any) -> list[str]:
    """The files in a --slot-save-path directory, less the one the backend's restore probe writes over."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("bioproxy-probe"))


def logEvents(testCase: Any) -> list[dict[str, Any]]:
    """Every log event published from now until the test ends."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    testCase.addCleanup(globalLogPublisher.removeObserver, seen.append)
    return seen


def sdkStreams(proxy: str, content: str) -> dict[str, Any]:
    """
    In a thread (the SDKs block): the anthropic SDK's messages.stream() and
    the openai SDK's responses.stream() through bioproxy at proxy, each to
    its end with the helpers' own accumulation; what each gathered.
    """
    import anthropic
    import openai

    got: dict[str, Any] = {}
    claude = anthropic.Anthropic(base_url=proxy, api_key="unused", max_retries=0)
    try:
        # Greedy: llama-server 11434 leaves message_start out when the first
        # token's text is held back (a partial stop string), which a sampled
        # reply of the tiny model's hits now and then.
        with claude.messages.stream(
            model="tiny",
            max_tokens=4,
            messages=[{"role": "user", "content": content}],
            extra_body={"temperature": 0},
        ) as stream:
            got["anthropic_text"] = "".join(stream.text_stream)
            final = stream.get_final_message()
            got["anthropic_final"] = (final.role, final.content[0].text, final.usage.output_tokens)
    finally:
        claude.close()
    # The Responses stream as the SDK parses it into typed events. (Its
    # responses.stream() helper needs output_index and content_index in
    # each event, which llama-server 11434's stream leaves out: it fails
    # against llama-server alone too.)
    gpt = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)
    try:
        events = list(
            gpt.responses.create(model="tiny", input=content, max_output_tokens=4, temperature=0, stream=True)
        )
        got["responses_kinds"] = [event.type for event in events]
        got["responses_text"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        response = events[-1].response
        got["responses_final"] = (response.status, response.output_text, response.usage.output_tokens)
    finally:
        gpt.close()
    return got
