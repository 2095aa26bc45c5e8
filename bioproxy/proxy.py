# -*- test-case-name: tests.unit.test_hardening,tests.unit.test_forward -*-
"""
The proxy's resource: every method and path goes to the backend as it came,
except requests that use a slot. Those are parsed, have their templates
expanded, and go through the dispatcher, which leases them a slot.
"""

from __future__ import annotations

import re
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger

from .body import Body
from .errors import failRequest, writeError
from .expand import (
    BadRequest,
    chatView,
    expand,
    firstTemplate,
    marksBreakpoint,
    normaliseBillingHeader,
    parseBody,
)
from .heads import HeadBook, locate, shellOf
from .routes import Route, Shape, route
from .serve import ProxyRequest
from .templates import TemplateLibrary

log = Logger()


class Forwarding(Protocol):
    """Where requests that use no slot go (a Forwarder, or the router over several)."""

    def forward(self, request: ProxyRequest, body: bytes | None = None) -> object: ...


class Sending(Protocol):
    """Where requests that run on a slot go (a Dispatcher, or the router over several)."""

    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None: ...


# llama-server's slot actions: POST /slots/<id>?action=save|restore|erase.
_SLOT_ACTION = re.compile(rb"^/slots/[^/]*/?$")


def routedPath(raw: bytes) -> bytes | None:
    """
    The path as llama-server routes it: it percent-decodes the path before
    matching its routes, so the guards and the route table look at the
    decoded path too (`/%73lots/0` is `/slots/0`). None for a path that
    could be routed more than one way: an encoded slash or backslash
    (`/slots%2F0`), or a dot segment.
    """
    if b"%" not in raw and b"/." not in raw:
        return raw  # every ordinary request
    lowered = raw.lower()
    if b"%2f" in lowered or b"%5c" in lowered:
        return None
    decoded = unquote_to_bytes(raw)
    if any(segment in (b".", b"..") for segment in decoded.split(b"/")):
        return None
    return decoded


class ProxyResource:
    """Forwards every request, whatever its path, to the backend."""

    def __init__(
        self,
        forwarder: Forwarding,
        library: TemplateLibrary | None = None,
        dispatcher: Sending | None = None,
        book: HeadBook | None = None,
        normaliseHeaders: bool = True,
        allowSlotActions: bool = False,
    ) -> None:
        self.allowSlotActions = allowSlotActions
        self.forwarder = forwarder
        self.library = library or TemplateLibrary()
        self.dispatcher = dispatcher
        self.book = book
        self.normaliseHeaders = normaliseHeaders

    def render(self, request: ProxyRequest) -> None:
        path = routedPath(request.path)
        if path is None:
            writeError(
                request,
                400,
                "The request path is ambiguous: an encoded slash or backslash, or a '.' or '..' segment.",
            )
            return
        if request.method == b"POST" and not self.allowSlotActions and _SLOT_ACTION.match(path):
            writeError(
                request,
                403,
                "Slot actions (save, restore, erase) belong to bioproxy, which keeps the templates' "
                "caches in the slots; set allow_slot_actions to let clients use them.",
            )
            return
        found = route(request.method, path)
        if found is None:
            self.forwarder.forward(request)
            return
        content: Any = request.content
        content.seek(0)
        raw = content.read()
        try:
            body = self._read(request, found, raw)
            forwarded = body.forwarded  # encoded here, so that text it cannot carry is a 400 now
        except BadRequest as e:
            writeError(request, 400, str(e))
            return
        if self.dispatcher is None or not found.slot:
            self.forwarder.forward(request, forwarded if body.expanded else None)
            return
        d = defer.ensureDeferred(self.dispatcher.send(request, body, found.pins))
        d.addErrback(lambda reason: failRequest(request, reason))  # the dispatcher has released what it held

    def _read(self, request: ProxyRequest, found: Route, raw: bytes) -> Body:
        """
        The body, parsed, its templates expanded in place, and (for a
        request that runs on a slot) the head it starts with.
        """
        if found.shape is None:
            return Body(raw, {})  # a form llama-server reads; bioproxy only queues it
        body = Body(raw, parseBody(raw), shape=found.shape)
        shape, parsed = found.shape, body.parsed
        if shape is Shape.OTHER:
            return body
        # Where the first template is, found before expansion changes the texts.
        learning = found.slot and self.book is not None
        template = firstTemplate(shape, parsed, self.library) if learning and shape is Shape.PROMPT else None
        position = (
            locate(chatView(shape, parsed), self.library) if learning and shape is not Shape.PROMPT else None
        )
        prefix = expand(shape, parsed, self.library)
        normalised = shape is Shape.ANTHROPIC and self.normaliseHeaders and normaliseBillingHeader(parsed)
        body.expanded = bool(prefix) or normalised
        if prefix is not None:
            body.prefix = prefix
            request.setHeader(b"x-bioproxy-template", prefix.encode("utf-8"))
            request.prefix = prefix
        if learning:
            assert self.book is not None
            if shape is Shape.PROMPT:
                shell = shellOf(shape, None, (template, 0, None) if template else None)
            else:
                shell = shellOf(
                    shape, body.view, position, shape is Shape.ANTHROPIC and marksBreakpoint(parsed)
                )
            body.head = self.book.observe(shell, position[0] if position and shell is None else None)
            body.resumes = self.book.conversationsOf(body.view, lambda: body.links)
            if shell is not None and shell.short and body.head is None:
                body.unmeasured = shell
        return body
