# -*- test-case-name: tests.unit.test_deadline -*-
"""
A deadline that moves: one DelayedCall for a connection's or a stream's
whole life, instead of one cancelled and made anew per request or per event.

Cancelling a DelayedCall and making another re-sorts the reactor's heap
each time, and every request used to do that for each of its timers: the
client connection's idle and request deadlines, the backend's silence, a
kept connection's idle timeout. A deadline moved later costs nothing here:
when the call fires early it finds the new time and waits again. Only a
deadline moved sooner resets the call.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """Runs one action when its time comes, unless stopped or moved first."""

    __slots__ = ("clock", "call", "due", "action")

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.call: IDelayedCall | None = None
        self.due = 0.0
        self.action: Callable[[], object] | None = None

    def arm(self, seconds: float, action: Callable[[], object]) -> None:
        """action in seconds from now, in place of whatever was due."""
        self.due, self.action = self.clock.seconds() + seconds, action
        call = self.call
        if call is None or not call.active():
            self.call = self.clock.callLater(seconds, self._fire)
        elif call.getTime() > self.due:
            call.reset(seconds)

    @property
    def armed(self) -> bool:
        return self.action is not None

    def stop(self) -> None:
        """Nothing is due; the call, if any, stays to be moved by the next arm."""
        self.action = None

    def cancel(self) -> None:
        """Nothing is due, and the call goes: its owner is done."""
        self.action = None
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _fire(self) -> None:
        self.call = None
        action = self.action
        if action is None:
            return
        left = self.due - self.clock.seconds()
        if left > 0:
            self.call = self.clock.callLater(left, self._fire)
            return
        self.action = None
        action()
