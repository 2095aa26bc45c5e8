# -*- test-case-name: tests.unit.test_router -*-
"""
Which backend a request goes to, and on which backends a head is warmed.

One backend's placement rule, across several: a request goes where its
head is warm (in a slot or llama-server's RAM cache, else in a file it can
restore); a head warm nowhere goes to the backend that rendezvous hashing
of its key picks among the healthy ones, so heads spread by weight and
stay put when a backend joins or leaves (only the leaver's heads move). A
load guard overrides both when the backends are out of balance, as the
SGLang model gateway does: the busiest has more than balance_threshold
(64) more user requests than the least busy and more than balance_ratio
(1.5) times as many; then the least busy gets the request. Which slot, and users before warmups,
stay each backend's scheduler's to decide.

A head is warmed on warm_on backends (all, if None) among the healthy:
those where it is warmest first (of equals, where it last went), then the
next by its hash. A backend that comes back
therefore takes no head that is warm elsewhere, and one that goes away
hands its heads to the next in each head's order.

Several models (llama-server's router, where each model is a backend of
its own, added as models.py finds them; or llama-servers of different
models): a request goes only to the backends that serve the model it
names, and where none does, to the others, whose own answer it gets. The
rule above then holds among the backends of each model. A head is warmed
for the models configured for it (`models`, `template_models`) and for
each model its requests have named.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger

from .backend.process import BackendListener
from .backend.scheduler import BackendGone
from .body import Body
from .errors import failRequest, writeError
from .forward import Outcome
from .heads import Head
from .serve import ProxyRequest

log = Logger()

BALANCE_ABS = 64
BALANCE_REL = 1.5
REMEMBERED = 1024  # heads whose last backend is remembered, most recent kept
HEADER = b"x-bioproxy-backend"


class Placed(Protocol):
    """
    What the router sees of a backend (a backend.member.Member): its
    health, load and warmth of a head to place by, and what it may ask of
    it. It sets nothing inside one.
    """

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def model(self) -> str | None: ...
    @property
    def relays(self) -> bool: ...
    def serves(self, model: str) -> bool: ...
    def load(self) -> int: ...
    def warmth(self, head: Head) -> int: ...
    def join(
        self, assigned: Callable[[Head], bool], several: Callable[[], bool], listener: BackendListener
    ) -> None: ...
    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None: ...
    def forward(
        self, request: ProxyRequest, body: bytes | None = None, replaceable: bool = False
    ) -> defer.Deferred[Outcome]: ...
    def refused(self) -> None: ...
    def rewarm(self) -> None: ...
    def handBack(self) -> None: ...


def rendezvous(key: str, members: Sequence[Placed]) -> list[Placed]:
    """members in key's order: highest random weight first (weighted: -w / ln(u))."""

    def score(member: Placed) -> float:
        digest = hashlib.blake2b(f"{member.name}\0{key}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 0.5) / 2**64  # in (0, 1)
        return -member.weight / math.log(unit)

    return sorted(members, key=score, reverse=True)


def imbalanced(loads: Sequence[int], threshold: int = BALANCE_ABS, ratio: float = BALANCE_REL) -> bool:
    busiest, idlest = max(loads), min(loads)
    return busiest - idlest > threshold and busiest > ratio * idlest


class Router:
    def __init__(
        self,
        members: Sequence[Placed],
        warmOn: int | None = 1,
        threshold: int = BALANCE_ABS,
        ratio: float = BALANCE_REL,
        models: Sequence[str] = (),
        templateModels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.members: list[Placed] = []
        self.warmOn = warmOn  # None: every backend
        self.threshold, self.ratio = threshold, ratio  # the load guard's
        # Where each head last went. Among equally warm backends it stays
        # there: with a shared cache directory a head is on disk at each,
        # and it must not move back to a backend that returns.
        self.last: OrderedDict[str, Placed] = OrderedDict()
        # The models each template is warmed for: configured, then learned
        # from the requests that name one (by template prefix, or head name).
        self.models = tuple(models)
        self.templateModels = {k: tuple(v) for k, v in (templateModels or {}).items()}
        self.named: dict[str, set[str]] = {}
        for member in members:
            self._join(member)

    def add(self, member: Placed) -> None:
        """A backend found after start-up (a model of llama-server's router): placed and warmed from now on."""
        self._join(member)
        self.membersChanged()

    def _join(self, member: Placed) -> None:
        self.members.append(member)
        member.join(self._assigner(member), lambda: len(self.members) > 1, _Watch(self, member))

    # -- placing requests

    def serving(self, model: str | None) -> list[Placed]:
        """The members a request for model may go to: those that serve it, else every other."""
        named = [m for m in self.members if model and m.serves(model)]
        return named or [m for m in self.members if m.model is None] or self.members

    def choose(self, head: Head | None, affinity: str, model: str | None = None) -> Placed:
        """
        The member for a request for model starting with head (None: no
        known head; affinity, the request's own key, orders the members then).
        """
        return self._place(head, affinity, model)[0]

    def _place(self, head: Head | None, affinity: str, model: str | None) -> tuple[Placed, bool]:
        """choose(), and whether the load guard took the request away from where head was warmest."""
        if len(self.members) == 1:
            return self.members[0], False
        pool = self.serving(model)
        if len(pool) == 1:
            return pool[0], False
        candidates = [m for m in pool if m.healthy] or pool
        ordered = rendezvous(head.key if head is not None else affinity, candidates)
        guarded = False
        if len(ordered) > 1 and imbalanced([m.load() for m in ordered], self.threshold, self.ratio):
            chosen = min(ordered, key=lambda m: m.load())
            guarded = head is not None and chosen.warmth(head) < max(m.warmth(head) for m in ordered)
        elif head is None:
            return ordered[0], False
        else:  # max keeps the first of equals: the hash's choice
            chosen = max(ordered, key=lambda m: (m.warmth(head), m is self.last.get(head.name)))
        if head is not None:
            self.last[head.name] = chosen
            self.last.move_to_end(head.name)
            if len(self.last) > REMEMBERED:
                self.last.popitem(last=False)
        return chosen, guarded

    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None:
        """
        A request that runs on a slot: on the chosen member's dispatcher. One
        that was still waiting for a slot when its backend went away had not
        started: it is placed again, on a backend still up.
        """
        # The request's own key only where it decides: body.text flattens the whole prompt.
        several = len(self.members) > 1 and body.head is None
        affinity = (body.conversation or body.text[:4096]) if several else ""
        model = body.parsed.get("model")
        model = model if isinstance(model, str) and model else None
        if model is not None and body.head is not None:
            self._named(body.head, model)
        for _ in self.members:
            member, request.placedByGuard = self._place(body.head, affinity, model)
            self._mark(request, member)
            try:
                await member.send(request, body, pinnable)
                return
            except BackendGone as e:
                log.info("{backend} went away; placing a waiting request again", backend=e)
        writeError(request, 502, "Every backend went away while this request waited for a slot.")

    def forward(
        self, request: ProxyRequest, body: bytes | None = None, tried: tuple[Placed, ...] = ()
    ) -> None:
        """
        Any other request: to the least busy healthy member. One that
        refuses the connection did no work: the request goes to the next,
        and the refusal takes that backend out of placement until its
        health check finds it again.
        """
        left = [m for m in self.members if m not in tried] if tried else self.members
        member = (
            left[0] if len(left) == 1 else min([m for m in left if m.healthy] or left, key=lambda m: m.load())
        )
        self._mark(request, member)
        if len(left) == 1:  # the last (or only) one answers as it can, its own 502 included
            member.forward(request, body)
            return
        d = member.forward(request, body, replaceable=True)
        d.addCallback(self._forwarded, request, body, (*tried, member))
        d.addErrback(lambda reason: failRequest(request, reason))

    def _forwarded(
        self, outcome: Outcome, request: ProxyRequest, body: bytes | None, tried: tuple[Placed, ...]
    ) -> None:
        if outcome.error != "connect" or outcome.status is not None:
            return  # answered, by the backend or with the forwarder's own error
        if outcome.reached:  # it may have done the work: not sent again
            writeError(request, 502, "The backend closed the connection before it answered.")
            return
        member = tried[-1]
        log.info("{backend} refused a connection; placing the request again", backend=member.name)
        member.refused()
        self.forward(request, body, tried)

    def _mark(self, request: ProxyRequest, member: Placed) -> None:
        """The response says which backend answered; with several, the access line does too."""
        request.setHeader(HEADER, member.name.encode())
        if len(self.members) > 1:
            request.backend = member.name

    # -- placing warmups

    def modelsOf(self, head: Head) -> set[str]:
        """The models head is warmed for: those configured for its template, and those its requests named."""
        prefix = head.template.prefix if head.template is not None else None
        configured = self.templateModels.get(prefix, self.models) if prefix is not None else self.models
        return {*configured, *self.named.get(prefix or head.name, ()), *self.named.get(head.name, ())}

    def _named(self, head: Head, model: str) -> None:
        """A request for model used head: from now on it is warmed for that model too."""
        key = head.template.prefix if head.template is not None else head.name
        models = self.named.setdefault(key, set())
        if model in models or not any(m.model is not None and m.serves(model) for m in self.members):
            return
        models.add(model)
        for member in self.members:
            if member.model is not None and member.serves(model):
                member.rewarm()

    def warmTargets(self, head: Head) -> list[Placed]:
        """
        The members head is kept warm on: among the backends of each model
        it is warmed for (and those of no router's model), where it is warm
        already, then the next by its hash.
        """
        wanted = self.modelsOf(head) if any(m.model is not None for m in self.members) else set()
        groups: dict[str | None, list[Placed]] = {}
        for m in self.members:
            if not m.relays and (m.model is None or m.model in wanted):
                groups.setdefault(m.model, []).append(m)
        return [target for group in groups.values() for target in self._targetsIn(group, head)]

    def _targetsIn(self, members: list[Placed], head: Head) -> list[Placed]:
        # Not only those ready now: at start-up the first to be probed would
        # otherwise take every head.
        candidates = [m for m in members if m.healthy]
        if self.warmOn is None:
            return candidates
        ordered = rendezvous(head.key, candidates)
        last = self.last.get(head.name)
        warm = sorted(
            (m for m in ordered if m.warmth(head) > 0), key=lambda m: (-m.warmth(head), m is not last)
        )
        rest = [m for m in ordered if m.warmth(head) == 0]
        return (warm + rest)[: self.warmOn]

    def _assigner(self, member: Placed) -> Callable[[Head], bool]:
        def assigned(head: Head) -> bool:
            return len(self.members) == 1 or member in self.warmTargets(head)

        return assigned

    def membersChanged(self, besides: Placed | None = None) -> None:
        """A backend came or went: each member warms what is now its own (besides: the one that came, which does)."""
        for member in self.members:
            if member is not besides:
                member.rewarm()

    def lost(self, member: Placed) -> None:
        """A backend stopped answering: requests waiting for its slots go elsewhere, its heads too."""
        if len(self.members) > 1:
            member.handBack()
        self.membersChanged()


class _Watch:
    """Tells the router that one of its several backends came or went."""

    def __init__(self, router: Router, member: Placed) -> None:
        self.router = router
        self.member = member

    def backendReady(self) -> None:
        if len(self.router.members) > 1:
            self.router.membersChanged(besides=self.member)  # it warms what is its own itself

    def backendLost(self) -> None:
        if len(self.router.members) > 1:
            self.router.lost(self.member)
