"""
A small client for llama-server's own API, on the service's shared Agent.

The proxy path never uses this: it is for bioproxy's own calls (health now;
slots, save and restore with the scheduler).
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime


class BackendError(Exception):
    """llama-server answered, but not with what was asked for."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class LlamaClient:
    def __init__(self, http: HTTPClient, baseURL: str, reactor: IReactorTime, timeout: float = 10.0) -> None:
        self.http = http
        self.base = baseURL.rstrip("/")
        self.reactor = reactor
        self.timeout = timeout

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        kwargs: dict[str, Any] = {"reactor": self.reactor, "timeout": self.timeout}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {b"content-type": [b"application/json"]}
        response = await self.http.request(method, self.base + path, **kwargs)
        content = await treq.content(response)
        if response.code >= 400:
            raise BackendError(response.code, content.decode("utf-8", "replace")[:500])
        return json.loads(content) if content else None

    async def health(self) -> Any:
        return await self._json("GET", "/health")

    async def props(self) -> Any:
        return await self._json("GET", "/props")
