# -*- test-case-name: tests.unit.test_shapes -*-
"""
llama-server's routes, written once: which ones run on a slot (and so are
queued and counted against one), which body shape each takes (where
templates expand), and whether llama-server honours `id_slot` there.

Taken from the route table in llama-server's `server.cpp` (build 11434).
A route a later llama-server adds is not here and passes through as it came;
metrics count it as "other".
"""

from __future__ import annotations

import dataclasses
import enum


class Shape(enum.Enum):
    """How a body carries its prompt, which decides where templates expand."""

    CHAT = "chat"  # OpenAI chat: messages
    PROMPT = "prompt"  # completion: prompt
    ANTHROPIC = "anthropic"  # Anthropic Messages: system and messages
    RESPONSES = "responses"  # OpenAI Responses: instructions and input
    OTHER = "other"  # a JSON body with no template to expand (embeddings, rerank, infill)


@dataclasses.dataclass(frozen=True)
class Route:
    path: str
    shape: Shape | None  # None: not a JSON prompt bioproxy reads; forwarded as it came
    slot: bool = False  # its work runs on a slot: queued, leased, placed
    pins: bool = True  # llama-server reads id_slot from its body


def _table(*routes: Route) -> dict[bytes, Route]:
    return {r.path.encode("ascii"): r for r in routes}


ROUTES = _table(
    Route("/v1/chat/completions", Shape.CHAT, slot=True),
    Route("/chat/completions", Shape.CHAT, slot=True),
    Route("/v1/completions", Shape.PROMPT, slot=True),
    Route("/completions", Shape.PROMPT, slot=True),
    Route("/completion", Shape.PROMPT, slot=True),
    # llama-server turns a Messages request into a chat one and copies only
    # a few fields; id_slot is not one of them, so these cannot be pinned.
    Route("/v1/messages", Shape.ANTHROPIC, slot=True, pins=False),
    Route("/v1/responses", Shape.RESPONSES, slot=True),
    Route("/responses", Shape.RESPONSES, slot=True),
    Route("/infill", Shape.OTHER, slot=True),
    Route("/embedding", Shape.OTHER, slot=True),
    Route("/embeddings", Shape.OTHER, slot=True),
    Route("/v1/embeddings", Shape.OTHER, slot=True),
    Route("/rerank", Shape.OTHER, slot=True),
    Route("/reranking", Shape.OTHER, slot=True),
    Route("/v1/rerank", Shape.OTHER, slot=True),
    Route("/v1/reranking", Shape.OTHER, slot=True),
    # Token counts and template application run no slot, but they count
    # the prompt the request would send, so templates expand there too.
    Route("/v1/messages/count_tokens", Shape.ANTHROPIC),
    Route("/v1/chat/completions/input_tokens", Shape.CHAT),
    Route("/chat/completions/input_tokens", Shape.CHAT),
    Route("/v1/responses/input_tokens", Shape.RESPONSES),
    Route("/responses/input_tokens", Shape.RESPONSES),
    Route("/apply-template", Shape.CHAT),
    # The rest: known, so metrics label them, and forwarded as they came.
    *(
        Route(path, None)
        for path in (
            "/",
            "/health",
            "/v1/health",
            "/props",
            "/slots",
            "/metrics",
            "/models",
            "/v1/models",
            "/tokenize",
            "/detokenize",
            "/lora-adapters",
            "/v1/chat/completions/control",
        )
    ),
    # Multipart forms: queued on a slot, never read.
    Route("/v1/audio/transcriptions", None, slot=True, pins=False),
    Route("/audio/transcriptions", None, slot=True, pins=False),
)


def route(method: bytes, path: bytes) -> Route | None:
    """The route a request takes through bioproxy's own handling; None: forward it as it came."""
    if method != b"POST":
        return None
    found = ROUTES.get(path)
    return found if found is not None and (found.shape is not None or found.slot) else None
