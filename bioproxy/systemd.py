# -*- test-case-name: tests.e2e.test_systemd -*-
"""
systemd readiness, stop and watchdog notifications, with no libsystemd: each
is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET, where a
leading "@" means Linux's abstract namespace.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def notify(address: str | None, *fields: str) -> bool:
    """Send fields (e.g. "READY=1") to systemd; False when not under systemd or it failed."""
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall("\n".join(fields).encode())
    except OSError as e:
        log.warn("cannot notify systemd at {address}: {why}", address=address, why=str(e))
        return False
    return True


class Notifier(Service):
    """
    The last child of the service: it starts once every endpoint listens
    (READY=1) and stops first (STOPPING=1). With WATCHDOG_USEC set it pings at
    half that interval, from the reactor, so a hung reactor is restarted.
    """

    def __init__(self, environ: Mapping[str, str], clock: IReactorTime, status: str = "") -> None:
        self.setName("systemd")
        self.address = environ.get("NOTIFY_SOCKET")
        self.status = status
        self.watchdog: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6
        self._loop = LoopingCall(self.ping)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        fields = ["READY=1", f"MAINPID={os.getpid()}"] + ([f"STATUS={self.status}"] if self.status else [])
        notify(self.address, *fields)
        if self.watchdog is not None and self.address:
            self._loop.start(self.watchdog, now=False)

    def stopService(self) -> None:
        super().stopService()
        notify(self.address, "STOPPING=1")
        if self._loop.running:
            self._loop.stop()

    def ping(self) -> None:
        notify(self.address, "WATCHDOG=1")

    def reloading(self, clock: IReactorTime) -> None:
        """Tell systemd a reload began; READY=1 again says it ended."""
        notify(self.address, "RELOADING=1", f"MONOTONIC_USEC={int(clock.seconds() * 1e6)}")

    def reloaded(self) -> None:
        notify(self.address, "READY=1")
