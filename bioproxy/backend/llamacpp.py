# -*- test-case-name: tests.unit.test_hardening -*-
"""
A small client for llama-server's own API, on the service's shared Agent.

The proxy path never uses this: it is for bioproxy's own calls: health,
props, the slot actions and warmup completions.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived


class BackendError(Exception):
    """llama-server answered, but not with what was asked for."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class NoPersistence(BackendError):
    """501 to a slot action: llama-server runs without --slot-save-path, so no files."""


class Unauthorized(BackendError):
    """401: llama-server runs with --api-key and bioproxy's backend_api_key is unset or wrong."""

    fix = "llama-server runs with --api-key; set backend_api_key, backend_api_key_file or $BIOPROXY_BACKEND_API_KEY"


class Refused(BackendError):
    """Another 4xx: llama-server will not do this (a prompt longer than a slot, say); retrying cannot help."""


class NotLoaded(Refused):
    """llama-server's router has not loaded the model (bioproxy never asks it to load one for its own calls)."""


class Unreachable(Exception):
    """
    No answer: the connection failed or was cut (llama-server stopped, or
    restarts). Nothing to retry at once: the monitor sees the outage, and
    what was cut off is done again once llama-server is back.
    """


class TimedOut(Exception):
    """No whole answer within the time allowed (a busy or stalled llama-server); retried later, as any failure."""


# What the HTTP client raises when the connection fails or is cut.
_CUT = (ConnectError, ConnectionLost, ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed)


def backendError(status: int, message: str) -> BackendError:
    """The typed error for an answer with status >= 400."""
    if status == 501:
        return NoPersistence(status, message)
    if status == 401:
        return Unauthorized(status, message)
    if status == 400 and message == "model is not loaded":
        return NotLoaded(status, message)
    if 400 <= status < 500:
        return Refused(status, message)
    return BackendError(status, message)


class LlamaClient:
    def __init__(
        self,
        http: HTTPClient,
        baseURL: str,
        reactor: IReactorTime,
        timeout: float = 10.0,
        apiKey: str | None = None,
        model: str | None = None,
    ) -> None:
        """
        model: one model of llama-server's router (its --models-dir mode):
        every call names it, and none loads it (`autoload=false`).
        """
        self.http = http
        self.base = baseURL.rstrip("/")
        self.model = model
        # What log lines and metrics call it: the URL, and the model behind a router.
        self.name = f"{self.base}#{model}" if model else self.base
        self.reactor = reactor
        self.timeout = timeout
        self.headers: dict[bytes, list[bytes]] = {b"content-type": [b"application/json"]}
        if apiKey:
            self.headers[b"authorization"] = [b"Bearer " + apiKey.encode("utf-8")]

    async def _json(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"reactor": self.reactor, "headers": self.headers}
        if self.model is not None:
            # Never load it (autoload=false), unless the path says so (loadModel).
            load = "" if "autoload=" in path else "&autoload=false"
            path += ("&" if "?" in path else "?") + "model=" + quote(self.model, safe="") + load
            if method == "POST":
                body = {**(body or {}), "model": self.model}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
        # One deadline for the answer's headers and its body (treq's own
        # timeout covers the headers only), told apart from a cancel of
        # bioproxy's own, which both reach this call as the same failure.
        seconds = timeout or self.timeout
        waiting: list[defer.Deferred[Any]] = []
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            waiting[-1].cancel()

        def wait(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
            waiting.append(d)
            return d

        deadline = self.reactor.callLater(seconds, expire)
        try:
            try:
                response = await wait(self.http.request(method, self.base + path, **kwargs))
            except ResponseNeverReceived as e:
                # llama-server closes a connection after a streamed answer, and
                # the pool may hand that one out first; Agent retries only GETs.
                # Nothing was answered, so each of these calls may go again, once.
                # (A cancel is reported this way too, and is not retried.)
                if not all(r.check(ConnectionDone, ConnectionLost) for r in e.reasons):
                    raise
                response = await wait(self.http.request(method, self.base + path, **kwargs))
            content = await wait(treq.content(response))
        except (*_CUT, CancelledError) as e:
            if expired:
                raise TimedOut(f"{path}: no whole answer in {seconds:g} s") from None
            if isinstance(e, CancelledError) or any(
                r.check(CancelledError) for r in getattr(e, "reasons", ())
            ):
                # Cancelled by bioproxy, not cut by llama-server: as a
                # cancel, which no caller takes for a failed call.
                raise CancelledError() from None
            raise Unreachable(f"{path}: {_reason(e)}") from None
        finally:
            if deadline.active():
                deadline.cancel()
        if response.code >= 400:
            raise backendError(response.code, _message(content))
        return json.loads(content) if content else None

    async def health(self) -> Any:
        """Up: the server answers (for a router's model, the model is loaded: NotLoaded if not)."""
        return await self._json("GET", "/props" if self.model else "/health")

    async def models(self) -> Any:
        """The models a router serves, with their status (llama-server's /v1/models)."""
        return await self._json("GET", "/v1/models")

    async def loadModel(self, timeout: float) -> Any:
        """
        Have a router load this client's model, as a user's request for it
        would, and answer once it is loaded: its /props, asked with the
        router's autoload, which waits for the load.
        """
        assert self.model is not None
        return await self._json("GET", "/props?autoload=true", timeout=timeout)

    async def props(self) -> Any:
        return await self._json("GET", "/props")

    async def slots(self) -> Any:
        return await self._json("GET", "/slots")

    async def save(self, slot: int, filename: str, timeout: float | None = None) -> Any:
        """timeout: a slot's KV cache can be gigabytes, and llama-server writes it before it answers."""
        return await self._json("POST", f"/slots/{slot}?action=save", {"filename": filename}, timeout)

    async def restore(self, slot: int, filename: str, timeout: float | None = None) -> Any:
        return await self._json("POST", f"/slots/{slot}?action=restore", {"filename": filename}, timeout)

    async def erase(self, slot: int) -> Any:
        return await self._json("POST", f"/slots/{slot}?action=erase")

    async def chat(self, body: dict[str, Any], timeout: float) -> Any:
        """A non-streaming chat completion; cancelling closes the connection, which cancels the task."""
        return await self._json("POST", "/v1/chat/completions", body, timeout)

    async def complete(self, body: dict[str, Any], timeout: float) -> Any:
        """A non-streaming /completion: a raw prompt, no chat template."""
        return await self._json("POST", "/completion", body, timeout)

    async def applyTemplate(self, body: dict[str, Any]) -> str:
        """The prompt llama-server's chat template makes of a chat body (its messages and tools)."""
        result = await self._json("POST", "/apply-template", body)
        prompt: str = result["prompt"]
        return prompt

    async def tokenize(self, text: str, special: bool = True) -> list[int]:
        """text as llama-server's own tokenizer cuts it; special: with the BOS a prompt starts with."""
        result = await self._json("POST", "/tokenize", {"content": text, "add_special": special})
        tokens: list[int] = result["tokens"]
        return tokens


def fingerprint(props: dict[str, Any], model: str = "") -> str:
    """
    Names what a saved slot is only valid for: the model file (its path, and
    model: its size and time, where bioproxy can read it), the context per
    slot and the build. A file saved under another fingerprint is never
    loaded. (The K and V cache types and flash attention, which /props does
    not report, llama-server checks itself: it refuses a file made under
    others, and the file is computed again.)
    """
    settings = props.get("default_generation_settings") or {}
    parts = [
        str(props.get("model_path", "")),
        str(settings.get("n_ctx", "")),
        str(props.get("build_info", "")),
    ]
    if model:
        parts.append(model)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def _reason(e: Exception) -> str:
    """What cut a connection, in one line (the HTTP client wraps it in lists of failures)."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in reasons)
    return str(e) or type(e).__name__


def _message(content: bytes) -> str:
    """The message of llama-server's JSON error, else the start of the body."""
    text = content.decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:500]
