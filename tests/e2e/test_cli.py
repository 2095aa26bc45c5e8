"""
The `bioproxy` command (issue 15, item 1 and 2), run as a user runs it:
`python -m bioproxy` is the same entry point as the installed script.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from bioproxy import __version__
from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource

from ..helpers import asyncTest, cacheFiles, client, listen, sleep
from ..stack import Bioproxy
from .test_twistd import _Watch, env, freePort

R: Any = reactor


async def bioproxy(*args: str, cwd: Path) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "bioproxy", *args], env=env(), path=str(cwd)
    )
    return out.decode(), err.decode(), code


class CommandTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    @asyncTest
    async def test_version(self) -> None:
        out, err, code = await bioproxy("--version", cwd=self.dir)
        self.assertEqual((out.strip(), code), (f"bioproxy {__version__}", 0), err)

    @asyncTest
    async def test_checkConfig(self) -> None:
        (self.dir / "code.txt").write_text("Review <{rules.md}>: <{message}>")
        (self.dir / "rules.md").write_text("be brief")
        (self.dir / "config.yaml").write_text('prefixes: {"@code": "code.txt"}\n')
        out, err, code = await bioproxy(
            "check-config", "--config", str(self.dir / "config.yaml"), cwd=self.dir
        )
        self.assertEqual(code, 0, err)
        self.assertIn("template @code:", out)
        self.assertIn("rules.md", out)
        self.assertIn("ok: 1 template(s)", out)

    @asyncTest
    async def test_checkConfigNamesTheProblem(self) -> None:
        (self.dir / "config.yaml").write_text('prefixes: {"@code": "missing.txt"}\n')
        out, err, code = await bioproxy(
            "check-config", "--config", str(self.dir / "config.yaml"), cwd=self.dir
        )
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("missing.txt", err)
        (self.dir / "config.yaml").write_text("proxy_port: lots\n")
        _, err, code = await bioproxy("check-config", "--config", str(self.dir / "config.yaml"), cwd=self.dir)
        self.assertEqual((code, len(err.strip().splitlines())), (2, 1), err)
        self.assertIn("proxy_port", err)

    @asyncTest
    async def test_portInUseIsOneLine(self) -> None:
        """Item 2: a port that cannot be bound is one line and status 2, not a traceback."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        out, err, code = await bioproxy(
            "run",
            "--backend",
            "http://127.0.0.1:9",
            "--port",
            str(port),
            "--admin-port",
            str(freePort()),
            cwd=self.dir,
        )
        self.assertEqual(code, 2, out + err)
        self.assertNotIn("Traceback", out + err)
        self.assertIn(f"{port}", err)
        self.assertIn("in use", err)
        # Issue 29: the error is the only line, not after twistd's start-up chatter.
        self.assertEqual((out, len(err.splitlines())), ("", 1), out + err)

    @asyncTest
    async def test_eachCommandHasItsHelpAndVersion(self) -> None:
        for command in ("run", "check-config", "status", "prune-cache"):
            out, err, code = await bioproxy(command, "--help", cwd=self.dir)
            self.assertEqual(code, 0, err)
            self.assertTrue(out.startswith("usage: bioproxy "), out)
            self.assertIn(command if command != "run" else "[run]", out.splitlines()[0])
            self.assertNotIn("twistd", out)
            out, err, code = await bioproxy(command, "--version", cwd=self.dir)
            self.assertEqual((out.strip(), code), (f"bioproxy {__version__}", 0), err)
        out, _, _ = await bioproxy("run", "--help", cwd=self.dir)
        self.assertIn("--config", out)

    @asyncTest
    async def test_usageErrorsAreOneLineAndStatusTwo(self) -> None:
        """A bad flag, an unknown command, a missing directory, an unreachable admin API."""
        for args, words in (
            (("run", "--bogus"), "--bogus"),
            (("frobnicate",), "unknown command"),
            (("prune-cache", "--dir", str(self.dir / "missing")), "no such directory"),
            (("status", "--admin", "http://127.0.0.1:9"), "cannot read"),
            (("prune-cache", "--dir", str(self.dir), "--admin", "http://127.0.0.1:9"), "cannot read"),
        ):
            out, err, code = await bioproxy(*args, cwd=self.dir)
            self.assertEqual((code, out, len(err.splitlines())), (2, "", 1), (args, out, err))
            self.assertIn(words, err, args)
            self.assertNotIn("Traceback", err, args)

    @asyncTest
    async def test_runsInTheForegroundWithoutPidFile(self) -> None:
        llama = FakeLlama(R, msPerGeneratedToken=1)
        backend = listen(R, FakeLlamaResource(llama), self)
        port, admin = freePort(), freePort()
        watch = _Watch()
        process = R.spawnProcess(
            watch,
            sys.executable,
            [
                sys.executable,
                "-m",
                "bioproxy",
                "--backend",
                backend,
                "--port",
                str(port),
                "--admin-port",
                str(admin),
            ],
            env=env(),
            path=str(self.dir),
        )
        self.addCleanup(lambda: watch.ended if watch.ended.called else process.signalProcess("KILL"))
        for _ in range(100):
            if b"started" in watch.output:
                break
            await sleep(R, 0.1)
        response = await client(self).get(f"http://127.0.0.1:{admin}/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), [], "no twistd.pid, no twistd.log")
        process.signalProcess("TERM")
        self.assertEqual(await watch.ended, -signal.SIGTERM)

    @asyncTest
    async def test_status(self) -> None:
        (self.dir / "slots").mkdir()
        llama = FakeLlama(R, slots=2, saveDir=self.dir / "slots", memory="hybrid")
        stack = Bioproxy(
            self, self.dir, listen(R, FakeLlamaResource(llama), self), {"@code": "Review: <{message}>"}
        )
        await stack.allWarm()
        out, err, code = await bioproxy("status", "--admin", stack.admin, cwd=self.dir)
        self.assertEqual(code, 0, err)
        self.assertIn("model unknown: a restored cache file reuses strict extensions", out)
        self.assertIn("serves only requests that extend all of it", out)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("TEMPLATE"), out)
        self.assertRegex(out, r"@code\s+(warm in a slot|on disk)\s")
        self.assertEqual(sum(1 for line in lines if line[:1].isdigit()), 2, out)
        _, err, code = await bioproxy("status", "--admin", "http://127.0.0.1:9", cwd=self.dir)
        self.assertEqual((code, len(err.strip().splitlines())), (2, 1), err)

    @asyncTest
    async def test_pruneCache(self) -> None:
        """Issue 15, item 8: files of old template versions and builds go; those in use, and others, stay."""
        slots = self.dir / "slots"
        slots.mkdir()
        llama = FakeLlama(R, slots=2, unified=False, saveDir=slots)
        stack = Bioproxy(
            self,
            self.dir,
            listen(R, FakeLlamaResource(llama), self),
            {"@code": "Review: <{message}>"},
            conversation_idle=0.1,
        )
        await stack.allWarm()
        [current] = [t["cache_file"] for t in (await stack.templates()).values()]
        self.assertTrue((slots / current).exists())
        # A conversation kept for a llama-server restart: its file is in use too.
        chat = {"messages": [{"role": "user", "content": "Tell me everything. " * 150}], "max_tokens": 2}
        response = await stack.http.post(stack.proxy + "/v1/chat/completions", json=chat)
        self.assertEqual(response.code, 200, await response.content())

        async def conversationFiles() -> list[str]:
            view = await (await stack.http.get(stack.admin + "/templates")).json()
            return [c["cache_file"] for c in view["conversations"]["conversations"] if c["file_bytes"]]

        kept: list[str] = []
        for _ in range(100):
            kept = await conversationFiles()
            if kept:
                break
            await sleep(R, 0.05)
        self.assertEqual(len(kept), 1, "the conversation was saved")
        old = ["_code-0123456789ab-" + current.rsplit("-", 1)[1], current.rsplit("-", 1)[0] + "-deadbeef.bin"]
        for name in old:
            (slots / name).write_bytes(b"old")
        (slots / "notes.txt").write_text("not ours")
        out, err, code = await bioproxy(
            "prune-cache", "--dir", str(slots), "--admin", stack.admin, "--dry-run", cwd=self.dir
        )
        self.assertEqual(code, 0, err)
        self.assertIn("2 obsolete file(s)", out)
        self.assertTrue(all((slots / name).exists() for name in old), "a dry run removes nothing")
        out, err, code = await bioproxy(
            "prune-cache", "--dir", str(slots), "--admin", stack.admin, cwd=self.dir
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(cacheFiles(slots), sorted([current, *kept, "notes.txt"]))
