"""
The proxy's resource: every method and path goes to the backend as it came,
except that chat and completion bodies get their templates expanded first.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .errors import writeError
from .expand import CHAT_PATHS, PROMPT_PATHS, BadRequest, encode, expandChat, expandPrompt, parseBody
from .forward import Forwarder
from .templates import TemplateLibrary

log = Logger()
_TEMPLATED = CHAT_PATHS | PROMPT_PATHS


class ProxyResource(Resource):
    """Forwards every request, whatever its path, to the backend."""

    isLeaf = True

    def __init__(self, forwarder: Forwarder, library: TemplateLibrary | None = None) -> None:
        super().__init__()
        self.forwarder = forwarder
        self.library = library or TemplateLibrary()

    def render(self, request: Request) -> int:
        body = None
        if request.method == b"POST" and request.path in _TEMPLATED:
            try:
                body = self._expand(request)
            except BadRequest as e:
                writeError(request, 400, str(e))
                return NOT_DONE_YET
        self.forwarder.forward(request, body)
        return NOT_DONE_YET

    def _expand(self, request: Request) -> bytes | None:
        """The new body when a template was used, else None (the original goes as it is)."""
        content: Any = request.content
        content.seek(0)
        parsed = parseBody(content.read())
        expand = expandChat if request.path in CHAT_PATHS else expandPrompt
        prefix = expand(parsed, self.library)
        if prefix is None:
            return None
        request.setHeader(b"x-bioproxy-template", prefix.encode("utf-8"))
        request.prefix = prefix  # type: ignore[attr-defined]
        body = encode(parsed)
        log.info(
            "expanded {prefix} into {size} bytes for {path}",
            prefix=prefix,
            size=len(body),
            path=request.path.decode(),
        )
        return body
