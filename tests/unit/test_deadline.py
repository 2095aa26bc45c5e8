"""The moving deadline: it fires when the last arm says, never when stopped, with one call at a time."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.deadline import Deadline

steps = st.lists(
    st.one_of(
        st.tuples(st.just("arm"), st.floats(min_value=0, max_value=100)),
        st.tuples(st.just("stop"), st.just(0.0)),
        st.tuples(st.just("wait"), st.floats(min_value=0, max_value=60)),
    ),
    max_size=40,
)


class DeadlineTests(SynchronousTestCase):
    @given(steps)
    def test_firesAsIfMadeAnewEachTime(self, script: list[tuple[str, float]]) -> None:
        """Against the plain way (cancel, callLater anew on every arm): the same firings, at the same times."""
        clock, plain = Clock(), Clock()
        fired: list[float] = []
        expected: list[float] = []
        deadline = Deadline(clock)
        call = None
        for step, value in script:
            if step == "arm":
                deadline.arm(value, lambda: fired.append(clock.seconds()))
                if call is not None and call.active():
                    call.cancel()
                call = plain.callLater(value, lambda: expected.append(plain.seconds()))
            elif step == "stop":
                deadline.stop()
                if call is not None and call.active():
                    call.cancel()
            else:
                clock.advance(value)
                plain.advance(value)
            self.assertLessEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1000)
        plain.advance(1000)
        self.assertEqual(fired, expected)
        self.assertFalse(deadline.armed)

    def test_movedLaterCostsNoCall(self) -> None:
        clock = Clock()
        made: list[float] = []
        callLater = clock.callLater

        def counted(delay: float, f: object, *a: object) -> object:
            made.append(delay)
            return callLater(delay, f, *a)  # type: ignore[arg-type]

        clock.callLater = counted  # type: ignore[method-assign]
        deadline, fired = Deadline(clock), []
        for _ in range(20):  # every half second (exact in binary), the last at 9.5 s
            deadline.arm(10, lambda: fired.append(clock.seconds()))
            clock.advance(0.5)
        clock.advance(0.5)  # at 10 s the first call fires early, and waits again
        self.assertEqual(fired, [])
        clock.advance(9)
        self.assertEqual(fired, [19.5])
        self.assertEqual(len(made), 2)  # the first call, and that one more wait

    def test_cancelLeavesNoCall(self) -> None:
        clock = Clock()
        deadline = Deadline(clock)
        deadline.arm(5, lambda: None)
        deadline.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(deadline.armed)
