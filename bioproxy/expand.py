# -*- test-case-name: tests.unit.test_expand,tests.unit.test_shapes -*-
"""
Template expansion inside request bodies, in each API's own shape, and the
chat view of a body: the messages llama-server will render once it has
turned an Anthropic or Responses request into a chat one. Placement and
learned heads compare requests on that view, so that a prompt is matched
as llama-server will see it, whichever API it came through.

Pure functions on parsed JSON. Expansion is one pass and never recursive;
it changes only the texts that start with a prefix, and keeps everything
else as it came.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from .routes import Shape
from .templates import Template, TemplateLibrary


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
    except RecursionError:
        raise BadRequest("The request body nests JSON too deeply to be read.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


# Roles whose text a user writes, and so may start with a prefix.
WRITTEN_ROLES = frozenset({"user", "system", "developer"})


def _texts(shape: Shape, body: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str]]:
    """
    Every text a user wrote in body, in prompt order, as (container, key):
    where expansion may write a template. Raises BadRequest where the body
    is not of its route's shape.
    """
    if shape is Shape.PROMPT:
        if isinstance(body.get("prompt"), str):
            yield body, "prompt"
    elif shape is Shape.CHAT:
        for i, message in _messages(body):
            yield from _contentTexts(message, f"messages[{i}]", "text", chat=True)
    elif shape is Shape.ANTHROPIC:
        yield from _blockTexts(body, "system", "system", "text")
        for i, message in _messages(body):
            if message.get("role") == "user":
                yield from _blockTexts(message, "content", f"messages[{i}].content", "text")
    elif shape is Shape.RESPONSES:
        if isinstance(body.get("instructions"), str):
            yield body, "instructions"
        items = body.get("input")
        if isinstance(items, str):
            yield body, "input"
        elif isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    yield from _contentTexts(item, f"input[{i}]", "input_text", chat=False)


def _messages(body: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """body's `messages`, each with its index; BadRequest unless a list of objects."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object.")
        yield i, message


def _contentTexts(
    message: dict[str, Any], where: str, textType: str, chat: bool
) -> Iterator[tuple[dict[str, Any], str]]:
    """The texts of a message's content, if a user wrote it; chat: check content as the chat API types it."""
    content = message.get("content")
    if chat and not (content is None or isinstance(content, (str, list))):
        raise BadRequest(f"{where}.content must be a string, a list of parts or null.")
    if chat and isinstance(content, list) and not all(isinstance(p, dict) for p in content):
        raise BadRequest(f"{where}.content parts must be objects.")
    if message.get("role") in WRITTEN_ROLES:
        yield from _blockTexts(message, "content", f"{where}.content", textType)


def _blockTexts(
    holder: dict[str, Any], key: str, where: str, textType: str
) -> Iterator[tuple[dict[str, Any], str]]:
    """holder[key] if it is a string, else each of its parts of type textType."""
    value = holder.get(key)
    if isinstance(value, str):
        yield holder, key
    elif isinstance(value, list):
        for block in value:
            if isinstance(block, dict) and block.get("type") == textType:
                if not isinstance(block.get("text"), str):
                    raise BadRequest(f"{where} text part must have a string 'text'.")
                yield block, "text"


def expand(shape: Shape, body: dict[str, Any], library: TemplateLibrary) -> str | None:
    """
    Expand, in place, every text a user wrote that starts with a prefix:
    every turn, so that a conversation's history matches what the model saw
    when it was sent. Returns the prefix of the last one expanded.
    """
    used = None
    for holder, key in _texts(shape, body):
        found = library.match(holder[key])
        if found is not None:
            template, message = found
            holder[key] = template.render(message)
            used = template.prefix
    return used


def firstTemplate(shape: Shape, body: dict[str, Any], library: TemplateLibrary) -> Template | None:
    """The template of the first text that starts with a prefix (before expansion)."""
    for holder, key in _texts(shape, body):
        found = library.match(holder[key])
        if found is not None:
            return found[0]
    return None


# Claude Code opens its system prompt with a block such as
# `x-anthropic-billing-header: cc_version=2.1.197.e77; cc_entrypoint=cli; cch=ab12c;`
# whose version suffix and `cch` change with each conversation and mean
# nothing to a model. llama-server rewrites `cch` only, so every new
# conversation's prompt differed from its first tokens on.
BILLING_HEADER = "x-anthropic-billing-header:"
_BILLING_VALUES = re.compile(r"(cc_version=\d+\.\d+\.\d+\.)([0-9A-Za-z]+)(?=;)|(cch=)([0-9A-Za-z]+)(?=;)")


def normaliseBillingHeader(body: dict[str, Any]) -> bool:
    """Fix the per-conversation values of an Anthropic body's billing header, in place; True if changed."""
    changed = False
    for holder, key in _blockTexts(body, "system", "system", "text"):
        text = holder[key]
        if text.startswith(BILLING_HEADER):
            line = text.split("\n", 1)[0]
            fixed = _BILLING_VALUES.sub(_zeroed, line)
            if fixed != line:
                holder[key] = fixed + text[len(line) :]
                changed = True
    return changed


def _stampedOut(text: str) -> str:
    """
    A system text as llama-server 11434 renders it: a billing header's
    five-character `cch` value followed by `;` becomes `fffff`, so that
    a head's rendering matches what llama-server computed.
    """
    if not text.startswith(BILLING_HEADER):
        return text
    at = text.find("cch=", len(BILLING_HEADER))
    if at < 0 or text[at + 9 : at + 10] != ";":
        return text
    return text[: at + 4] + "fffff" + text[at + 9 :]


def _zeroed(match: re.Match[str]) -> str:
    name, value = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return name + "0" * len(value)


@dataclasses.dataclass(frozen=True)
class ChatView:
    """A body as llama-server's chat route sees it: the fields its chat template renders, and messages."""

    head: dict[str, Any]
    messages: list[dict[str, Any]]

    def body(self) -> dict[str, Any]:
        return {**self.head, "messages": self.messages}


def marksBreakpoint(body: dict[str, Any]) -> bool:
    """An Anthropic body whose system blocks or tools carry a cache_control breakpoint."""
    blocks = [b for key in ("system", "tools") if isinstance(body.get(key), list) for b in body[key]]
    return any(isinstance(b, dict) and b.get("cache_control") for b in blocks)


# Chat fields that a chat template renders ahead of the messages.
HEAD_FIELDS = ("tools", "chat_template_kwargs")


def chatView(shape: Shape, body: dict[str, Any]) -> ChatView | None:
    """
    The chat request llama-server turns body into (after its own
    conversions of the Anthropic and Responses APIs, as build 11434 does
    them, for text and tools; images and tool calls approximately). None for
    a shape that is not a chat.
    """
    if shape is Shape.CHAT:
        messages = body.get("messages")
        return ChatView(_head(body), messages if isinstance(messages, list) else [])
    if shape is Shape.ANTHROPIC:
        return _anthropicView(body)
    if shape is Shape.RESPONSES:
        return _responsesView(body)
    return None


def _head(body: dict[str, Any]) -> dict[str, Any]:
    return {k: body[k] for k in HEAD_FIELDS if k in body}


def _anthropicView(body: dict[str, Any]) -> ChatView:
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": _stampedOut(system)})
    elif isinstance(system, list):
        text = "".join(
            _stampedOut(b["text"])
            for b in system
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        messages.append({"role": "system", "content": text})
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, list):
            if content is not None or message.get("role") != "assistant":
                messages.append(message)
            continue
        blocks = [b for b in content if isinstance(b, dict)]
        parts = [b for b in blocks if b.get("type") == "text"]
        calls = [
            {
                "id": _string(c.get("id")),
                "type": "function",
                "function": {"name": _string(c.get("name")), "arguments": _compact(c.get("input", {}))},
            }
            for c in blocks
            if c.get("type") == "tool_use"
        ]
        thinking = "".join(_string(b.get("thinking")) for b in blocks if b.get("type") == "thinking")
        if parts or calls or thinking:
            converted: dict[str, Any] = {"role": message.get("role"), "content": parts or ""}
            if calls:
                converted["tool_calls"] = calls
            if thinking:
                converted["reasoning_content"] = thinking
            messages.append(converted)
        for result in blocks:
            if result.get("type") == "tool_result":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": _string(result.get("tool_use_id")),
                        "content": _resultText(result.get("content")),
                    }
                )
    head: dict[str, Any] = {}
    tools = body.get("tools")
    if isinstance(tools, list):
        head["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema", {}),
                },
            }
            for t in tools
            if isinstance(t, dict)
        ]
    if "chat_template_kwargs" in body:
        head["chat_template_kwargs"] = body["chat_template_kwargs"]
    return ChatView(head, messages)


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _compact(value: Any) -> str:
    """JSON as llama-server writes a tool call's arguments: keys sorted, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _resultText(content: Any) -> Any:
    """A tool result's content as llama-server passes it on: text, text parts joined, or its parts with images."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    blocks = [b for b in content if isinstance(b, dict)]
    if any(b.get("type") == "image" for b in blocks):
        return [{"type": "text", "text": _string(b.get("text"))} for b in blocks if b.get("type") == "text"]
    return "".join(_string(b.get("text")) for b in blocks if b.get("type") == "text")


def _responsesItem(messages: list[dict[str, Any]], item: dict[str, Any], content: Any) -> None:
    """
    An answer's item (a message, a function call, its output, reasoning)
    as llama-server 11434 turns it into chat messages: what an answer holds
    joins the assistant message before it, if there is one.
    """
    previous = messages[-1] if messages and messages[-1].get("role") == "assistant" else None
    kind = item.get("type")
    if item.get("role") == "assistant" and kind == "message":
        parts = [
            {"text": p.get("text"), "type": "text"}
            if p.get("type") in ("output_text", "input_text")
            else {"refusal": p.get("refusal"), "type": "refusal"}
            for p in (content if isinstance(content, list) else [])
            if isinstance(p, dict)
        ]
        if previous is not None:
            previous["content"] = [*(previous.get("content") or []), *parts]
        else:
            rest = {k: v for k, v in item.items() if k not in ("type", "status", "content")}
            messages.append({**rest, "content": parts})
    elif kind == "function_call":
        call = {
            "function": {"arguments": item.get("arguments"), "name": item.get("name")},
            "id": item.get("call_id"),
            "type": "function",
        }
        if previous is not None:
            previous["tool_calls"] = [*(previous.get("tool_calls") or []), call]
        else:
            messages.append({"role": "assistant", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = [
                {**o, "type": "text"} if o.get("type") == "input_text" else o
                for o in output
                if isinstance(o, dict)
            ]
        messages.append({"content": output, "role": "tool", "tool_call_id": item.get("call_id")})
    elif kind == "reasoning":
        texts = item.get("content")
        text = (
            texts[0].get("text") if isinstance(texts, list) and texts and isinstance(texts[0], dict) else ""
        )
        if previous is not None:
            previous["reasoning_content"] = text
        else:
            messages.append({"role": "assistant", "content": [], "reasoning_content": text})
    else:
        messages.append(dict(item))


def _responsesView(body: dict[str, Any]) -> ChatView:
    messages: list[dict[str, Any]] = []
    if "instructions" in body:
        instructions = body["instructions"]
        messages.append({"role": "system", "content": instructions if isinstance(instructions, str) else ""})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            content = item.get("content")
            if isinstance(content, str):
                content = [{"text": content, "type": "input_text"}]
            if item.get("role") in WRITTEN_ROLES and isinstance(content, list):
                parts = [
                    {"text": p.get("text"), "type": "text"}
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "input_text"
                ]
                rest = {k: v for k, v in item.items() if k not in ("type", "status", "content")}
                messages.append({**rest, "content": parts})
            else:
                _responsesItem(messages, item, content)
    head: dict[str, Any] = {}
    tools = body.get("tools")
    if isinstance(tools, list):
        converted = []
        for tool in tools:
            if isinstance(tool, dict) and tool.get("type") == "function":
                function = {k: v for k, v in tool.items() if k != "type"}
                function.setdefault("strict", True)
                converted.append({"type": "function", "function": function})
        if converted:
            head["tools"] = converted
    if "chat_template_kwargs" in body:
        head["chat_template_kwargs"] = body["chat_template_kwargs"]
    return ChatView(head, messages)


def chain(view: ChatView) -> list[str]:
    """
    A conversation's hash chain: one digest per message, of everything up
    to and including it, so that a request finds the longest kept start of
    its messages with one lookup per message. Marks that a client moves
    from turn to turn and that no chat template renders (Anthropic's
    cache_control) are left out.
    """
    link = hashlib.sha256(
        json.dumps(view.head, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")
    )
    links = []
    for message in view.messages:
        text = json.dumps(_unmarked(message), sort_keys=True, ensure_ascii=False)
        link = hashlib.sha256(link.digest() + text.encode("utf-8", "replace"))
        links.append(link.hexdigest())
    return links


def _unmarked(message: Any) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list) or not any(
        isinstance(p, dict) and "cache_control" in p for p in content
    ):
        return message
    parts = [
        {k: v for k, v in p.items() if k != "cache_control"} if isinstance(p, dict) else p for p in content
    ]
    return {**message, "content": parts}


# Enough of any prompt to tell where it is cached; bounds memory per slot.
MAX_TEXT = 1 << 20


def promptText(view: ChatView | None, prompt: Any = None) -> str:
    """
    A stand-in for the prompt llama-server will build: two requests' texts
    start alike exactly as far as their prompts do, message by message and
    within a message, which is what finding the slot that already holds
    most of a prompt needs. Not the prompt itself: no chat template is
    applied. view: a chat's view; else prompt, a completion's prompt.
    """
    if view is not None:
        parts = [json.dumps(view.head, sort_keys=True, ensure_ascii=False)]
        parts += [json.dumps(m, sort_keys=True, ensure_ascii=False) for m in view.messages]
        text = "\n".join(parts)
    else:
        text = prompt if isinstance(prompt, str) else json.dumps(prompt) if prompt is not None else ""
    return text[:MAX_TEXT]
