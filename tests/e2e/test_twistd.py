"""
`twistd -n bioproxy` as a user runs it: a subprocess, real ports, signals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource

from ..helpers import Recorder, asyncTest, client, listen, sleep

R: Any = reactor
ROOT = Path(__file__).resolve().parents[2]
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def env() -> dict[str, str]:
    """The source tree first, so the plugin and code under test are these."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/nonexistent")}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def twistd(*args: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [*TWISTD, "-n", "--pidfile=", "bioproxy", *args], env=env(), path=str(ROOT)
    )
    return out.decode(), err.decode(), code


class CommandLineTests(TestCase):
    @asyncTest
    async def test_pluginListed(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [*TWISTD, "--help"], env=env(), path=str(ROOT)
        )
        self.assertIn(b"bioproxy", out)

    @asyncTest
    async def test_helpNamesEveryFlag(self) -> None:
        out, _, _ = await twistd("--help")
        for flag in (
            "--config",
            "--host",
            "--port",
            "--admin-host",
            "--admin-port",
            "--backend",
            "--listen",
            "--admin-listen",
        ):
            self.assertIn(flag, out)

    @asyncTest
    async def test_badConfigsFailCleanly(self) -> None:
        cases = {
            "unknown: 1\n": "'unknown'",
            "proxy_port: eighty\n": "'proxy_port'",
            "backend_url: ftp://x\n": "'backend_url'",
            "listen: 'tcp:notaport'\n": "'listen'",
            "warmup_check_interval: -3\n": "'warmup_check_interval'",
            "prefixes: [1, 2]\n": "'prefixes'",
            "[unclosed\n": "not valid YAML",
        }
        for text, named in cases.items():
            path = Path(self.mktemp()).absolute()
            path.write_text(text)
            out, err, code = await twistd("--config", str(path))
            self.assertEqual(code, 2, (text, out, err))
            self.assertIn(named, err)
            self.assertNotIn("Traceback", out + err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

    @asyncTest
    async def test_missingNamedConfig(self) -> None:
        out, err, code = await twistd("--config", "/no/such/bioproxy.yaml")
        self.assertEqual(code, 2)
        self.assertIn("does not exist", err)

    @asyncTest
    async def test_badPortFlag(self) -> None:
        out, err, code = await twistd("--port", "http")
        self.assertEqual(code, 2)
        self.assertIn("--port", err)


class _Watch(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode if reason.value.signal is None else -reason.value.signal)


class DaemonHarness(TestCase):
    """Starts `twistd -n bioproxy` and stops it with the test."""

    async def start(
        self, backendURL: str, *extra: str, environ: dict[str, str] | None = None
    ) -> tuple[str, _Watch]:
        port, admin = freePort(), freePort()
        watch = _Watch()
        args = [
            *TWISTD,
            "-n",
            "--pidfile=",
            "bioproxy",
            "--backend",
            backendURL,
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            *extra,
        ]
        process = R.spawnProcess(
            watch, sys.executable, [sys.executable, *args], env={**env(), **(environ or {})}, path=str(ROOT)
        )
        self.addCleanup(self.stop, process, watch)
        for _ in range(100):
            if b"bioproxy 0.1.0 started" in watch.output:
                break
            await sleep(R, 0.1)
        else:
            self.fail(watch.output.decode())
        self.process = process
        return f"http://127.0.0.1:{port}", watch

    def stop(self, process: Any, watch: _Watch) -> defer.Deferred[int]:
        if not watch.ended.called:
            process.signalProcess("KILL")
        return watch.ended


class DaemonTests(DaemonHarness):
    @asyncTest
    async def test_servesThenDrainsOnSigterm(self) -> None:
        backend = Recorder(R)
        proxy, watch = await self.start(listen(R, backend, self))
        self.assertIn(b"backend:   http://127.0.0.1:", watch.output)
        response = await client(self).get(proxy + "/sse?n=10&gap=0.1")
        self.assertEqual(response.code, 200)
        body = treq.content(response)
        await sleep(R, 0.2)
        self.process.signalProcess("TERM")
        # The stream in flight still runs to its end...
        self.assertIn(b"data: [DONE]", await body)
        # ...and the daemon shuts down cleanly afterwards. twistd re-raises
        # the signal once it is done, so the status is "ended by SIGTERM",
        # which systemd counts as a clean stop.
        self.assertEqual(await watch.ended, -signal.SIGTERM)
        self.assertIn(b"in-flight request", watch.output)
        self.assertIn(b"Server Shut Down.", watch.output)
        self.assertNotIn(b"Traceback", watch.output)

    @asyncTest
    async def test_fakeLlamaChatThroughTwistd(self) -> None:
        llama = FakeLlama(R, msPerGeneratedToken=1)
        proxy, watch = await self.start(listen(R, FakeLlamaResource(llama), self))
        response = await client(self).post(
            proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        reply = await response.json()
        self.assertEqual(reply["choices"][0]["message"]["content"], "This")
        self.process.signalProcess("TERM")
        self.assertEqual(await watch.ended, -signal.SIGTERM)
        self.assertIn(b"Server Shut Down.", watch.output)


class TemplateDaemonTests(DaemonHarness):
    @asyncTest
    async def test_missingTemplateAtStartup(self) -> None:
        config = Path(self.mktemp()).absolute()
        config.write_text('prefixes: {"@code": "nowhere/code.txt"}\n')
        out, err, code = await twistd("--config", str(config))
        self.assertEqual(code, 2, out + err)
        self.assertIn("nowhere/code.txt", err)
        self.assertNotIn("Traceback", out + err)

    @asyncTest
    async def test_sighupReloadsPrefixes(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        (work / "a.txt").write_text("A <{message}>")
        (work / "b.txt").write_text("B <{message}>")
        config = work / "config.yaml"
        config.write_text('prefixes: {"@a": a.txt}\n')
        backend = Recorder(R)
        proxy, watch = await self.start(listen(R, backend, self), "--config", str(config))
        http = client(self)

        async def sent(text: str) -> str:
            await treq.content(await http.post(proxy + "/completion", json={"prompt": text}))
            return str(json.loads(backend.seen[-1]["body"])["prompt"])

        self.assertEqual(await sent("@b hi"), "@b hi")
        config.write_text('prefixes: {"@a": a.txt, "@b": b.txt}\n')
        self.process.signalProcess("HUP")
        await sleep(R, 0.5)
        self.assertEqual(await sent("@b hi"), "B hi")
        # A broken config is refused and the running one stays.
        config.write_text("prefixes: [broken\n")
        self.process.signalProcess("HUP")
        await sleep(R, 0.5)
        self.assertIn(b"config not reloaded", watch.output)
        self.assertEqual(await sent("@b hi"), "B hi")
