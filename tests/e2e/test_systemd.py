"""
bioproxy under systemd's protocols, without systemd itself running: readiness
and watchdog datagrams on a test socket, socket activation through
systemd-socket-activate, JSON logs, and the unit files checked by
systemd-analyze.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from bioproxy.systemd import notify

from ..helpers import Recorder, asyncTest, client, listen, until
from .test_twistd import ROOT, TWISTD, DaemonHarness, _Watch, env, freePort

R: Any = reactor
UNITS = ROOT / "contrib/systemd"


class _Datagrams(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[str] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.extend(data.decode().split("\n"))


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SkipTest(
            f"!!! {name} is missing: install Debian's systemd package (make test does, as root) !!!"
        )
    return found


class NotifySocketTests(DaemonHarness):
    def notifySocket(self) -> tuple[str, _Datagrams]:
        # AF_UNIX paths are short; trial's temp folder is too deep for one.
        folder = tempfile.mkdtemp(prefix="bioproxy-notify-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = f"{folder}/notify"
        received = _Datagrams()
        port = R.listenUNIXDatagram(path, received)
        self.addCleanup(port.stopListening)
        return path, received

    @asyncTest
    async def test_readyWatchdogStopping(self) -> None:
        path, received = self.notifySocket()
        proxy, watch = await self.start(
            listen(R, Recorder(R), self), environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        )
        await until(R, lambda: "READY=1" in received.received, what="READY=1")
        # READY=1 means listening: the proxy answers at once.
        response = await client(self).get(proxy + "/echo")
        self.assertEqual(response.code, 200)
        await treq.content(response)
        await until(R, lambda: received.received.count("WATCHDOG=1") >= 2, what="watchdog pings")
        self.assertIn(f"MAINPID={self.process.pid}", received.received)
        self.process.signalProcess("TERM")
        self.assertEqual(await watch.ended, -signal.SIGTERM)
        self.assertIn("STOPPING=1", received.received)
        self.assertLess(received.received.index("READY=1"), received.received.index("STOPPING=1"))

    @asyncTest
    async def test_reloadIsAnnounced(self) -> None:
        path, received = self.notifySocket()
        await self.start(listen(R, Recorder(R), self), environ={"NOTIFY_SOCKET": path})
        await until(R, lambda: "READY=1" in received.received)
        self.process.signalProcess("HUP")
        await until(R, lambda: received.received.count("READY=1") == 2, what="READY=1 after the reload")
        self.assertIn("RELOADING=1", received.received)

    def test_abstractNamespace(self) -> None:
        name = f"bioproxy-test-{id(self)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind("\0" + name)
            self.assertTrue(notify("@" + name, "READY=1", "STATUS=ok"))
            self.assertEqual(s.recv(100), b"READY=1\nSTATUS=ok")

    def test_notUnderSystemd(self) -> None:
        self.assertFalse(notify(None, "READY=1"))
        self.assertFalse(notify("/nonexistent/notify", "READY=1"))


class SocketActivationTests(TestCase):
    @asyncTest
    async def test_systemdSocketActivate(self) -> None:
        activate = tool("systemd-socket-activate")
        backend = Recorder(R)
        port, admin = freePort(), freePort()
        watch = _Watch()
        args = [
            activate,
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=bioproxy",
            *(f"-E{k}={v}" for k, v in env().items() if k in ("PYTHONPATH", "HOME", "PATH")),
            sys.executable,
            *TWISTD,
            "-n",
            "--pidfile=",
            "bioproxy",
            "--backend",
            listen(R, backend, self),
            "--admin-port",
            str(admin),
            "--listen",
            "systemd:domain=INET:name=bioproxy",
        ]
        process = R.spawnProcess(watch, activate, args, env=env(), path=str(ROOT))
        self.addCleanup(
            lambda: (process.signalProcess("KILL") if not watch.ended.called else None, watch.ended)[1]
        )
        await until(R, lambda: b"Listening on" in watch.output, what="systemd-socket-activate")
        # bioproxy starts on the first connection, on the socket it was handed.
        response = await client(self).get(f"http://127.0.0.1:{port}/echo")
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["uri"], "/echo")
        self.assertIn(b"bioproxy 0.1.0 started", watch.output)


class LogFormatTests(DaemonHarness):
    @asyncTest
    async def test_jsonLines(self) -> None:
        proxy, watch = await self.start(listen(R, Recorder(R), self), "--log-format", "json")
        await treq.content(await client(self).get(proxy + "/echo"))
        self.process.signalProcess("TERM")
        await watch.ended
        lines = [line for line in watch.output.decode().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
        self.assertTrue(all({"time", "level", "system", "message"} <= set(r) for r in records))
        self.assertTrue(any("bioproxy 0.1.0 started" in r["message"] for r in records))

    @asyncTest
    async def test_badFormat(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [*TWISTD, "-n", "--pidfile=", "bioproxy", "--log-format", "xml"],
            env=env(),
            path=str(ROOT),
        )
        self.assertEqual(code, 2)
        self.assertIn(b"--log-format", err)


class UnitFileTests(TestCase):
    @asyncTest
    async def test_systemdAnalyzeVerify(self) -> None:
        analyze = tool("systemd-analyze")
        # The units name the install path; point them at this venv's twistd.
        twistd = str(Path(sys.executable).with_name("twistd"))
        folder = Path(self.mktemp()).absolute()
        (folder / "bioproxy.service.d").mkdir(parents=True)
        for name in ("bioproxy.service", "bioproxy.socket", "bioproxy.service.d/socket-activation.conf"):
            text = (UNITS / name).read_text().replace("/opt/bioproxy/venv/bin/twistd", twistd)
            (folder / name).write_text(text)
        out, err, code = await getProcessOutputAndValue(
            analyze, ["verify", str(folder / "bioproxy.service"), str(folder / "bioproxy.socket")], env=env()
        )
        self.assertEqual((code, err.decode()), (0, ""), out)
        service = (UNITS / "bioproxy.service").read_text()
        for setting in (
            "Type=notify",
            "ExecReload=",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "DynamicUser=yes",
        ):
            self.assertIn(setting, service)
