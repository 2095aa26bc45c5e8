"""
The proxy's resources: every method and path goes to the backend as it came.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .forward import Forwarder


class ProxyResource(Resource):
    """Forwards every request, whatever its path, to the backend."""

    isLeaf = True

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.forwarder = forwarder

    def render(self, request: Request) -> int:
        self.forwarder.forward(request)
        return NOT_DONE_YET
