# -*- test-case-name: tests.unit.test_wire -*-
"""
bioproxy's HTTP client for the backend, made cheap to connect.

llama-server closes the connection after every streamed answer, so nearly
every chat opens a new one, and what Twisted's Agent does per connection by
default is felt before every first token: a HostnameEndpoint built for each
request, getaddrinfo in the thread pool even for "127.0.0.1", a
happy-eyeballs loop, and "Starting factory"/"Stopping factory" in the log.
Here each backend address gets one endpoint for the life of the process: an
address literal is connected to directly, and a host name is resolved by
its first connection and then connected to at the address that answered,
until a connection there fails.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .wire import LeanAgent


class _QuietFactory(_HTTP11ClientFactory):
    """One factory per connection; not worth two log lines each."""

    noisy = False


class QuietPool(HTTPConnectionPool):
    """
    A pool of quiet connections, for bioproxy's own calls (forwarding keeps
    its own, wire.py). Once closed it keeps nothing: a call still in flight
    when bioproxy stops closes its connection when it ends, rather than
    leave it cached, with a timer, in a reactor that is stopping.
    """

    _factory = _QuietFactory
    closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)

    def closeCachedConnections(self) -> defer.Deferred[None]:
        self.closed = True
        closed: defer.Deferred[None] = super().closeCachedConnections()
        return closed


def _direct(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout)


@implementer(IStreamClientEndpoint)
class _Sticky:
    """A host name, resolved by the first connection and then connected to where it answered."""

    def __init__(self, reactor: Any, host: bytes, port: int, timeout: float) -> None:
        self.reactor = reactor
        self.port = port
        self.timeout = timeout
        self.byName = HostnameEndpoint(reactor, host, port, timeout)
        self.known: IStreamClientEndpoint | None = None

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        if self.known is None:
            return self._resolve(factory)
        d: defer.Deferred[IProtocol] = self.known.connect(factory)
        d.addErrback(self._again, factory)
        return d

    def _resolve(self, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        d: defer.Deferred[IProtocol] = self.byName.connect(factory)
        d.addCallback(self._learn)
        return d

    def _learn(self, protocol: IProtocol) -> IProtocol:
        peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
        if isinstance(peer, (IPv4Address, IPv6Address)):
            self.known = _direct(self.reactor, peer.host, self.port, self.timeout)
        return protocol

    def _again(self, reason: Failure, factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        # The address that answered before does not now: the name may have moved.
        self.known = None
        return self._resolve(factory)


@implementer(IAgentEndpointFactory)
class BackendEndpoints:
    """One endpoint per backend address, kept."""

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        self.reactor = reactor
        self.timeout = connectTimeout
        self.tls = BrowserLikePolicyForHTTPS()
        self._known: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._known.get(key)
        if endpoint is None:
            endpoint = self._known[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tcp: IStreamClientEndpoint
        if isIPAddress(host) or isIPv6Address(host):
            tcp = _direct(self.reactor, host, uri.port, self.timeout)
        else:
            tcp = _Sticky(self.reactor, uri.host, uri.port, self.timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), tcp)
        return tcp


@dataclasses.dataclass
class BackendClients:
    """
    The HTTP clients of one backend: `agent` for bioproxy's own calls
    (health, props, slot actions, warmups), `forward` for the requests it
    relays (wire.LeanAgent, with the Agent for bodies kept in files), and
    `retry`, which always connects anew, for the one retry of a request whose
    pooled connection the backend had closed (another pooled one may be as
    stale).
    """

    agent: Agent
    forward: LeanAgent
    retry: LeanAgent
    pool: QuietPool

    def close(self) -> defer.Deferred[None]:
        self.forward.closeCachedConnections()
        self.retry.closeCachedConnections()
        closed: defer.Deferred[None] = self.pool.closeCachedConnections()
        return closed


def backendClients(reactor: Any, idleTimeout: int, connectTimeout: float = 10) -> BackendClients:
    endpoints = BackendEndpoints(reactor, connectTimeout)
    pool = QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    pool.cachedConnectionTimeout = idleTimeout
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    fresh = Agent.usingEndpointFactory(reactor, endpoints, pool=QuietPool(reactor, persistent=False))
    return BackendClients(
        agent,
        LeanAgent(reactor, endpoints, agent, idleTimeout),
        LeanAgent(reactor, endpoints, fresh, idleTimeout, fresh=True),
        pool,
    )
