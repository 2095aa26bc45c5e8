# -*- test-case-name: tests.unit.test_shapes,tests.unit.test_conversations -*-
"""
Heads: the starts of prompts that bioproxy keeps warm. A template as a
chat's first message is one; so is a template behind a system prompt or a
few-shot preamble (a variant), a template sent as a completion prompt, and
a long untemplated start that recurs, such as an agent's system prompt and
tools (learned).

A head is a chat view (or a prompt) with a mark where the part that varies
begins. llama-server renders it, and its warmup sends the tokens before the
mark (CacheIO.boundary): what every request that uses the head begins with. Variants and learned
heads are kept in a book, least recently used first out, within a count
and a disk budget; they are learned from requests as they arrive, warmed
after `learn_after` uses, and saved like templates, so that a llama-server
restart keeps them.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from .expand import WRITTEN_ROLES, ChatView, chain, promptText
from .routes import Shape
from .templates import Template, TemplateLibrary

# Where the varying part of a head begins (the user's message, or prompt).
MARK = "\u2063bioproxy-message\u2063"
# The metrics label of every conversation's head (Head.label).
CONVERSATION_LABEL = "(conversation)"
# Where a variant's template text goes, until the template's version is known.
_TEMPLATE = "\u2063bioproxy-template\u2063"
# A conversation is kept once it has this many tokens past the head it
# began with (a template, a learned head), whose own file gives back the rest.
BEYOND_HEAD = 128
# A conversation is saved at once, not only once it goes idle, when it has
# grown by this many tokens (estimatedTokens) since its last file.
CONVERSATION_GROWTH = 8192
# Starts remembered as long enough by their token counts (HeadBook.measured).
MEASURED = 1024
# A learned head shorter than this (in tokens, as estimatedTokens counts
# them) is not worth a warmup and a file: llama-server computes it in moments.
MIN_LEARNED_TOKENS = 512


def estimatedTokens(text: str) -> int:
    """
    About how many tokens text is, in any script, without asking the
    tokenizer (this runs on every request): about four ASCII characters a
    token, as English and code come out, and one a character otherwise,
    as Chinese and Japanese roughly do (which overcounts Cyrillic or Greek,
    keeping a few heads that are a little short). Counting characters
    instead kept no 1,000-token prompt in Chinese or Japanese.
    """
    ascii = len(text.encode("ascii", "ignore"))
    return ascii // 4 + (len(text) - ascii)


class Kind(enum.Enum):
    TEMPLATE = "template"  # the template as a chat's first and only user text
    PROMPT = "prompt"  # the template as a completion prompt
    VARIANT = "variant"  # the template behind leading messages or tools
    LEARNED = "learned"  # an untemplated start that recurs
    CONVERSATION = "conversation"  # a conversation's messages so far, up to its next answer


@dataclasses.dataclass(frozen=True)
class Head:
    name: str  # labels metrics, warmups and files: "@code", "@code+1a2b3c4d", "~1a2b3c4d"
    kind: Kind
    template: Template | None
    view: ChatView | None  # a chat head, with MARK where the message goes
    prompt: str | None  # a completion head, with MARK
    digest: str  # of what the warmup sends; a template's own hash for a plain template

    @property
    def key(self) -> str:
        """Names this version of the head: what a slot holds, and its cache file."""
        return f"{self.name}@{self.digest[:12]}"

    @property
    def learned(self) -> bool:
        """Known only from requests since bioproxy started, so any file of it is one this process wrote."""
        return self.kind is not Kind.TEMPLATE

    @property
    def label(self) -> str:
        """Its metrics label: conversations come and go, and share one, so that label sets stay bounded."""
        return CONVERSATION_LABEL if self.kind is Kind.CONVERSATION else self.name

    def warmBody(self, slot: int | None) -> dict[str, Any]:
        """
        The head with the mark emptied, one token, pinned unless slot is
        None: the warmup only where llama-server cannot say where the mark's
        tokens begin (CacheIO.boundary), since it ends past the boundary.
        """
        body: dict[str, Any]
        if self.prompt is not None:
            body = {"prompt": self.prompt.replace(MARK, ""), "n_predict": 1, "cache_prompt": True}
        else:
            assert self.view is not None
            body = {**_filled(self.view, ""), "max_tokens": 1, "cache_prompt": True, "stream": False}
        if slot is not None:
            body["id_slot"] = slot
        return body

    def measureBody(self) -> dict[str, Any] | None:
        """The chat whose rendering, cut at MARK, is what a warm slot saves; None for a prompt head."""
        return _filled(self.view, MARK) if self.view is not None else None

    def heldText(self) -> str | None:
        """
        A conversation's messages as placement compares prompts: a slot
        whose text starts with them holds the conversation (its answer too,
        maybe). None for other heads, which slots hold by key.
        """
        if self.kind is not Kind.CONVERSATION or self.view is None:
            return None
        return promptText(ChatView(self.view.head, self.view.messages[: -len(_NEXT_ANSWER)]))

    def summary(self) -> str:
        """
        What the head is made of, for the operator: the roles and sizes of
        its messages (for a variant, those before its template's), never
        their text.
        """
        if self.view is None:
            return "a completion prompt"
        parts = []
        tools = self.view.head.get("tools")
        if isinstance(tools, list) and tools:
            parts.append(f"{len(tools)} tool{'s' if len(tools) > 1 else ''}")
        for message in self.view.messages:
            content = message.get("content") if isinstance(message, dict) else None
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            if MARK in text:
                break  # where the user's message goes: the template's message, or the next turn
            role = message.get("role", "?") if isinstance(message, dict) else "?"
            parts.append(f"{role} {_size(len(text.encode()))}")
        return ", ".join(parts) or "nothing"

    def warmText(self) -> str:
        """What a slot that computed the warmup starts with, as placement compares prompts."""
        if self.prompt is not None:
            return promptText(None, self.prompt.replace(MARK, ""))
        assert self.view is not None
        return promptText(ChatView(*_split(_filled(self.view, ""))))


def _filled(view: ChatView, message: str) -> dict[str, Any]:
    body: dict[str, Any] = _replace(view.body(), MARK, message)
    return body


def _replace(value: Any, old: str, new: str) -> Any:
    """value with old replaced by new in every string, as new containers."""
    if isinstance(value, str):
        return value.replace(old, new) if old in value else value
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def templateHead(template: Template) -> Head:
    """The template as a chat's only message: what every template's warmup has always sent."""
    view = ChatView({}, [{"role": "user", "content": template.render(MARK)}])
    return Head(template.prefix, Kind.TEMPLATE, template, view, None, template.hash)


@dataclasses.dataclass(frozen=True)
class Shell:
    """What a request starts with, before any template version is filled in: how a head is learned."""

    kind: Kind
    prefix: str | None  # the template's, for variants and prompts
    view: ChatView | None  # with _TEMPLATE where the template goes, and MARK where the message goes
    digest: str
    # The client marked a cache_control breakpoint in it: a start it says is
    # worth keeping, so it is kept from its first use and whatever its length.
    marked: bool = False
    # Too short to keep as estimatedTokens counts it, until a request's own
    # token count says otherwise (HeadBook.measured).
    short: bool = dataclasses.field(default=False, compare=False)

    @property
    def name(self) -> str:
        if self.kind is Kind.PROMPT:
            return f"{self.prefix}:prompt"
        if self.kind is Kind.VARIANT:
            return f"{self.prefix}+{self.digest[:8]}"
        if self.kind is Kind.CONVERSATION:
            return conversationName(self.digest)
        return f"~{self.digest[:8]}"

    def head(self, library: TemplateLibrary) -> Head | None:
        """The head with the template's current version; None when the template is gone."""
        if self.kind is Kind.LEARNED:
            return Head(self.name, self.kind, None, self.view, None, self.digest)
        if self.kind is Kind.CONVERSATION:
            assert self.view is not None
            view = ChatView(self.view.head, self.view.messages + _NEXT_ANSWER)
            return Head(self.name, self.kind, None, view, None, self.digest)
        template = library.templates.get(self.prefix or "")
        if template is None:
            return None
        rendered = template.render(MARK)
        if self.kind is Kind.PROMPT:
            return Head(self.name, self.kind, template, None, rendered, _digest([template.hash, "prompt"]))
        assert self.view is not None
        view = ChatView(*_split(_replace(self.view.body(), _TEMPLATE, rendered)))
        return Head(self.name, self.kind, template, view, None, _digest([template.hash, self.digest]))


def _split(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    messages = body.pop("messages")
    return body, messages


def shellOf(
    shape: Shape,
    view: ChatView | None,
    found: tuple[Template, int, int | None] | None,
    marked: bool = False,
) -> Shell | None:
    """
    What a request (its chat view after expansion, and where its first
    template was before) starts with, when that is worth keeping warm:
    a variant, a prompt head, or a long untemplated start. None for a plain
    template (always warm) and for starts too short to matter, unless the
    client marked a cache_control breakpoint in them (marked: in its system
    blocks or tools, which the chat view does not keep; the view's own
    message parts are looked at here).
    """
    if shape is Shape.PROMPT:
        return None if found is None else Shell(Kind.PROMPT, found[0].prefix, None, "")
    if view is None:
        return None
    if found is not None:
        template, i, j = found
        messages = view.messages[:i] + [_cut(view.messages[i], j, _TEMPLATE)]
        if not view.head and i == 0 and j is None and messages[0].get("role") == "user":
            return None  # the template itself
        shell = ChatView(view.head, messages)
        return Shell(Kind.VARIANT, template.prefix, shell, _digest(shell.body()))
    opening = list(_opening(view.messages))
    # The user's prompt is the last user text before the first answer; what
    # follows it (Claude Code adds a system message there) is not shared.
    users = [k for k, message in enumerate(opening) if message.get("role") == "user"]
    if not users:
        return None
    last = opening[users[-1]]
    content = last.get("content")
    if isinstance(content, list):
        texts = [k for k, p in enumerate(content) if isinstance(p, dict) and p.get("type") == "text"]
        if not texts:
            return None
        messages = opening[: users[-1]] + [_cut(last, texts[-1], MARK)]
    else:
        messages = opening[: users[-1]] + [{"role": "user", "content": MARK}]
    shell = ChatView(view.head, messages)
    # A breakpoint before the prompt (the last part is the prompt's place).
    parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]][:-1]
    marked = marked or any(isinstance(p, dict) and p.get("cache_control") for p in parts)
    estimated = estimatedTokens(promptText(shell))
    if estimated < MIN_LEARNED_TOKENS // 8 and not marked:
        return None  # short even in the densest tokenizer
    short = estimated < MIN_LEARNED_TOKENS and not marked
    return Shell(Kind.LEARNED, None, shell, _digest(shell.body()), marked, short)


# What a conversation's head adds after its messages: the answer to come,
# whose text is where the next turn begins (its header is shared), and a
# question after it, so that the answer renders as every later turn shows it
# (a chat template may render the last message otherwise: a thinking block).
_NEXT_ANSWER = [{"role": "assistant", "content": MARK}, {"role": "user", "content": "."}]
# Roles after which the next message is the model's answer.
_ASKING_ROLES = frozenset({"user", "tool", "system", "developer"})


def conversationName(digest: str) -> str:
    return f"#{digest[:12]}"


def conversationShell(
    view: ChatView | None,
    tokens: int | None = None,
    links: Callable[[], list[str]] | None = None,
    covered: int = 0,
) -> tuple[Shell, list[str], int] | None:
    """
    A chat that was just answered, as a conversation whose next turn will
    extend it, with its hash chain (links, if known) and its length (tokens:
    its prompt tokens, as its answer counted them; else estimated), if it
    ends where the model answers next, is MIN_LEARNED_TOKENS long and goes
    on for BEYOND_HEAD tokens past what another head keeps (covered: the
    tokens of the template or learned head it began with). A one-off
    question to a template is not worth a file of its own: the template's
    file gives back all but the question.
    """
    if view is None or not view.messages:
        return None
    last = view.messages[-1]
    if not isinstance(last, dict) or last.get("role") not in _ASKING_ROLES:
        return None
    if tokens is None:
        tokens = estimatedTokens(promptText(view))
    if tokens < MIN_LEARNED_TOKENS or tokens - covered < BEYOND_HEAD:
        return None
    chained = links() if links is not None else chain(view)
    return Shell(Kind.CONVERSATION, None, view, chained[-1]), chained, tokens


def _opening(messages: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The messages before the first answer: what every turn of a conversation starts with."""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in WRITTEN_ROLES:
            return
        yield message


def _cut(message: dict[str, Any], part: int | None, text: str) -> dict[str, Any]:
    """message up to its content part (or its string content), which becomes text."""
    if part is None:
        return {**message, "content": text}
    parts = list(message["content"][:part]) + [{**message["content"][part], "text": text}]
    return {**message, "content": parts}


def locate(view: ChatView | None, library: TemplateLibrary) -> tuple[Template, int, int | None] | None:
    """The first text of view a user wrote that starts with a prefix: template, message, part."""
    if view is None:
        return None
    for i, message in enumerate(view.messages):
        if not isinstance(message, dict) or message.get("role") not in WRITTEN_ROLES:
            continue
        content = message.get("content")
        if isinstance(content, str):
            found = library.match(content)
            if found is not None:
                return found[0], i, None
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    found = library.match(part["text"])
                    if found is not None:
                        return found[0], i, j
    return None


@dataclasses.dataclass
class Entry:
    shell: Shell
    uses: int = 0
    lastUsed: float = 0.0
    bytes: int = 0  # of its file, once saved
    chain: tuple[str, ...] = ()  # a conversation's hash chain (chain())
    tokens: int = 0  # a conversation's length, as estimatedTokens counts it


class HeadBook:
    """
    Every head bioproxy knows: each template's own, and the variants and
    learned heads seen in requests, with their uses. The one owner of which
    heads exist; the warmer warms them, the cache keeps their facts.
    """

    def __init__(
        self,
        library: TemplateLibrary,
        clock: Callable[[], float],
        learnAfter: int = 1,
        maxLearned: int = 32,
        maxBytes: int = 0,
        maxConversations: int = 64,
    ) -> None:
        self.library = library
        self.clock = clock
        self.learnAfter = learnAfter
        self.maxLearned = maxLearned
        self.maxConversations = maxConversations
        self.maxBytes = maxBytes  # 0: no disk budget (shared by learned heads and conversations)
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()  # least recent first
        self.dropped: list[Callable[[str], None]] = []  # told of a head given up
        # Starts found long enough by their token counts, though short by estimate (measured).
        self.long: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Counts changes to which heads there are and their files, for whoever
        # keeps a copy (state.StateFile); a use alone does not count.
        self.changes = 0

    def get(self, name: str) -> Head | None:
        template = self.library.templates.get(name)
        if template is not None:
            return templateHead(template)
        entry = self.entries.get(name)
        if entry is None or not self._kept(entry):
            return None
        return entry.shell.head(self.library)

    def wanted(self) -> list[Head]:
        """Every head to keep warm: each template's, then those learned, most recently used first."""
        return [templateHead(t) for t in self.library.templates.values()] + self.learnedHeads()

    def learnedHeads(self) -> list[Head]:
        """The heads learned from requests and kept warm (variants and starts), most recently used first."""
        heads = []
        for entry in reversed(self.entries.values()):
            if entry.shell.kind is Kind.CONVERSATION:
                continue  # saved once it goes idle (Warmer.conversationServed), restored by its next turn
            head = entry.shell.head(self.library) if self._kept(entry) else None
            if head is not None:
                heads.append(head)
        return heads

    def variantsOf(self, prefix: str) -> list[Head]:
        """The kept heads built on template prefix, most recently used first: the entries alone are looked at,
        so that a listing of every template's is linear in the templates."""
        heads = []
        for entry in reversed(self.entries.values()):
            if entry.shell.prefix == prefix and self._kept(entry):
                head = entry.shell.head(self.library)
                if head is not None:
                    heads.append(head)
        return heads

    def observe(self, shell: Shell | None, template: Template | None) -> Head | None:
        """
        A request starts with shell (or, if None, with template alone, or
        nothing known): count a use, and return the head it starts with, to
        place it and make its slot ready. Once the request is answered,
        its slot is saved as the head's file (Warmer.saveServed).
        """
        if shell is None or (shell.short and shell.digest not in self.long):
            return templateHead(template) if template is not None else None
        entry = self.entries.pop(shell.name, None)
        if entry is None:
            entry = Entry(shell)
            self.changes += 1
        entry.uses += 1
        entry.lastUsed = self.clock()
        self.entries[shell.name] = entry
        self._bound()
        return entry.shell.head(self.library)

    def pending(self, head: Head) -> tuple[int, int] | None:
        """A learned head not kept yet: its uses so far and those it needs (learn_after); else None."""
        entry = self.entries.get(head.name) if head.learned else None
        if entry is None or self._kept(entry):
            return None
        return entry.uses, self.learnAfter

    def skipped(self) -> list[dict[str, Any]]:
        """The starts seen in requests that are not kept warm, and why: too few uses yet (learn_after)."""
        return [
            {
                "name": name,
                "kind": e.shell.kind.value,
                "template": e.shell.prefix,
                "uses": e.uses,
                "reason": "not_learned",
                "reason_text": f"not learned yet (seen {e.uses} of {self.learnAfter} times)",
            }
            for name, e in self.entries.items()
            if e.shell.kind is not Kind.CONVERSATION and not self._kept(e)
        ]

    def divergence(self, view: ChatView | None) -> tuple[int, str] | None:
        """
        Where view parts from the kept conversation it shares most messages
        with: the index and role of its first message that differs (an
        edited or compacted history), or None when it shares none, or
        continues one (conversationsOf finds those).
        """
        if view is None:
            return None
        best: tuple[int, str] | None = None
        for entry in self.conversations():
            kept = entry.shell.view
            if kept is None or kept.head != view.head:
                continue
            common = 0
            for mine, theirs in zip(view.messages, kept.messages, strict=False):
                if mine != theirs:
                    break
                common += 1
            if 0 < common < min(len(kept.messages), len(view.messages)) and (
                best is None or common > best[0]
            ):
                role = view.messages[common].get("role") if isinstance(view.messages[common], dict) else None
                best = (common, str(role or "unknown"))
        return best

    def measured(self, shell: Shell, tokens: int) -> None:
        """
        A request that began with shell, too short to keep as estimated,
        came to this many tokens of it, counted by the model's own tokenizer
        (Dispatcher: its share of the request's prompt tokens). Long enough,
        it is kept from its next use on, in any script and any tokenizer.
        """
        if tokens >= MIN_LEARNED_TOKENS:
            self.long[shell.digest] = None
            self.long.move_to_end(shell.digest)
            while len(self.long) > MEASURED:
                self.long.popitem(last=False)

    def conversations(self) -> list[Entry]:
        """The conversations kept, least recently used first."""
        return [e for e in self.entries.values() if e.shell.kind is Kind.CONVERSATION]

    def conversationsOf(
        self, view: ChatView | None, links: Callable[[], list[str]] | None = None
    ) -> list[Head]:
        """
        The kept conversations whose messages view starts with, longest
        first. links: its hash chain, worked out only when some are kept.
        """
        if view is None or not any(e.shell.kind is Kind.CONVERSATION for e in self.entries.values()):
            return []
        found = []
        for link in reversed(links() if links is not None else chain(view)):
            entry = self.entries.get(conversationName(link))
            if entry is not None:
                found.append(entry.shell.head(self.library))
        return [head for head in found if head is not None]

    def served(
        self,
        view: ChatView | None,
        tokens: int | None = None,
        links: Callable[[], list[str]] | None = None,
        covered: int = 0,
    ) -> tuple[Head, bool] | None:
        """
        A chat was answered: keep it as a conversation whose next turn
        resumes from it, if it is one (conversationShell). Returns its head,
        and whether it has grown by CONVERSATION_GROWTH tokens since the last
        file of it was saved, if one was (then it is saved at once, not once
        idle). A
        shorter start of it that was never saved never will be: it goes.
        """
        found = conversationShell(view, tokens, links, covered) if self.maxConversations else None
        if found is None:
            return None
        shell, chained, tokens = found
        entry = self.entries.pop(shell.name, None)
        if entry is None:
            entry = Entry(shell, chain=tuple(chained), tokens=tokens)
            self.changes += 1
        entry.uses += 1
        entry.lastUsed = self.clock()
        self.entries[shell.name] = entry
        saved = 0  # the tokens of its last file
        for link in chained[:-1]:
            older = self.entries.get(conversationName(link))
            if older is not None and older.bytes:
                saved = max(saved, older.tokens)
            elif older is not None:
                self._drop(older.shell.name)
        self._bound()
        head = shell.head(self.library)
        if head is None or shell.name not in self.entries:
            return None  # none are kept (max_conversations: 0)
        # Saved at once only when it has grown much since its last file: a
        # first file waits for a pause (a save holds llama-server's loop).
        return head, bool(saved) and entry.tokens - saved >= CONVERSATION_GROWTH

    def savedBytes(self, name: str, size: int) -> None:
        """A file of head name was saved: it counts in the disk budget, and replaces its conversation's older ones."""
        entry = self.entries.get(name)
        if entry is not None:
            entry.bytes = size
            self.changes += 1
            for link in entry.chain[:-1]:
                if conversationName(link) in self.entries:
                    self._drop(conversationName(link))
            self._bound()

    def _kept(self, entry: Entry) -> bool:
        """Used often enough to keep warm, or marked by its client as worth keeping."""
        return entry.uses >= (1 if entry.shell.marked else self.learnAfter)

    def _bound(self) -> None:
        """Least recently used out: past the count of learned heads, of conversations, or the bytes on disk."""
        while True:
            conversations = self.conversations()
            if len(self.entries) - len(conversations) > self.maxLearned:
                victim = next(n for n, e in self.entries.items() if e.shell.kind is not Kind.CONVERSATION)
            elif len(conversations) > self.maxConversations:
                victim = conversations[0].shell.name
            elif (
                self.maxBytes
                and sum(e.bytes for e in self.entries.values()) > self.maxBytes
                and len(self.entries) > 1
            ):
                victim = next(iter(self.entries))
            else:
                return
            self._drop(victim)

    def _drop(self, name: str) -> None:
        del self.entries[name]
        self.changes += 1
        for listener in self.dropped:
            listener(name)

    def entriesData(self) -> list[dict[str, Any]]:
        """Every entry as JSON-ready data, least recently used first (addEntries' input)."""
        return [
            {
                "kind": e.shell.kind.value,
                "template": e.shell.prefix,
                "view": e.shell.view.body() if e.shell.view is not None else None,
                "digest": e.shell.digest,
                "marked": e.shell.marked,
                "uses": e.uses,
                "last_used": e.lastUsed,
                "file_bytes": e.bytes,
            }
            for e in self.entries.values()
        ]

    def addEntries(self, entries: list[dict[str, Any]]) -> None:
        """Entries from entriesData, older than any learned since; one that does not read is skipped."""
        for data in reversed(entries):
            try:
                view = data["view"]
                shell = Shell(
                    Kind(data["kind"]),
                    data["template"],
                    ChatView(*_split(dict(view))) if view is not None else None,
                    str(data["digest"]),
                    bool(data.get("marked", False)),
                )
                entry = Entry(shell, int(data["uses"]), float(data["last_used"]), int(data["file_bytes"]))
            except Exception:  # noqa: BLE001 - an entry that does not read is skipped, whatever is wrong with it
                continue
            if shell.kind is Kind.CONVERSATION:
                try:
                    found = conversationShell(shell.view)
                except Exception:  # noqa: BLE001 - its messages do not render (nested past Python's limit)
                    continue
                if found is None or found[0].digest != shell.digest:
                    continue  # not what was kept: its messages were changed
                entry.chain, entry.tokens = tuple(found[1]), found[2]
            if shell.kind is not Kind.TEMPLATE and shell.name not in self.entries:
                self.entries[shell.name] = entry
                self.entries.move_to_end(shell.name, last=False)
        self._bound()

    def view(self) -> dict[str, Any]:
        return {
            name: {
                "kind": e.shell.kind.value,
                "template": e.shell.prefix,
                "uses": e.uses,
                "last_used": e.lastUsed,
                "file_bytes": e.bytes,
                "warmed": self._kept(e),
                "marked": e.shell.marked,
            }
            for name, e in self.entries.items()
        }


def _size(n: int) -> str:
    """A size as an operator reads it."""
    return f"{n} B" if n < 1000 else f"{n / 1000:.1f} KB"
