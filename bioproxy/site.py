# -*- test-case-name: tests.unit.test_admin -*-
"""
The admin site's HTTP layer, on twisted.web (the proxy port has its own
server, serve.py). Its connections give a request's headers and body a
deadline from its first byte (a client sending a byte a second would
otherwise hold a connection for good), and answer what Twisted's HTTP
parser refuses with a status and a JSON body, not a bare 400 or a silent
close, as the proxy port does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import errorResponse, failRequest


class JSONChannel(HTTPChannel):
    """
    An HTTP/1.1 connection whose requests must arrive within its timeOut
    (the site's client_timeout) of their first byte, and whose refusals are
    JSON. timeOut is also Twisted's idle timeout of the connection.
    """

    _reading: IDelayedCall | None = None
    _answering = False  # between a request's last byte and its response's end

    def dataReceived(self, data: bytes) -> None:
        if self._reading is None and not self._answering and self.timeOut:
            self._reading = self.callLater(self.timeOut, self._tooSlow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stopReading()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._answering = False  # before the next pipelined request is read
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopReading()
        super().connectionLost(reason)

    def _stopReading(self) -> None:
        if self._reading is not None:
            if self._reading.active():
                self._reading.cancel()
            self._reading = None

    def _tooSlow(self) -> None:
        self._reading = None
        self._refuse(408, f"The request's headers and body did not arrive within {self.timeOut:g} s.")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:  # the request line was read: this is a header
            self._refuse(431, f"A request header is longer than {self.MAX_LENGTH} bytes.")
        else:
            self._refuse(414, f"The request line is longer than {self.MAX_LENGTH} bytes.")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"The request's headers exceed {self.totalHeadersSize} bytes.")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"The request has more than {self.maxHeaders} headers.")
        else:
            self._refuse(400, "The request is not well-formed HTTP/1.1.")

    def _refuse(self, status: int, message: str) -> None:
        self._stopReading()
        if self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            self.transport.write(errorResponse(status, message))
        self.loseConnection()


class JSONRequest(Request):
    """A request whose failures in rendering are answered in JSON."""

    def processingFailed(self, reason: Failure) -> Failure:
        failRequest(self, reason)
        return reason


class JSONSite(Site):
    """A Site of JSON channels and requests: the admin site."""

    protocol = JSONChannel  # type: ignore[assignment]  # HTTP/1.1 only, as llama-server speaks it
    requestFactory = JSONRequest
    noisy = False  # the start-up banner says where it listens

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        # Twisted parses a POST's Content-Type (with the email package) for
        # form arguments, which nothing here reads. (Twisted's own switch is
        # Site(parsePOSTFormSubmission=False); older releases lack it.)
        self._parsePOSTFormSubmission = False

    def log(self, request: http.Request) -> None:
        """No access line: Twisted's goes through the legacy log per request, and admin calls are not user requests."""
