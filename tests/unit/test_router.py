"""
Issue 16, item 2: which backend a request and a warmup go to
(bioproxy/router.py), in memory, on stand-in members.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend.scheduler import BackendGone
from bioproxy.config import BackendSpec
from bioproxy.forward import Outcome
from bioproxy.heads import Head, Kind
from bioproxy.router import BALANCE_ABS, Router, imbalanced, rendezvous


@dataclass
class _Warmer:
    warmed: int = 0
    assigned: Any = None

    def warmAll(self) -> None:
        self.warmed += 1


@dataclass
class _Ready:
    ready: bool = True
    listeners: list[Any] = field(default_factory=list)


@dataclass
class _Dispatcher:
    """Raises BackendGone while its backend is down, else records the request."""

    member: Any = None
    sent: list[Any] = field(default_factory=list)

    async def send(self, request: Any, body: Any, pinnable: bool = True) -> None:
        if not self.member.healthy:
            raise BackendGone(self.member.url)
        self.sent.append(request)


@dataclass
class _Forwarder:
    """Refuses the connection while refusing is set (no 502 when another may take it), else answers."""

    refusing: bool = False
    sent: list[tuple[Any, bool]] = field(default_factory=list)

    def forward(self, request: Any, body: Any = None, replaceable: bool = False) -> defer.Deferred[Outcome]:
        self.sent.append((request, replaceable))
        if not self.refusing:
            return defer.succeed(Outcome(status=200, complete=True))
        if replaceable:
            return defer.succeed(Outcome(error="connect", reached=False))
        request.errors.append(502)
        return defer.succeed(Outcome(status=502, error="connect", reached=False))


@dataclass
class _Monitor:
    member: Any = None

    def noteUnreachable(self, problem: str) -> None:
        self.member.healthy = False


class _Request:
    placedByGuard = False

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.errors: list[int] = []

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


@dataclass(eq=False)
class Stand:
    """What the router reads of a member."""

    url: str
    weight: float = 1.0
    healthy: bool = True
    busy: int = 0
    warm: dict[str, int] = field(default_factory=dict)  # head name -> warmth
    backend: _Ready = field(default_factory=_Ready)
    warmer: _Warmer = field(default_factory=_Warmer)
    dispatcher: _Dispatcher = field(default_factory=_Dispatcher)
    forwarder: _Forwarder = field(default_factory=_Forwarder)
    monitor: _Monitor = field(default_factory=_Monitor)
    model: str | None = None  # a model of llama-server's router
    relays: bool = False
    replaceable: Any = lambda: False
    handedBack: int = 0

    def __post_init__(self) -> None:
        self.dispatcher.member = self.monitor.member = self

    # The face a Member shows the router (router.Placed), over the stand-in parts.

    def join(self, assigned: Any, several: Any, listener: Any) -> None:
        self.warmer.assigned, self.replaceable = assigned, several
        self.backend.listeners.append(listener)

    def serves(self, model: str) -> bool:
        return model == self.model

    async def send(self, request: Any, body: Any, pinnable: bool = True) -> None:
        await self.dispatcher.send(request, body, pinnable)

    def forward(self, request: Any, body: Any = None, replaceable: bool = False) -> defer.Deferred[Outcome]:
        return self.forwarder.forward(request, body, replaceable)

    def refused(self) -> None:
        self.monitor.noteUnreachable("a request could not connect")

    def rewarm(self) -> None:
        self.warmer.warmAll()

    def handBack(self) -> None:
        self.handedBack += 1

    @property
    def spec(self) -> BackendSpec:
        return BackendSpec(self.url, weight=self.weight)

    @property
    def name(self) -> str:
        return self.url

    def load(self) -> int:
        return self.busy

    def warmth(self, head: Head) -> int:
        return self.warm.get(head.name, 0)


def head(name: str) -> Head:
    return Head(name, Kind.TEMPLATE, None, None, None, "0" * 12)


def stands(n: int) -> list[Stand]:
    return [Stand(f"http://b{i}:8081") for i in range(n)]


def router(members: list[Stand], warmOn: int | None = 1) -> Router:
    return Router(members, warmOn)  # type: ignore[arg-type]


keys = st.text(min_size=1, max_size=20)


class RendezvousTests(SynchronousTestCase):
    @given(st.lists(keys, min_size=1, max_size=40, unique=True), st.integers(2, 6), st.data())
    def test_aLeaverMovesOnlyItsOwnKeys(self, names: list[str], n: int, data: st.DataObject) -> None:
        members = stands(n)
        leaver = data.draw(st.sampled_from(members))
        rest = [m for m in members if m is not leaver]
        for key in names:
            before = rendezvous(key, members)[0]  # type: ignore[arg-type]
            after = rendezvous(key, rest)[0]  # type: ignore[arg-type]
            if before is not leaver:
                self.assertIs(after, before, key)

    @given(st.lists(keys, min_size=1, max_size=40, unique=True), st.integers(1, 5))
    def test_aJoinerTakesOnlyKeys(self, names: list[str], n: int) -> None:
        members = stands(n + 1)
        joiner, old = members[-1], members[:-1]
        for key in names:
            after = rendezvous(key, members)[0]  # type: ignore[arg-type]
            self.assertIn(after, (rendezvous(key, old)[0], joiner))  # type: ignore[arg-type]

    def test_weightsShareKeys(self) -> None:
        members = [Stand("http://a:1", weight=1), Stand("http://b:1", weight=3)]
        counts = Counter(rendezvous(f"key {i}", members)[0].url for i in range(4000))  # type: ignore[arg-type]
        self.assertLess(abs(counts["http://b:1"] / 4000 - 0.75), 0.04, counts)


class ChooseTests(SynchronousTestCase):
    def test_warmWins(self) -> None:
        members = stands(3)
        for m in members:
            h = head("code")
            for other in members:
                other.warm = {}
            m.warm = {"code": 2}
            self.assertIs(router(members).choose(h, ""), m)

    def test_inASlotBeatsOnDisk(self) -> None:
        members = stands(3)
        members[0].warm = {"code": 1}
        members[2].warm = {"code": 2}
        self.assertIs(router(members).choose(head("code"), ""), members[2])

    def test_coldGoesByHash(self) -> None:
        members = stands(3)
        r = router(members)
        for i in range(20):
            h = head(f"k{i}")
            self.assertIs(r.choose(h, ""), rendezvous(h.key, members)[0])  # type: ignore[arg-type]

    def test_noHeadGoesByTheRequestsOwnKey(self) -> None:
        members = stands(3)
        r = router(members)
        self.assertIs(r.choose(None, "system prompt"), r.choose(None, "system prompt"))
        self.assertIs(r.choose(None, "x"), rendezvous("x", members)[0])  # type: ignore[arg-type]

    def test_unhealthyAreLeftOut(self) -> None:
        members = stands(2)
        members[0].warm = {"code": 2}
        members[0].healthy = False
        self.assertIs(router(members).choose(head("code"), ""), members[1])
        members[1].healthy = False
        self.assertIn(router(members).choose(head("code"), ""), members, "none healthy: one still answers")

    def test_ofEquallyWarmItStaysWhereItWent(self) -> None:
        """With a shared cache directory a head is on disk everywhere: a returning backend must not take it back."""
        members = stands(2)
        h = head("code")
        owner, other = rendezvous(h.key, members)  # type: ignore[arg-type]
        r = router(members)
        owner.healthy = False
        self.assertIs(r.choose(h, ""), other)
        owner.healthy = True
        owner.warm = other.warm = {"code": 1}
        self.assertIs(r.choose(h, ""), other)
        self.assertEqual(r.warmTargets(h), [other])
        owner.warm = {"code": 2}  # hotter there after all: it goes there
        self.assertIs(r.choose(h, ""), owner)

    def test_loadGuard(self) -> None:
        members = stands(2)
        members[0].warm = {"code": 2}
        members[0].busy, members[1].busy = BALANCE_ABS + 10, 9
        self.assertIs(router(members).choose(head("code"), ""), members[1])
        members[1].busy = BALANCE_ABS  # within 1.5 times: affinity again
        self.assertIs(router(members).choose(head("code"), ""), members[0])

    def test_theLoadGuardSaysSo(self) -> None:
        """A request the load guard sent away from its warm head is marked, for its reason (bioproxy.why)."""
        members = stands(2)
        members[0].warm = {"code": 2}
        members[0].busy, members[1].busy = BALANCE_ABS + 10, 9
        r = router(members)
        request = _Request()
        d = defer.ensureDeferred(r.send(request, _Body(head("code"), {})))  # type: ignore[arg-type]
        self.successResultOf(d)
        self.assertEqual((members[1].dispatcher.sent, request.placedByGuard), ([request], True))
        members[1].warm = {"code": 2}  # warm there too: the guard cost it nothing
        request = _Request()
        self.successResultOf(defer.ensureDeferred(r.send(request, _Body(head("code"), {}))))  # type: ignore[arg-type]
        self.assertFalse(request.placedByGuard)

    @given(st.lists(st.integers(0, 500), min_size=2, max_size=6))
    def test_imbalanceRule(self, loads: list[int]) -> None:
        busiest, idlest = max(loads), min(loads)
        self.assertEqual(imbalanced(loads), busiest - idlest > BALANCE_ABS and busiest > 1.5 * idlest)


class WarmTargetTests(SynchronousTestCase):
    def test_oneTargetByHash(self) -> None:
        members = stands(3)
        r = router(members)
        for i in range(10):
            h = head(f"t{i}")
            [target] = r.warmTargets(h)
            self.assertIs(target, rendezvous(h.key, members)[0])  # type: ignore[arg-type]
            self.assertEqual([m.warmer.assigned(h) for m in members], [m is target for m in members])

    def test_warmElsewhereStaysWhenItsOwnerReturns(self) -> None:
        members = stands(2)
        h = head("code")
        owner = rendezvous(h.key, members)[0]  # type: ignore[arg-type]
        other = next(m for m in members if m is not owner)
        r = router(members)
        owner.healthy = False  # gone: the other warms it
        self.assertEqual(r.warmTargets(h), [other])
        other.warm = {"code": 1}
        owner.healthy = True  # back: the head stays where it is warm
        self.assertEqual(r.warmTargets(h), [other])

    def test_replication(self) -> None:
        members = stands(3)
        self.assertEqual(len(router(members, warmOn=2).warmTargets(head("x"))), 2)
        self.assertEqual(router(members, warmOn=None).warmTargets(head("x")), members)
        members[1].healthy = False
        self.assertEqual(router(members, warmOn=None).warmTargets(head("x")), [members[0], members[2]])

    def test_warmestFirst(self) -> None:
        members = stands(2)
        h = head("code")
        first, second = rendezvous(h.key, members)  # type: ignore[arg-type]
        first.warm, second.warm = {"code": 1}, {"code": 2}  # on disk there, in a slot here
        self.assertEqual(router(members).warmTargets(h), [second])

    def test_oneBackendWarmsEverything(self) -> None:
        [only] = stands(1)
        router([only])
        self.assertTrue(only.warmer.assigned(head("x")))

    def test_membersChangedRewarms(self) -> None:
        members = stands(2)
        router(members).membersChanged()
        self.assertEqual([m.warmer.warmed for m in members], [1, 1])


class ModelTests(SynchronousTestCase):
    """Several models (llama-server's router, each model a member of its own): placement by the request's model."""

    def members(self) -> list[Stand]:
        return [Stand(f"http://r:1#{model}", model=model) for model in ("alpha", "beta")]

    @given(keys)
    def test_aRequestGoesToItsModel(self, key: str) -> None:
        """Whatever its head's hash or warmth says, a request for alpha goes to alpha."""
        alpha, beta = members = self.members()
        beta.warm[key] = 2
        r = router(members)
        self.assertIs(r.choose(head(key), "", "alpha"), alpha)
        self.assertIs(r.choose(head(key), "", "beta"), beta)

    def test_aModelNobodyServesGetsTheBackendsOwnAnswer(self) -> None:
        """The router's own member (no model) gets it, and answers it as llama-server's router does."""
        relay = Stand("http://r:1", relays=True)
        members = [relay, *self.members()]
        r = router(members)
        self.assertIs(r.choose(head("@t"), "", "gamma"), relay)
        self.assertIs(r.choose(head("@t"), "", None), relay)

    def test_warmedForItsModelsOnly(self) -> None:
        """A head is warmed for the models configured for it, and then for those its requests name."""
        alpha, beta = members = self.members()
        r = Router(members, 1, models=("alpha",))  # type: ignore[arg-type]
        h = head("@t")
        self.assertEqual(r.warmTargets(h), [alpha])
        body = _Body(h, {"model": "beta"})
        d = defer.ensureDeferred(r.send(_Request(), body))  # type: ignore[arg-type]
        self.successResultOf(d)
        self.assertEqual(r.warmTargets(h), [alpha, beta])
        self.assertEqual((alpha.warmer.warmed, beta.warmer.warmed), (0, 1), "beta was told to warm it")
        # A model nobody serves is not learned.
        d = defer.ensureDeferred(r.send(_Request(), _Body(h, {"model": "gamma"})))  # type: ignore[arg-type]
        self.assertEqual(r.modelsOf(h), {"alpha", "beta"})

    def test_anUnloadedModelWarmsNothing(self) -> None:
        """A model its router has not loaded is no warm target: bioproxy never loads one to warm it."""
        alpha, beta = members = self.members()
        r = Router(members, 1, models=("alpha", "beta"))  # type: ignore[arg-type]
        beta.healthy = False
        self.assertEqual(r.warmTargets(head("@t")), [alpha])


class _Body:
    conversation = None
    text = "x"

    def __init__(self, h: Head, parsed: dict[str, Any]) -> None:
        self.head = h
        self.parsed = parsed


class FailoverTests(SynchronousTestCase):
    def test_aWaitingRequestIsPlacedAgain(self) -> None:
        members = stands(2)
        h = head("code")
        first, second = rendezvous(h.key, members)  # type: ignore[arg-type]
        r = router(members)

        class Body:
            head = h
            conversation = None
            text = "x"
            parsed: dict[str, Any] = {}

        request = _Request()
        first.healthy = False  # gone while the request waited: its dispatcher says so
        d = defer.ensureDeferred(r.send(request, Body()))  # type: ignore[arg-type]
        self.successResultOf(d)
        self.assertEqual((first.dispatcher.sent, second.dispatcher.sent), ([], [request]))
        self.assertEqual(request.headers[b"x-bioproxy-backend"], second.url.encode())

    def test_aRefusedPassThroughIsPlacedAgain(self) -> None:
        """Issue 26, item 5: a backend that refuses the connection did no work; another takes the request."""
        members = stands(3)
        refusing, *others = members
        refusing.forwarder.refusing = True
        others[0].busy = others[1].busy = 1  # the refusing one is the least busy: chosen first
        r = router(members)
        request = _Request()
        r.forward(request)  # type: ignore[arg-type]
        self.assertEqual(refusing.forwarder.sent, [(request, True)])
        answered = [m for m in others if m.forwarder.sent]
        self.assertEqual(len(answered), 1)
        self.assertEqual(request.errors, [])
        self.assertEqual(request.headers[b"x-bioproxy-backend"], answered[0].url.encode())
        self.assertFalse(refusing.healthy, "the refusal takes it out of placement")
        r.forward(_Request())  # type: ignore[arg-type]
        self.assertEqual(len(refusing.forwarder.sent), 1)

    def test_everyBackendRefusing(self) -> None:
        members = stands(2)
        for m in members:
            m.forwarder.refusing = True
        request = _Request()
        router(members).forward(request)  # type: ignore[arg-type]
        self.assertEqual([len(m.forwarder.sent) for m in members], [1, 1])
        self.assertEqual([replaceable for m in members for _, replaceable in m.forwarder.sent], [True, False])
        self.assertEqual(request.errors, [502], "the last one's own 502")


class RouterMachine(RuleBasedStateMachine):
    """
    Several backends that come and go, fill up, and warm heads; whatever
    happens, each request goes to a healthy backend when there is one,
    to where its head is hottest unless the load guard says otherwise,
    and each head is kept warm on warm_on healthy backends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.members = stands(3)
        self.router = router(self.members, warmOn=2)
        self.router.threshold = 4  # small, so that the guard is reached

    @rule(i=st.integers(0, 2))
    def toggleHealth(self, i: int) -> None:
        self.members[i].healthy = not self.members[i].healthy

    @rule(i=st.integers(0, 2), n=st.integers(0, 12))
    def setLoad(self, i: int, n: int) -> None:
        self.members[i].busy = n

    @rule(i=st.integers(0, 2), name=st.sampled_from(["a", "b", "c"]), warmth=st.integers(0, 2))
    def warm(self, i: int, name: str, warmth: int) -> None:
        self.members[i].warm[name] = warmth

    @rule(name=st.sampled_from(["a", "b", "c"]))
    def request(self, name: str) -> None:
        h = head(name)
        chosen = self.router.choose(h, "")
        healthy = [m for m in self.members if m.healthy]
        if healthy:
            assert chosen in healthy
            loads = [m.busy for m in healthy]
            if imbalanced(loads, 4, 1.5):
                assert chosen.busy == min(loads)
            else:
                assert chosen.warmth(h) == max(m.warmth(h) for m in healthy)

    @invariant()
    def warmTargets(self) -> None:
        healthy = [m for m in self.members if m.healthy]
        for name in ("a", "b", "c"):
            h = head(name)
            targets = self.router.warmTargets(h)
            assert len(targets) == min(2, len(healthy))
            assert all(t in healthy for t in targets)
            hottest = max((m.warmth(h) for m in healthy), default=0)
            if hottest:
                assert any(t.warmth(h) == hottest for t in targets)


RouterMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


class RouterMachineTests(SynchronousTestCase):
    def test_machine(self) -> None:
        RouterMachine.TestCase().runTest()


class RealMembersTests(SynchronousTestCase):
    """The router over members as makeService builds them (backend.member.build), in memory."""

    def test_aHeadWarmedAgainStaysWhereItIs(self) -> None:
        """
        Issue 27: a head its backend is warming again, saving, or retrying
        a save of is as warm there as it was; the router still sends its
        requests there, not where hashing alone would.
        """
        from pathlib import Path

        from bioproxy.backend.warmup import Phase
        from bioproxy.heads import templateHead
        from bioproxy.router import Router
        from bioproxy.testing.memory import Memory

        text = "You are a careful reviewer. " * 40 + "{message}"
        for n in range(20):  # backends whose hash prefers the one without the head
            warm = Memory(Path(self.mktemp()), url=f"http://a{n}:8081")
            cold = Memory(Path(self.mktemp()), url=f"http://b{n}:8081")
            h = templateHead(warm.template("@code", text))
            if rendezvous(h.key, [warm.member, cold.member])[0] is cold.member:
                break
        else:
            self.fail("no pair of names where hashing prefers the cold backend")
        warm.found()
        cold.found()
        warm.advanceUntil(lambda: warm.warmer.phase(h) in (Phase.IN_RAM, Phase.IN_SLOT))
        r = Router([warm.member, cold.member], warmOn=1)
        self.assertIs(r.choose(h, ""), warm.member)
        for busy in (warm.warmer.wanted, warm.warmer.retrying):
            busy.add(h.name)  # queued again, or a save retried after a failure
            self.assertIn(warm.warmer.phase(h), (Phase.QUEUED, Phase.RETRYING))
            self.assertIs(r.choose(h, ""), warm.member, busy)
            self.assertEqual(r.warmTargets(h), [warm.member])
            busy.discard(h.name)

    def test_llamaServersOfDifferentModels(self) -> None:
        """
        Several llama-servers, one model each: a request goes to the one
        whose model it names (its file name or alias, as /props says); a
        name none of them has goes where placement says, as before.
        """
        from pathlib import Path

        from bioproxy.heads import templateHead
        from bioproxy.router import Router
        from bioproxy.testing.memory import Memory

        qwen = Memory(Path(self.mktemp()), url="http://q:8081", model="qwen3.5-9b")
        gemma = Memory(Path(self.mktemp()), url="http://g:8081", model="gemma-3-12b")
        h = templateHead(qwen.template("@code", "Review:\n<{message}>"))
        for m in (qwen, gemma):
            m.found()
        r = Router([qwen.member, gemma.member], warmOn=1)
        hashed = r.choose(h, "")
        for _ in range(3):
            self.assertIs(r.choose(h, "", "qwen3.5-9b"), qwen.member)
            self.assertIs(r.choose(h, "", "gemma-3-12b.gguf"), gemma.member)
        self.assertIs(r.choose(h, "", "gpt-4o"), hashed)
