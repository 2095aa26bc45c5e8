"""
A measuring stick, not a product: how fast can a pass-through proxy written
on Twisted be when it skips Twisted's HTTP Request and Agent machinery?

    python bench/lean.py LISTEN_PORT BACKEND_PORT [--fresh]

It parses only what it must (the request line and headers, Content-Length
bodies; the response's status line, headers and framing), relays the
response's bytes as they come, chunked framing included, with backpressure
both ways, and keeps one backend connection per idle slot in a pool. No
templates, no slots, no chunked uploads, no timeouts: bench/passthrough.py
runs it beside bioproxy and nginx to show what a leaner forwarding path
would be worth. With --fresh it connects anew for every request, as
llama-server needs (it closes the connection after a streamed answer,
though its headers say keep-alive); bench/latency.py runs it so, as the
floor of what any relay on this reactor costs per chat.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}


def parseHead(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    first, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return first, headers


class Backend(Protocol):
    """One backend connection: relays one response at a time to its client."""

    def __init__(self, pool: list[Backend] | None) -> None:
        self.pool = pool  # None: a connection per request
        self.client: Client | None = None
        self.buffer = b""
        self.head = True
        self.left = 0  # bytes of body (or of the current chunk) still to come
        self.chunked = False
        self.chunkState = "size"  # size, data, crlf, trailer

    def send(self, client: Client, data: bytes) -> None:
        self.client, self.head, self.buffer = client, True, b""
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if self.head:
            self.buffer += data
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            status, headers = parseHead(head)
            self.chunked = any(
                n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers
            )
            length = next((int(v) for n, v in headers if n.lower() == b"content-length"), None)
            self.left = length if length is not None else 0
            self.chunkState = "size"
            kept = [(n, v) for n, v in headers if n.lower() not in HOP or (n.lower() == b"transfer-encoding")]
            out = status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in kept) + b"\r\n"
            self.head, self.buffer = False, b""
            client.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]
            client.transport.write(out)  # type: ignore[union-attr]
            data = rest
            if not self.chunked and length == 0:
                self._done()
                return
        if not data:
            return
        client.transport.write(data)  # type: ignore[union-attr]
        if self._ends(data):
            self._done()

    def _ends(self, data: bytes) -> bool:
        """Whether data finishes the response, from the framing alone."""
        if not self.chunked:
            self.left -= len(data)
            return self.left <= 0
        i = 0
        while i < len(data):
            if self.chunkState == "size":
                end = data.find(b"\r\n", i)
                if end < 0:
                    self.buffer = data[i:]
                    return False
                line, self.buffer = self.buffer + data[i:end], b""
                self.left = int(line.split(b";")[0], 16)
                i = end + 2
                self.chunkState = "data" if self.left else "trailer"
            elif self.chunkState == "data":
                take = min(self.left, len(data) - i)
                self.left -= take
                i += take
                if not self.left:
                    self.chunkState = "crlf"
                    self.left = 2
            elif self.chunkState == "crlf":
                take = min(self.left, len(data) - i)
                self.left -= take
                i += take
                if not self.left:
                    self.chunkState = "size"
            else:  # trailer: ends with an empty line
                return data.endswith(b"\r\n\r\n") or data[i:] == b"\r\n"
        return False

    def _done(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.transport.unregisterProducer()  # type: ignore[union-attr]
            if self.pool is None:
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.pool.append(self)
            client.responseDone()

    def connectionLost(self, reason: Any = None) -> None:
        if self.pool is not None and self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.abortConnection()  # type: ignore[union-attr]


class Client(Protocol):
    def __init__(self, proxy: Lean) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.busy = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        if self.busy:
            return
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        first, headers = parseHead(head)
        length = next((int(v) for n, v in headers if n.lower() == b"content-length"), 0)
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        kept = [(n, v) for n, v in headers if n.lower() not in HOP and n.lower() != b"host"]
        request = (
            first
            + b"\r\nHost: "
            + self.proxy.host
            + b"\r\n"
            + b"".join(n + b": " + v + b"\r\n" for n, v in kept)
            + b"\r\n"
            + body
        )
        self.busy = True
        self.proxy.backend().addCallback(lambda backend: backend.send(self, request))

    def responseDone(self) -> None:
        self.busy = False
        self._next()


class Lean(Factory):
    def __init__(self, backendPort: int, fresh: bool = False) -> None:
        self.host = b"127.0.0.1:%d" % backendPort
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", backendPort)
        self.idle: list[Backend] = []
        self.fresh = fresh

    def buildProtocol(self, addr: Any) -> Client:
        return Client(self)

    def backend(self) -> Any:
        from twisted.internet import defer

        if self.idle:
            return defer.succeed(self.idle.pop())
        return self.endpoint.connect(Factory.forProtocol(lambda: Backend(None if self.fresh else self.idle)))


if __name__ == "__main__":
    listen, backendPort = int(sys.argv[1]), int(sys.argv[2])
    running: Any = reactor
    running.listenTCP(listen, Lean(backendPort, fresh="--fresh" in sys.argv), interface="127.0.0.1")
    running.run()
