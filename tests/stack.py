"""bioproxy started in-process over a directory of templates, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from bioproxy.config import load
from bioproxy.service import makeService

from .helpers import boundPort, client, metricSum, until

R: Any = reactor
HOWS = ("prefill", "restore", "resident")


def templateText(i: int, version: str = "v1", rules: int = 12) -> str:
    """A template long enough that a cold request is far outside the bound."""
    body = "".join(
        f"Rule {n} of template {i} ({version}): answer precisely and cite lines.\\n" for n in range(rules)
    )
    return f"You are reviewer {i}.\\n{body}Here is the input:\\n<{{message}}>"


class Bioproxy:
    def __init__(
        self,
        test: TestCase,
        directory: Path,
        backend: str,
        templates: dict[str, str],
        **config: Any,
    ) -> None:
        self.test = test
        self.dir = directory
        self.prefixes = {}
        for n, (prefix, text) in enumerate(templates.items()):
            (directory / f"t{n}.txt").write_text(text)
            self.prefixes[prefix] = f"t{n}.txt"
        settings = {
            "prefixes": self.prefixes,
            "listen": "tcp:0:interface=127.0.0.1",
            "admin_listen": "tcp:0:interface=127.0.0.1",
            "health_check_interval": 0.1,
            "warmup_check_interval": 0.1,
            **config,
        }
        (directory / "config.yaml").write_text(json.dumps(settings))
        self.backendURL = backend
        self.service = makeService(load(str(directory / "config.yaml"), {"backend_url": backend}), R)
        self.service.startService()
        test.addCleanup(self.service.stopService)
        self.proxy = f"http://127.0.0.1:{boundPort(self.service, 'proxy')}"
        self.admin = f"http://127.0.0.1:{boundPort(self.service, 'admin')}"
        self.http = client(test)
        self.headers: dict[str, str] = {}  # sent with every chat, as a client's API key would be

    def metric(self, name: str, **labels: str) -> float:
        return metricSum(self.service.getServiceNamed("warmup").metrics.registry, name, **labels)

    def total(self, name: str, **labels: str) -> float:
        """A per-prefix metric summed over the templates."""
        return sum(self.metric(name, prefix=p, **labels) for p in self.prefixes)

    def warmed(self) -> float:
        """Warmups finished, however they warmed."""
        return sum(self.total("bioproxy_warmup_total", how=h) for h in HOWS)

    async def templates(self) -> dict[str, Any]:
        response = await self.http.get(self.admin + "/templates")
        return {t["prefix"]: t for t in (await response.json())["templates"]}

    async def allWarm(self, count: float | None = None) -> None:
        """Wait until warmups have finished `count` times in all (default: once each)."""
        want = count if count is not None else len(self.prefixes)
        warmer = self.service.getServiceNamed("warmup")

        def done() -> bool:
            return self.warmed() >= want and warmer.ready and not warmer.jobs and not warmer.wanted

        await until(R, done, timeout=60, what=f"{want} warmups")

    async def chat(self, content: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
        """One chat request through the proxy; returns its timings."""
        response = await self.http.post(
            self.proxy + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": content}], "stream": stream, **extra},
            headers=self.headers,
        )
        raw = await treq.content(response)
        self.test.assertEqual(response.code, 200, raw)
        if not stream:
            timings: dict[str, Any] = json.loads(raw).get("timings", {})
            return timings
        events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
        return next((e["timings"] for e in reversed(events) if "timings" in e), {})
