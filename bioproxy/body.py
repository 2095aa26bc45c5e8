# -*- test-case-name: tests.unit.test_shapes,tests.unit.test_cachefacts -*-
"""
A request's body: the client's bytes, parsed, expanded where a template
was named, and what bioproxy worked out of it for placement (the head it
begins with, the conversations it continues). Apart from expand.py, which
knows bodies' shapes and nothing of heads, so that heads.py can build on
expand.py and this on both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from .expand import BadRequest, ChatView, chain, chatView, promptText
from .heads import Head, Shell
from .routes import Shape


def withSlot(raw: bytes, slot: int) -> bytes:
    """
    raw (a JSON object) with `"id_slot"` added as its first member: the
    client's own bytes are kept as they came, only the pin is new.
    """
    start = raw.index(b"{") + 1
    empty = raw[start:].lstrip().startswith(b"}")
    return raw[:start] + b'"id_slot":%d' % slot + (b"" if empty else b",") + raw[start:]


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclasses.dataclass
class Body:
    """A request body as it came, parsed, and whether bioproxy changed it."""

    raw: bytes
    parsed: dict[str, Any]
    expanded: bool = False  # changed: a template expanded, or a header normalised
    shape: Shape | None = None
    head: Head | None = None  # the warm head the prompt starts with, if any
    # Kept conversations that the prompt continues, longest first (HeadBook.conversationsOf).
    resumes: list[Head] = dataclasses.field(default_factory=list)
    # The start the prompt shares with others, too short by estimate to keep:
    # its answer's token count decides (HeadBook.measured).
    unmeasured: Shell | None = None
    prefix: str = ""  # of the last template expanded: labels the metrics

    @functools.cached_property
    def view(self) -> ChatView | None:
        return chatView(self.shape, self.parsed) if self.shape is not None else None

    @functools.cached_property
    def text(self) -> str:
        """promptText, worked out only where placement compares prompts."""
        if self.shape is Shape.PROMPT:
            return promptText(None, self.parsed.get("prompt"))
        return promptText(self.view) if self.view is not None else ""

    @functools.cached_property
    def links(self) -> list[str]:
        """The hash chain of the chat view's messages (chain), worked out once per request."""
        return chain(self.view) if self.view is not None else []

    @property
    def conversation(self) -> str | None:
        """
        The client's own name for the conversation: OpenAI's
        `prompt_cache_key`, or the `session_id` in Claude Code's
        `metadata.user_id` (a JSON string). None when it gives none.
        """
        key = self.parsed.get("prompt_cache_key")
        if isinstance(key, str) and key:
            return key
        metadata = self.parsed.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        if not isinstance(user, str) or not user.startswith("{"):
            return None
        try:
            session = json.loads(user).get("session_id")
        except (ValueError, AttributeError):
            return None
        return f"session:{session}" if isinstance(session, str) and session else None

    @functools.cached_property
    def forwarded(self) -> bytes:
        """
        The body to forward unpinned: the client's bytes, or the expanded
        body encoded once. BadRequest for text that UTF-8 cannot carry (a
        lone surrogate, as from a string cut mid-emoji: `"\\ud83d"`).
        """
        if not self.expanded:
            return self.raw
        try:
            return encode(self.parsed)
        except UnicodeEncodeError as e:
            raise BadRequest(
                f"The request body holds text that cannot be encoded as UTF-8 ({e.reason}, at {e.start})."
            ) from None

    def pinned(self, slot: int | None) -> bytes:
        """The body to forward, pinned to slot unless None; a client's own id_slot is left as it is."""
        if slot is None or "id_slot" in self.parsed:
            return self.forwarded
        return withSlot(self.forwarded, slot)
