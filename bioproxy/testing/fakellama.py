# -*- test-case-name: tests.unit.test_architectures -*-
"""
A stand-in for llama-server, for fast tests, benchmarks and the demo.

It models what bioproxy depends on: slots with per-slot prompt-prefix reuse
on byte tokens, `id_slot` pinning, `timings.cache_n` / `prompt_n`, SSE
streaming, a cost per token on an injected clock, and fault switches. It is
not a substitute for the real server in the integration tests.

Slot choice and the RAM prompt cache follow llama-server's
`get_available_slot` (build 11434) in both of its modes:
- unified (`unified=True`, llama-server's default with no `-np`): each new
  task moves every idle slot into the RAM cache and clears it; a request
  pinned to a cleared slot does not look in the RAM cache (upstream #28139);
- explicit slots (`-np N`): slots keep their contents, and idle ones are
  copied into the RAM cache.
`cacheIdleSlots=False` is `--no-cache-idle-slots`, `cacheRam=False` is
`--cache-ram 0` (which also turns idle-slot caching off), `saveDir=None` is
no `--slot-save-path` (slot actions answer 501), `apiKey` is `--api-key`.

`memory` is the model's kind, as llama-server 11434 reuses each
(server-context.cpp's reuse gate, measured on the tiny models):
- "dense": any shared prefix of a slot is reused;
- "hybrid": the recurrent state exists only at the slot's end, so reuse
  short of it needs a context checkpoint at or before the divergence;
- "swa": the window's cells reach back WINDOW tokens, so a divergence
  further back needs a checkpoint too. A slot state that was saved and
  loaded again (a file, or the RAM cache) keeps only the window, and then
  llama-server asks for a checkpoint for any reuse: a RAM-cache entry is
  reused up to its last checkpoint, a restored file not at all.
Checkpoints are made as llama-server makes them: where processing starts
near the prompt's end, and 4 and 4 + 512 tokens before the end. They move
with a slot into the RAM cache and back; a slot file carries none.
A generated token is kept in the slot only once the next one is computed,
so a completion of one token leaves exactly its prompt, as in llama-server.

FakeRouter is llama-server's router mode (one FakeLlama per model, loaded
on demand, `--models-max` of them at once).

Run it alone: ``python -m bioproxy.testing.fakellama --port 8081``
(``--models a,b --models-max 1``: in router mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

MODEL = "fake-llama"
REPLY = "This is a reply from the fake llama server. "

# Which API a completion was asked through, which decides its answer's shape.
Api = Literal["chat", "completion", "anthropic", "responses"]
# The model's kind of memory (see the module's docstring).
Memory = Literal["dense", "hybrid", "swa"]
WINDOW = 128  # the "swa" model's sliding window, in tokens
UBATCH = 512  # llama-server's default n_ubatch, which places its checkpoints


def chatPrompt(messages: list[dict[str, Any]]) -> str:
    """chatml, the template the tiny test model carries too."""
    out = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(f"<|im_start|>{message.get('role', 'user')}\n{content}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _text(content: Any, kinds: tuple[str, ...]) -> str:
    """A message's text: a string, or its text blocks of the given types joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") in kinds and isinstance(b.get("text"), str)
        )
    return ""


def anthropicMessages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """/v1/messages as a chat, text only: `system`, then every message's text blocks."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    out: list[dict[str, Any]] = []
    if body.get("system"):
        out.append({"role": "system", "content": _text(body["system"], ("text",))})
    out += [
        {"role": m.get("role"), "content": _text(m.get("content"), ("text",))}
        for m in messages
        if isinstance(m, dict)
    ]
    return out


def responsesMessages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """/v1/responses as a chat, text only: `instructions`, then `input` (a string or message items)."""
    given = body.get("input")
    out = (
        [{"role": "system", "content": body["instructions"]}]
        if isinstance(body.get("instructions"), str)
        else []
    )
    if isinstance(given, str):
        return [*out, {"role": "user", "content": given}]
    if not isinstance(given, list):
        return None
    kinds = ("input_text", "output_text", "text")
    return out + [
        {"role": item.get("role", "user"), "content": _text(item.get("content"), kinds)}
        for item in given
        if isinstance(item, dict) and "role" in item
    ]


def tokenize(text: str) -> bytes:
    """Byte tokens: one token per UTF-8 byte keeps the counts easy to predict."""
    return text.encode("utf-8")


def commonPrefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclasses.dataclass
class Faults:
    """Switches a test flips to make the server misbehave."""

    down: bool = False  # drop every connection without answering
    slowHeaders: float = 0.0  # seconds before any response
    dieAfterTokens: int | None = None  # abort the stream after this many tokens
    silentAfterTokens: int | None = None  # send nothing more after this many, until the client leaves
    # Restores of bioproxy's cache files report success but leave the slot
    # empty (a probe's file is left alone: the fault is one file's, not the server's).
    lossyRestore: bool = False
    # A save of one of bioproxy's cache files (not a probe's) kills the
    # server: the connection is cut, and it answers nothing (down) until restart().
    dieOnSave: bool = False
    # Anthropic streams without message_start, so without usage, as llama-server
    # 11434 sends them when the first token's text is held back.
    noMessageStart: bool = False


@dataclasses.dataclass(frozen=True)
class Cached:
    """A prompt in the RAM cache, with the checkpoints it was saved with."""

    tokens: bytes
    checkpoints: tuple[int, ...] = ()


@dataclasses.dataclass
class Slot:
    id: int
    tokens: bytes = b""
    checkpoints: tuple[int, ...] = ()  # token counts its memory can go back to
    # Its state was saved and loaded (a file, or the RAM cache), which keeps
    # only the window's cells of a sliding-window model.
    loaded: bool = False
    prompt: str = ""  # the last task's prompt, as /slots shows it
    busy: bool = False
    lastUsed: float = 0.0
    waiting: list[defer.Deferred[None]] = dataclasses.field(default_factory=list)


class FakeLlama:
    """The server's state, separate from its HTTP face."""

    def __init__(
        self,
        clock: IReactorTime,
        slots: int = 4,
        msPerPromptToken: float = 0.0,
        msPerGeneratedToken: float = 0.0,
        nCtx: int = 8192,
        model: str = MODEL,
        saveDir: Path | None = None,
        cacheRam: bool = True,
        unified: bool = False,
        cacheIdleSlots: bool = True,
        apiKey: str | None = None,
        memory: Memory = "dense",
    ) -> None:
        self.clock = clock
        self.memory = memory
        self.slots = [Slot(i) for i in range(slots)]
        self.msPerPromptToken = msPerPromptToken
        self.msPerGeneratedToken = msPerGeneratedToken
        self.nCtx = nCtx
        self.model = model
        self.saveDir = saveDir
        self.build = "fake-0"
        # llama-server's in-RAM prompt cache (--cache-ram): None when disabled.
        self.ram: list[Cached] | None = [] if cacheRam else None
        self.unified = unified
        self.cacheIdleSlots = cacheIdleSlots and cacheRam  # llama-server: it needs --cache-ram
        self.apiKey = apiKey
        self.generation = 0
        self.marker = secrets.token_hex(8)
        self.faults = Faults()
        self.log: list[dict[str, Any]] = []  # one record per completion, for tests
        self.actions: list[tuple[str, int, str]] = []  # (action, slot, filename), for tests

    def restart(self) -> None:
        """What a real restart does: every slot empty, a new process marker; saved files stay."""
        self.generation += 1
        self.marker = secrets.token_hex(8)
        for slot in self.slots:
            slot.tokens, slot.checkpoints, slot.loaded = b"", (), False
        if self.ram is not None:
            self.ram.clear()

    def remember(self, slot: Slot) -> None:
        """
        prompt_save (server_prompt_cache::alloc): a copy of slot goes into
        the RAM cache unless one there already starts with it, and the
        copies it starts with are dropped (bounded, oldest out).
        """
        tokens = slot.tokens
        if self.ram is None or not tokens or any(kept.tokens.startswith(tokens) for kept in self.ram):
            return
        self.ram[:] = [kept for kept in self.ram if not tokens.startswith(kept.tokens)]
        self.ram.append(Cached(tokens, slot.checkpoints))
        del self.ram[:-64]

    def loadFromRam(self, slot: Slot, prompt: bytes) -> None:
        """
        prompt_load (server_prompt_cache::load): in the cache's order, a
        copy replaces what the slot holds when it keeps more of itself and
        covers more of the prompt than the best so far, and at least a
        quarter of itself; the copy taken leaves the cache.
        """
        if self.ram is None:
            return
        common = commonPrefix(slot.tokens, prompt)
        keep = common / len(slot.tokens) if slot.tokens else -1.0
        sim = common / max(1, len(prompt))
        best: Cached | None = None
        for kept in self.ram:
            common = commonPrefix(kept.tokens, prompt)
            keepIt, simIt = common / len(kept.tokens), common / max(1, len(prompt))
            if keepIt >= 0.25 and keepIt > keep and simIt > sim:
                keep, sim, best = keepIt, simIt, kept
        if best is not None:
            self.ram.remove(best)
            slot.tokens, slot.checkpoints, slot.loaded = best.tokens, best.checkpoints, True

    def launched(self, slot: Slot) -> None:
        """After a task starts on slot: idle slots go to the RAM cache, and with unified KV are cleared."""
        if not self.cacheIdleSlots:
            return
        for other in self.slots:
            if other is not slot and not other.busy:
                self.remember(other)
                if self.unified:
                    other.tokens, other.checkpoints = b"", ()

    def props(self) -> dict[str, Any]:
        return {
            "total_slots": len(self.slots),
            "model_path": f"/models/{self.model}.gguf",
            "build_info": self.build,
            "default_generation_settings": {"n_ctx": self.nCtx},
            "chat_template": "chatml",
            # llama-server's marker is random per process: so is this one, and
            # restart() (a new process in the same object) draws a new one.
            "media_marker": f"<__media_{self.marker}__>",
        }

    def pickSlot(self, prompt: bytes, pinned: int | None) -> tuple[Slot, bool]:
        """
        llama-server's choice, and whether it updates the slot from the RAM
        cache: the pinned slot, or the idle slot whose prompt shares more
        than a tenth of this one, else the least recently used.
        """
        chosen: Slot | None = None
        update = False
        if pinned is not None and pinned >= 0:
            chosen = self.slots[pinned]
        best = 0.0
        for slot in self.slots:
            if (pinned is not None and pinned >= 0 and slot.id != pinned) or slot.busy or not slot.tokens:
                continue
            similarity = commonPrefix(slot.tokens, prompt) / max(1, len(prompt))
            if similarity > best and similarity > 0.1:
                best, chosen = similarity, slot
        if chosen is not None:
            if chosen.tokens:
                keep = best * len(prompt) / len(chosen.tokens)
                update = keep < 0.5
            # An empty pinned slot gives 0/0 here, which is never < 0.5: the RAM cache is not read.
        else:
            idle = [s for s in self.slots if not s.busy] or self.slots
            chosen = min(idle, key=lambda s: s.lastUsed)
            update = True
        return chosen, update and self.ram is not None

    def reusable(self, slot: Slot, prompt: bytes) -> int:
        """
        How much of slot a prompt reuses: the shared prefix, less one token
        when it is all of the prompt (one must be computed), and, where the
        model's memory cannot go back that far, the last checkpoint before it.
        """
        common = commonPrefix(slot.tokens, prompt)
        reuse = min(common, len(prompt) - 1) if prompt else 0
        if self.memory == "dense" or reuse <= 0:
            return reuse
        reach = WINDOW if self.memory == "swa" and not slot.loaded else 0
        if reuse >= len(slot.tokens) - reach and not (self.memory == "swa" and slot.loaded):
            return reuse
        return max((c for c in slot.checkpoints if c <= reuse), default=0)

    def checkpointed(self, slot: Slot, reused: int, prompt: bytes) -> None:
        """The slot computed prompt from reused on: the checkpoints llama-server keeps and makes."""
        if self.memory == "dense":
            return
        end = len(prompt)
        made = {end - 4 - UBATCH, end - 4}
        if end - reused < UBATCH:
            made.add(reused)  # the first batch is near the end: checkpointed before it is computed
        kept = {c for c in slot.checkpoints if c <= reused}
        slot.checkpoints = tuple(sorted(kept | {c for c in made if reused <= c and c > 0}))

    async def acquire(self, slot: Slot) -> None:
        while slot.busy:
            d: defer.Deferred[None] = defer.Deferred()
            slot.waiting.append(d)
            await d
        slot.busy = True

    def release(self, slot: Slot) -> None:
        slot.busy = False
        slot.lastUsed = self.clock.seconds()
        if slot.waiting:
            slot.waiting.pop(0).callback(None)


# What llama-server answers without an API key.
_PUBLIC = frozenset({b"/health", b"/v1/health", b"/models", b"/v1/models"})

_FILENAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SlotAction:
    """save, restore and erase, answered the way llama-server answers them."""

    def __init__(self, server: FakeLlama) -> None:
        self.server = server

    async def run(self, slot: Slot, action: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        server = self.server
        if action == "erase":
            await server.acquire(slot)
            n, slot.tokens, slot.checkpoints = len(slot.tokens), b"", ()
            server.release(slot)
            server.actions.append(("erase", slot.id, ""))
            return 200, {"id_slot": slot.id, "n_erased": n}
        if server.saveDir is None:
            return 501, {
                "message": "This server does not support slots action. Start it with `--slot-save-path`"
            }
        filename = body.get("filename")
        if not isinstance(filename, str) or not _FILENAME.match(filename) or ".." in filename:
            return 400, {"message": "Invalid filename"}
        path = server.saveDir / filename
        server.actions.append((action, slot.id, filename))
        await server.acquire(slot)
        try:
            if action == "save":
                try:
                    path.write_bytes(server.model.encode() + b"\n" + slot.tokens)
                except OSError:
                    return 500, {"message": "Unable to save slot"}
                n = len(slot.tokens)
                return 200, {"id_slot": slot.id, "filename": filename, "n_saved": n, "n_written": n + 64}
            try:
                model, _, tokens = path.read_bytes().partition(b"\n")
            except OSError:
                tokens, model = b"", b""
            slot.checkpoints = ()  # a file carries none
            if model != server.model.encode() or not tokens:
                slot.tokens = b""  # as in llama-server, a failed restore leaves the slot empty
                return 400, {
                    "message": "Unable to restore slot, no available space in KV cache or invalid slot save file"
                }
            lossy = server.faults.lossyRestore and not filename.startswith("bioproxy-probe")
            slot.tokens = b"" if lossy else tokens
            slot.loaded = True
            return 200, {
                "id_slot": slot.id,
                "filename": filename,
                "n_restored": len(tokens),
                "n_read": len(tokens),
            }
        finally:
            server.release(slot)


class _Generation:
    """One completion in progress on a slot; cancellable by a disconnect."""

    def __init__(
        self, server: FakeLlama, request: Request, body: dict[str, Any], prompt: bytes, api: Api
    ) -> None:
        self.server = server
        self.request = request
        self.body = body
        self.prompt = prompt
        self.api = api
        self.stream = bool(body.get("stream"))
        self.maxTokens = int(body.get("max_tokens", body.get("n_predict", 16)) or 16)
        self.cancelled = False
        self.pendingCall: IDelayedCall | None = None
        self.slot: Slot | None = None
        self.sent: list[str] = []
        # Its ids, as llama-server makes them: the answer's, and a Responses answer's message item.
        self.ident = ("resp_" if api == "responses" else "chatcmpl-") + secrets.token_hex(16)
        self.item = "msg_" + secrets.token_hex(16)
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, _: Failure) -> None:
        self.cancelled = True
        if self.pendingCall is not None and self.pendingCall.active():
            self.pendingCall.cancel()
            self.pendingCall = None
            self._resume.callback(None)

    def _sleep(self, seconds: float) -> defer.Deferred[None]:
        self._resume: defer.Deferred[None] = defer.Deferred()
        if seconds <= 0:
            self._resume.callback(None)
        else:
            self.pendingCall = self.server.clock.callLater(seconds, self._resume.callback, None)
        return self._resume

    async def run(self) -> None:
        server = self.server
        # llama-server's conversion of /v1/messages drops id_slot.
        pinned = self.body.get("id_slot") if self.api != "anthropic" else None
        slot, update = server.pickSlot(self.prompt, pinned if isinstance(pinned, int) else None)
        await server.acquire(slot)
        if update:
            server.remember(slot)
            server.loadFromRam(slot, self.prompt)
        server.launched(slot)
        self.slot = slot
        slot.prompt = self.prompt.decode("utf-8", "replace")
        try:
            await self._generate(slot)
        finally:
            server.release(slot)

    async def _generate(self, slot: Slot) -> None:
        server = self.server
        started = server.clock.seconds()
        cacheN = server.reusable(slot, self.prompt)
        promptN = len(self.prompt) - cacheN
        server.checkpointed(slot, cacheN, self.prompt)
        slot.tokens, slot.loaded = self.prompt[:cacheN], False
        await self._sleep(promptN * server.msPerPromptToken / 1000)
        if self.cancelled:
            return
        slot.tokens = self.prompt
        promptDone = server.clock.seconds()
        if self.stream:
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-cache")
            if self.api == "anthropic":
                # llama-server 11434's sequence (curl -N against it): message_start,
                # content_block_start, the deltas, content_block_stop, message_delta, message_stop.
                if not server.faults.noMessageStart:
                    usage = {"cache_read_input_tokens": cacheN, "input_tokens": promptN, "output_tokens": 0}
                    message = {**self._message([]), "stop_reason": None, "usage": usage}
                    self._event({"type": "message_start", "message": message})
                block = {"type": "text", "text": ""}
                self._event({"type": "content_block_start", "index": 0, "content_block": block})
            elif self.api == "responses":
                # response.created, .in_progress, .output_item.added, .content_part.added,
                # the deltas, .output_text.done, .content_part.done, .output_item.done, .completed.
                begun = {"id": self.ident, "object": "response", "status": "in_progress"}
                self._event({"type": "response.created", "response": begun})
                self._event({"type": "response.in_progress", "response": begun})
                item = {
                    "content": [],
                    "id": self.item,
                    "role": "assistant",
                    "status": "in_progress",
                    "type": "message",
                }
                self._event({"type": "response.output_item.added", "item": item})
                part = {"type": "output_text", "text": ""}
                self._event({"type": "response.content_part.added", "item_id": self.item, "part": part})
        for i in range(self.maxTokens):
            if i:
                await self._sleep(server.msPerGeneratedToken / 1000)
            if self.cancelled:
                return
            faults = server.faults
            if faults.dieAfterTokens is not None and i >= faults.dieAfterTokens:
                _abort(self.request)
                return
            if faults.silentAfterTokens is not None and i >= faults.silentAfterTokens:
                await self._sleep(86400.0)  # a hung server: only the client's leaving ends it
                return
            if self.sent:  # computed only now, to sample the next one
                slot.tokens += tokenize(self.sent[-1])
            piece = REPLY[i % len(REPLY)]
            self.sent.append(piece)
            if self.stream:
                self._event(self._chunk(piece, None))
        timings = {
            "cache_n": cacheN,
            "prompt_n": promptN,
            "prompt_ms": (promptDone - started) * 1000,
            "predicted_n": len(self.sent),
            "predicted_ms": (server.clock.seconds() - promptDone) * 1000,
        }
        server.log.append(
            {
                "slot": slot.id,
                "pinned": self.body.get("id_slot"),
                "cache_n": cacheN,
                "prompt_n": promptN,
                "prompt": self.prompt,
                "started": started,
                "finished": server.clock.seconds(),
                # The headers a proxy in front is expected to pass on.
                "request_id": self.request.getHeader(b"x-request-id"),
                "conversation_id": self.request.getHeader(b"x-conversation-id"),
            }
        )
        if self.stream and self.api == "anthropic":
            self._event({"type": "content_block_stop", "index": 0})
            delta = {"stop_reason": "end_turn", "stop_sequence": None}  # as 11434 says, even at max_tokens
            self._event({"type": "message_delta", "delta": delta, "usage": {"output_tokens": len(self.sent)}})
            self._event({"type": "message_stop"})
        elif self.stream and self.api == "responses":
            whole = self._whole(timings)
            text = "".join(self.sent)
            self._event({"type": "response.output_text.done", "item_id": self.item, "text": text})
            part = whole["output"][0]["content"][0]
            self._event({"type": "response.content_part.done", "item_id": self.item, "part": part})
            self._event({"type": "response.output_item.done", "item": whole["output"][0]})
            self._event({"type": "response.completed", "response": whole, "timings": timings})
        elif self.stream:
            final = self._chunk("", "length")
            final["timings"] = timings
            self._event(final)
            self.request.write(b"data: [DONE]\n\n")
        else:
            self.request.setHeader(b"content-type", b"application/json")
            self.request.write(json.dumps(self._whole(timings)).encode())
        self.request.finish()

    def _event(self, payload: dict[str, Any]) -> None:
        named = b"event: %s\n" % payload["type"].encode() if self.api in ("anthropic", "responses") else b""
        self.request.write(named + b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _chunk(self, piece: str, finish: str | None) -> dict[str, Any]:
        if self.api == "anthropic":
            return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        if self.api == "responses":
            return {"type": "response.output_text.delta", "item_id": self.item, "delta": piece}
        if self.api == "chat":
            delta = {"content": piece} if piece else {}
            return {  # llama-server's chat answers do not say which slot ran them
                "object": "chat.completion.chunk",
                "model": self.server.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        return {"content": piece, "stop": finish is not None, "id_slot": self._slotId()}

    def _whole(self, timings: dict[str, Any]) -> dict[str, Any]:
        text = "".join(self.sent)
        usage = {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": len(self.sent),
            "total_tokens": len(self.prompt) + len(self.sent),
        }
        if self.api == "anthropic":
            return {
                **self._message([{"type": "text", "text": text}]),
                "stop_reason": "max_tokens",
                "usage": {
                    "cache_read_input_tokens": timings["cache_n"],
                    "input_tokens": timings["prompt_n"],
                    "output_tokens": len(self.sent),
                },
            }
        if self.api == "responses":
            now = int(self.server.clock.seconds())
            return {
                "id": self.ident,
                "object": "response",
                "created_at": now,
                "completed_at": now,
                "status": "completed",
                "model": self.server.model,
                "output": [
                    {
                        "type": "message",
                        "status": "completed",
                        "id": self.item,
                        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
                        "role": "assistant",
                    }
                ],
                "usage": {
                    "input_tokens": len(self.prompt),
                    "output_tokens": len(self.sent),
                    "total_tokens": len(self.prompt) + len(self.sent),
                    "input_tokens_details": {"cached_tokens": timings["cache_n"]},
                },
            }
        if self.api == "chat":
            return {
                "object": "chat.completion",
                "model": self.server.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                ],
                "usage": usage,
                "timings": timings,
            }
        return {
            "content": text,
            "id_slot": self._slotId(),
            "stop": True,
            "timings": timings,
            "tokens_evaluated": len(self.prompt),
        }

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        """An Anthropic message's fields, as llama-server writes them."""
        return {
            "id": self.ident,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": self.server.model,
            "stop_sequence": None,
        }

    def _slotId(self) -> int:
        return self.slot.id if self.slot else -1


def _abort(request: Request) -> None:
    """Drop the connection the way a crashing server would."""
    transport: Any = request.channel.transport
    transport.abortConnection()


def _error(request: Request, status: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    kind = {401: "authentication_error", 501: "not_supported_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return json.dumps({"error": {"code": status, "message": message, "type": kind}}).encode()


class FakeLlamaResource(Resource):
    """llama-server's HTTP API over a FakeLlama."""

    isLeaf = True

    def __init__(self, server: FakeLlama) -> None:
        super().__init__()
        self.llama = server
        self.routes: dict[tuple[bytes, bytes], Callable[[Request], bytes | int]] = {
            (b"GET", b"/health"): lambda r: self._json(r, {"status": "ok"}),
            (b"GET", b"/v1/health"): lambda r: self._json(r, {"status": "ok"}),
            (b"GET", b"/props"): lambda r: self._json(r, server.props()),
            (b"GET", b"/v1/models"): self._models,
            (b"GET", b"/models"): self._models,
            (b"GET", b"/slots"): self._slots,
            (b"POST", b"/apply-template"): self._applyTemplate,
            (b"POST", b"/tokenize"): self._tokenize,
            (b"POST", b"/v1/chat/completions"): self._chat,
            (b"POST", b"/chat/completions"): self._chat,
            (b"POST", b"/completion"): self._completion,
            (b"POST", b"/completions"): self._completion,
            (b"POST", b"/v1/completions"): self._completion,
            (b"POST", b"/v1/messages"): self._anthropic,
            (b"POST", b"/v1/responses"): self._responses,
            (b"POST", b"/responses"): self._responses,
        }

    def render(self, request: Request) -> bytes | int:
        faults = self.llama.faults
        if faults.down:
            _abort(request)
            return NOT_DONE_YET
        # llama-server (cpp-httplib) percent-decodes the path before it routes.
        request.path = unquote_to_bytes(request.path)
        key = self.llama.apiKey
        if key and request.path not in _PUBLIC:
            given = request.getHeader(b"authorization") or ""
            if given != f"Bearer {key}":
                return _error(request, 401, "Invalid API Key")
        route = self.routes.get((request.method, request.path))
        if route is None and request.method == b"POST" and request.path.startswith(b"/slots/"):
            route = self._slotAction
        if route is None:
            return _error(request, 404, "File Not Found")
        if faults.slowHeaders > 0:
            self.llama.clock.callLater(faults.slowHeaders, self._finishLater, request, route)
            return NOT_DONE_YET
        return route(request)

    def _finishLater(self, request: Request, route: Callable[[Request], bytes | int]) -> None:
        if request.channel is None:
            return
        result = route(request)
        if isinstance(result, bytes):
            request.write(result)
            request.finish()

    def _json(self, request: Request, value: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    def _models(self, request: Request) -> bytes:
        return self._json(
            request,
            {"object": "list", "data": [{"id": self.llama.model, "object": "model", "owned_by": "llamacpp"}]},
        )

    def _slots(self, request: Request) -> bytes:
        return self._json(
            request,
            [
                {
                    "id": s.id,
                    "is_processing": s.busy,
                    "n_ctx": self.llama.nCtx,
                    "n_prompt_tokens": len(s.tokens),
                    "prompt": s.prompt,
                }
                for s in self.llama.slots
            ],
        )

    def _slotAction(self, request: Request) -> bytes | int:
        action = (request.args.get(b"action") or [b""])[0].decode()
        try:
            slot = self.llama.slots[int(request.path.rsplit(b"/", 1)[1])]
        except (ValueError, IndexError):
            return _error(request, 400, "Invalid slot ID")
        if action not in ("save", "restore", "erase"):
            return _error(request, 400, "Invalid action")

        body = self._body(request) or {}
        if (
            action == "save"
            and self.llama.faults.dieOnSave
            and not str(body.get("filename")).startswith("bioproxy-probe")
        ):
            self.llama.faults.down = True
            _abort(request)
            return NOT_DONE_YET

        def answer(result: tuple[int, dict[str, Any]]) -> None:
            status, value = result
            if request.channel is None:
                return
            if status == 200:
                request.write(self._json(request, value))
            else:
                request.write(_error(request, status, value["message"]))
            request.finish()

        d = defer.ensureDeferred(SlotAction(self.llama).run(slot, action, body))
        d.addCallback(answer)
        return NOT_DONE_YET

    def _applyTemplate(self, request: Request) -> bytes:
        body = self._body(request)
        if body is None or not isinstance(body.get("messages"), list):
            return _error(request, 400, "invalid request")
        return self._json(request, {"prompt": chatPrompt(body["messages"])})

    def _tokenize(self, request: Request) -> bytes:
        body = self._body(request)
        if body is None or not isinstance(body.get("content"), str):
            return _error(request, 400, "invalid request")
        return self._json(request, {"tokens": list(tokenize(body["content"]))})

    def _body(self, request: Request) -> dict[str, Any] | None:
        try:
            content: Any = request.content
            body = json.loads(content.read())
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _chat(self, request: Request) -> bytes | int:
        body = self._body(request)
        if body is None or not isinstance(body.get("messages"), list):
            return _error(request, 400, "invalid chat request")
        return self._start(request, body, tokenize(chatPrompt(body["messages"])), "chat")

    def _anthropic(self, request: Request) -> bytes | int:
        body = self._body(request)
        messages = anthropicMessages(body) if body is not None else None
        if body is None or messages is None:
            return _error(request, 400, "'messages' is required")
        return self._start(request, body, tokenize(chatPrompt(messages)), "anthropic")

    def _responses(self, request: Request) -> bytes | int:
        body = self._body(request)
        messages = responsesMessages(body) if body is not None else None
        if body is None or messages is None:
            return _error(request, 400, "'input' is required")
        return self._start(request, body, tokenize(chatPrompt(messages)), "responses")

    def _completion(self, request: Request) -> bytes | int:
        body = self._body(request)
        prompt = body.get("prompt") if body is not None else None
        if isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < 256 for t in prompt):
            tokens = bytes(prompt)  # a prompt given as tokens, which are bytes here
        elif isinstance(prompt, str):
            tokens = tokenize(prompt)
        else:
            return _error(request, 400, "invalid completion request")
        assert body is not None
        return self._start(request, body, tokens, "completion")

    def _start(self, request: Request, body: dict[str, Any], prompt: bytes, api: Api) -> int:
        pinned = body.get("id_slot")
        if pinned is not None and (not isinstance(pinned, int) or pinned >= len(self.llama.slots)):
            request.write(_error(request, 400, "Invalid id_slot"))
            request.finish()
            return NOT_DONE_YET
        generation = _Generation(self.llama, request, body, prompt, api)
        defer.ensureDeferred(generation.run()).addErrback(
            lambda f: f.printTraceback() if not generation.cancelled else None
        )
        return NOT_DONE_YET


class FakeRouter(Resource):
    """
    llama-server's router mode (`--models-dir` and no model; build 11434's
    server-models.cpp): one FakeLlama per model, started on demand, at
    most modelsMax at once, the least recently used (by POST) unloaded
    first. Each request names its model (the body's `model`, a GET's
    `?model=`); `?autoload=false` refuses one that is not loaded instead
    of loading it. Loading a model is a new process: every slot empty, a
    new media marker (FakeLlama.restart); its files stay.
    """

    isLeaf = True

    def __init__(
        self,
        models: dict[str, FakeLlama],
        modelsMax: int = 4,
        autoload: bool = True,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__()
        self.servers = models
        self.resources = {name: FakeLlamaResource(server) for name, server in models.items()}
        self.modelsMax = modelsMax
        self.autoload = autoload
        self.aliases = aliases or {}
        self.loaded: list[str] = []  # least recently used first
        self.loads: list[str] = []  # each load, in order (for tests)
        for name, server in models.items():
            server.model = name

    def load(self, name: str) -> None:
        if name in self.loaded:
            return
        while self.modelsMax > 0 and len(self.loaded) >= self.modelsMax:
            self.unload(self.loaded[0])
        self.servers[name].restart()
        self.loaded.append(name)
        self.loads.append(name)

    def unload(self, name: str) -> None:
        if name in self.loaded:
            self.loaded.remove(name)
            self.servers[name].restart()  # what it held is gone with its process

    def _resolve(self, name: str) -> str | None:
        if name in self.servers:
            return name
        return next((n for n, names in self.aliases.items() if name in names), None)

    def render(self, request: Request) -> bytes | int:
        request.path = unquote_to_bytes(request.path)
        method, path = request.method, request.path
        if method == b"GET" and path in (b"/health", b"/v1/health"):
            return _json(request, {"status": "ok"})
        if method == b"GET" and path in (b"/v1/models", b"/models"):
            return _json(request, {"object": "list", "data": [self._model(n) for n in self.servers]})
        query = (request.args.get(b"model") or [b""])[0].decode()
        if method == b"GET" and path == b"/props" and not query:
            return _json(
                request,
                {
                    "role": "router",
                    "max_instances": self.modelsMax,
                    "models_autoload": self.autoload,
                    "model_alias": "llama-server",
                    "model_path": "none",
                    "default_generation_settings": {"params": {}, "n_ctx": 0},
                    "build_info": "fake-0",
                },
            )
        if method == b"POST" and path in (b"/models/load", b"/models/unload"):
            name = self._resolve(str(_readJSON(request).get("model", "")))
            if name is None:
                return _error(request, 400, "model is not found")
            (self.load if path == b"/models/load" else self.unload)(name)
            return _json(request, {"success": True})
        name = query if method == b"GET" else str(_readJSON(request).get("model") or "")
        if not name:
            return _error(request, 400, "model name is missing from the request")
        resolved = self._resolve(name)
        if resolved is None:
            return _error(request, 400, f"model '{name}' not found")
        given = (request.args.get(b"autoload") or [b""])[0].decode()
        autoload = self.autoload if not given else given in ("true", "1")
        if resolved not in self.loaded:
            if not autoload:
                return _error(request, 400, "model is not loaded")
            self.load(resolved)
        if method == b"POST":  # the last use, for the LRU order
            self.loaded.remove(resolved)
            self.loaded.append(resolved)
        content: Any = request.content
        content.seek(0)
        return self.resources[resolved].render(request)

    def _model(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "aliases": self.aliases.get(name, []),
            "object": "model",
            "owned_by": "llamacpp",
            "status": {"value": "loaded" if name in self.loaded else "unloaded"},
        }


def _json(request: Request, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value).encode()


def _readJSON(request: Request) -> dict[str, Any]:
    content: Any = request.content
    content.seek(0)
    try:
        body = json.loads(content.read() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake llama-server for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ms-per-prompt-token", type=float, default=0.2)
    parser.add_argument("--ms-per-generated-token", type=float, default=20.0)
    parser.add_argument("--slot-save-path", type=Path, default=None)
    parser.add_argument("--no-cache-ram", action="store_true", help="model --cache-ram 0")
    parser.add_argument(
        "--explicit-slots", action="store_true", help="model an explicit -np: slots keep their contents"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--memory", choices=["dense", "hybrid", "swa"], default="dense", help="the model's kind"
    )
    parser.add_argument(
        "--models", default=None, help="router mode: these models (comma-separated), loaded on demand"
    )
    parser.add_argument("--models-max", type=int, default=4, help="router mode: models loaded at once")
    args = parser.parse_args(argv)

    import sys

    from twisted.internet import reactor
    from twisted.python import log

    log.startLogging(sys.stdout)

    def server(model: str = MODEL) -> FakeLlama:
        return FakeLlama(
            reactor,
            slots=args.slots,
            msPerPromptToken=args.ms_per_prompt_token,
            msPerGeneratedToken=args.ms_per_generated_token,
            model=model,
            saveDir=args.slot_save_path,
            cacheRam=not args.no_cache_ram,
            unified=not args.explicit_slots,
            apiKey=args.api_key,
            memory=args.memory,
        )

    resource: Resource = FakeLlamaResource(server())
    if args.models:
        names = [n for n in args.models.split(",") if n]
        resource = FakeRouter({n: server(n) for n in names}, modelsMax=args.models_max)
    running: Any = reactor
    running.listenTCP(args.port, Site(resource), interface=args.host)
    running.run()


if __name__ == "__main__":
    main()
