"""
The proxy's resource: every method and path goes to the backend as it came,
except requests that use a slot. Those are parsed, have their templates
expanded, and go through the dispatcher, which leases them a slot.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .dispatch import Dispatcher
from .errors import writeError
from .expand import (
    CHAT_PATHS,
    PROMPT_PATHS,
    BadRequest,
    Body,
    encode,
    expandChat,
    expandPrompt,
    leading,
    parseBody,
)
from .forward import Forwarder
from .templates import Template, TemplateLibrary

log = Logger()

# Routes whose work runs on a llama-server slot.
SLOT_PATHS = (
    CHAT_PATHS
    | PROMPT_PATHS
    | frozenset(
        {
            b"/infill",
            b"/embedding",
            b"/embeddings",
            b"/v1/embeddings",
            b"/rerank",
            b"/reranking",
            b"/v1/rerank",
            b"/v1/reranking",
        }
    )
)


class ProxyResource(Resource):
    """Forwards every request, whatever its path, to the backend."""

    isLeaf = True

    def __init__(
        self,
        forwarder: Forwarder,
        library: TemplateLibrary | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        self.forwarder = forwarder
        self.library = library or TemplateLibrary()
        self.dispatcher = dispatcher

    def render(self, request: Request) -> int:
        if request.method != b"POST" or request.path not in SLOT_PATHS:
            self.forwarder.forward(request)
            return NOT_DONE_YET
        content: Any = request.content
        content.seek(0)
        raw = content.read()
        try:
            body = Body(raw, parseBody(raw))
            template, prefix = self._expand(request, body.parsed)
        except BadRequest as e:
            writeError(request, 400, str(e))
            return NOT_DONE_YET
        body.expanded = bool(prefix)
        if request.path in CHAT_PATHS or request.path in PROMPT_PATHS:
            body.chat = request.path in CHAT_PATHS
        if self.dispatcher is None:
            self.forwarder.forward(request, encode(body.parsed) if prefix else None)
        else:
            d = defer.ensureDeferred(self.dispatcher.send(request, body, template, prefix))
            d.addErrback(lambda f: log.failure("dispatch failed", f))
        return NOT_DONE_YET

    def _expand(self, request: Request, body: dict[str, Any]) -> tuple[Template | None, str]:
        """
        Expand templates in body, in place. Returns the template a chat's
        prompt starts with (whose warm cache it can reuse) and the prefix used.
        """
        if request.path in CHAT_PATHS:
            first = leading(body, self.library)
            prefix = expandChat(body, self.library)
        elif request.path in PROMPT_PATHS:
            first, prefix = None, expandPrompt(body, self.library)
        else:
            return None, ""
        if prefix is None:
            return None, ""
        request.setHeader(b"x-bioproxy-template", prefix.encode("utf-8"))
        request.prefix = prefix  # type: ignore[attr-defined]
        log.info("expanded {prefix} for {path}", prefix=prefix, path=request.path.decode())
        return first, prefix
