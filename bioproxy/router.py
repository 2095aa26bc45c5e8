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
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
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
    def load(self) -> int: ...
    def warmth(self, head: Head) -> int: ...
    def join(
        self, assigned: Callable[[Head], bool], several: bool, listener: BackendListener | None
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
    ) -> None:
        self.members = list(members)
        self.warmOn = warmOn  # None: every backend
        self.threshold, self.ratio = threshold, ratio  # the load guard's
        # Where each head last went. Among equally warm backends it stays
        # there: with a shared cache directory a head is on disk at each,
        # and it must not move back to a backend that returns.
        self.last: OrderedDict[str, Placed] = OrderedDict()
        for member in self.members:
            several = len(self.members) > 1
            member.join(self._assigner(member), several, _Watch(self, member) if several else None)

    # -- placing requests

    def healthy(self) -> list[Placed]:
        return [m for m in self.members if m.healthy] or self.members

    def choose(self, head: Head | None, affinity: str) -> Placed:
        """
        The member for a request starting with head (None: no known head;
        affinity, the request's own key, orders the members then).
        """
        if len(self.members) == 1:
            return self.members[0]
        candidates = self.healthy()
        ordered = rendezvous(head.key if head is not None else affinity, candidates)
        if len(ordered) > 1 and imbalanced([m.load() for m in ordered], self.threshold, self.ratio):
            chosen = min(ordered, key=lambda m: m.load())
        elif head is None:
            return ordered[0]
        else:  # max keeps the first of equals: the hash's choice
            chosen = max(ordered, key=lambda m: (m.warmth(head), m is self.last.get(head.name)))
        if head is not None:
            self.last[head.name] = chosen
            self.last.move_to_end(head.name)
            if len(self.last) > REMEMBERED:
                self.last.popitem(last=False)
        return chosen

    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None:
        """
        A request that runs on a slot: on the chosen member's dispatcher. One
        that was still waiting for a slot when its backend went away had not
        started: it is placed again, on a backend still up.
        """
        # The request's own key only where it decides: body.text flattens the whole prompt.
        several = len(self.members) > 1 and body.head is None
        affinity = (body.conversation or body.text[:4096]) if several else ""
        for _ in self.members:
            member = self.choose(body.head, affinity)
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

    def warmTargets(self, head: Head) -> list[Placed]:
        """The members head is kept warm on: where it is warm already, then the next by its hash."""
        # Not only those ready now: at start-up the first to be probed would
        # otherwise take every head.
        candidates = [m for m in self.members if m.healthy]
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

    def membersChanged(self) -> None:
        """A backend came or went: each member warms what is now its own."""
        for member in self.members:
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
        self.router.membersChanged()

    def backendLost(self) -> None:
        self.router.lost(self.member)
