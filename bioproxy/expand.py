"""
Template expansion inside request bodies: chat messages and completion
prompts. Pure functions on parsed JSON; everything not expanded is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

from .templates import Template, TemplateLibrary

CHAT_PATHS = frozenset({b"/v1/chat/completions", b"/chat/completions"})
PROMPT_PATHS = frozenset({b"/v1/completions", b"/completions", b"/completion"})


class BadRequest(Exception):
    """The body is not a request the backend could take; answered with 400."""


def parseBody(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"The request body is not valid UTF-8 (byte {e.start}).") from None
    try:
        body = json.loads(text)
    except ValueError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def expandChat(body: dict[str, Any], library: TemplateLibrary) -> str | None:
    """
    Expand every user message that starts with a prefix, in place.

    Every turn is expanded, not just the last, so a conversation's history
    matches what the model saw on the turn it was sent. Returns the prefix of
    the last expanded message.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list.")
    used = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object.")
        content = message.get("content")
        if content is None or isinstance(content, str):
            pass
        elif isinstance(content, list):
            if not all(isinstance(part, dict) for part in content):
                raise BadRequest(f"messages[{i}].content parts must be objects.")
        else:
            raise BadRequest(f"messages[{i}].content must be a string, a list of parts or null.")
        if message.get("role") != "user":
            continue
        if isinstance(content, str):
            expanded = _expand(content, library)
            if expanded:
                message["content"], used = expanded
        elif isinstance(content, list):
            part = next((p for p in content if p.get("type") == "text"), None)
            if part is not None:
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content text part must have a string 'text'.")
                expanded = _expand(part["text"], library)
                if expanded:
                    part["text"], used = expanded
    return used


def leading(body: dict[str, Any], library: TemplateLibrary) -> Template | None:
    """
    The template the chat's first message starts with: only then does the
    prompt begin the way a warmed slot does, so only then can it reuse one.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return None
    first = messages[0]
    content = first.get("content")
    # Warmups send string content; a list of parts may be rendered otherwise.
    if first.get("role") != "user" or not isinstance(content, str):
        return None
    found = library.match(content)
    return found[0] if found else None


def expandPrompt(body: dict[str, Any], library: TemplateLibrary) -> str | None:
    """Expand a string `prompt` that starts with a prefix, in place."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        expanded = _expand(prompt, library)
        if expanded:
            body["prompt"], used = expanded
            return used
    return None


def _expand(text: str, library: TemplateLibrary) -> tuple[str, str] | None:
    found = library.match(text)
    if found is None:
        return None
    template, message = found
    return template.render(message), template.prefix


# Chat fields that a chat template renders ahead of the messages.
_HEAD_FIELDS = ("tools", "chat_template_kwargs")
# Enough of any prompt to tell where it is cached; bounds memory per slot.
MAX_TEXT = 1 << 20


def promptText(body: dict[str, Any], chat: bool) -> str:
    """
    A stand-in for the prompt llama-server will build from body: two
    requests' texts start alike exactly as far as their prompts do, message
    by message and within a message, which is what finding the slot that
    already holds most of a prompt needs. Not the prompt itself: no chat
    template is applied.
    """
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return ""
        head = {k: body[k] for k in _HEAD_FIELDS if k in body}
        parts = [json.dumps(head, sort_keys=True, ensure_ascii=False)]
        parts += [json.dumps(m, sort_keys=True, ensure_ascii=False) for m in messages]
        text = "\n".join(parts)
    else:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt) if prompt is not None else ""
    return text[:MAX_TEXT]


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
    """A request body as it came, parsed, and whether expansion changed it."""

    raw: bytes
    parsed: dict[str, Any]
    expanded: bool = False
    chat: bool | None = None  # a chat or a completion prompt; None: neither

    @functools.cached_property
    def text(self) -> str:
        """promptText, worked out only where placement compares prompts (retained slots)."""
        return "" if self.chat is None else promptText(self.parsed, self.chat)

    def pinned(self, slot: int | None) -> bytes:
        """The body to forward, pinned to slot unless None; a client's own id_slot is left as it is."""
        if slot is None or "id_slot" in self.parsed:
            return encode(self.parsed) if self.expanded else self.raw
        if self.expanded:
            return encode({"id_slot": slot, **self.parsed})
        return withSlot(self.raw, slot)
