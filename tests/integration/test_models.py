"""
Several models behind the real llama-server's router mode (`--models-dir`,
no model): a dense model and a hybrid one, `--models-max 1`, so that every
request for the other model unloads the one loaded (a swap). bioproxy must
make each model a backend of its own, send each request to the model it
names, keep each model's template warm across every swap, log no line over
and over, and never load a model by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from ..e2e.test_cli import bioproxy
from ..helpers import asyncTest, logEvents, until
from .llama import LlamaServer
from .test_llama import RealStack, texts

R: Any = reactor
MODELS = {"alpha": "llama", "beta": "qwen35"}
RULES = 20  # about 1,400 tokens of template


class RouterModeTests(TestCase):
    timeout = 900

    @asyncTest
    async def test_swapsAndBack(self) -> None:
        seen = logEvents(self)
        directory = Path(self.mktemp()).absolute()
        (directory / "proxy").mkdir(parents=True)
        router = LlamaServer(R, directory, None, models=MODELS, flags=("--models-max", "1"))
        await router.start()
        self.addCleanup(lambda: defer.ensureDeferred(router.stop()))
        stack = RealStack(self, router, texts(1, rules=RULES), models=list(MODELS))
        watch = stack.service.getServiceNamed("models")
        await until(R, lambda: len(watch.units) == 2, 30, "a unit per model")
        units = {unit.model: unit for unit in watch.units.values()}
        statuses = {m["id"]: m["status"]["value"] for m in (await router.json("GET", "/v1/models"))["data"]}
        self.assertEqual(statuses, {"alpha": "unloaded", "beta": "unloaded"}, "bioproxy loaded a model")

        def settled(model: str) -> Callable[[], bool]:
            warmer = units[model].warmer
            return lambda: warmer.ready and not warmer.jobs and not warmer.wanted

        results = []
        # Each model's first load comes from a request with no template; its
        # template is then warmed in the background, so its first use is warm.
        plan = [("alpha", False), ("alpha", True), ("beta", False), ("beta", True)]
        plan += [("alpha", True), ("beta", True), ("alpha", True)]  # a swap before each
        for i, (model, templated) in enumerate(plan):
            message = f"what does line {i} do?"
            body = await self.ask(stack, model, f"@t0 {message}" if templated else message)
            self.assertEqual(body["model"], model, "the request reached another model")
            if templated:
                content = stack.texts["@t0"].replace("<{message}>", message)
                bound = 1.1 * await router.messageAndTail(content, message, model)  # it is loaded now
                timings = body["timings"]
                results.append((model, timings["cache_n"], timings["prompt_n"], bound))
            await until(R, settled(model), 120, f"{model}'s warmups")
        for _model, cached, computed, bound in results:
            self.assertLessEqual(computed, bound, results)
            self.assertGreater(cached, 1000, results)
        self.assertGreater(
            stack.metric("bioproxy_kv_cache_restores_total", status="ok", prefix="@t0"),
            0,
            "no swap back was restored from its file",
        )
        # Each model in the operator's views, the router itself only in /health.
        base = router.url
        listing = await (await stack.http.get(stack.admin + "/templates")).json()
        self.assertEqual(
            sorted((b["url"], b["router_model"], b["phase"]) for b in listing["backends"]),
            [
                (f"{base}#alpha", "alpha", "ready"),
                (f"{base}#beta", "beta", "lost"),
            ],  # unloaded by the last swap
        )
        where = {b["url"]: b["warm_state"] for b in listing["templates"][0]["backends"]}
        self.assertEqual(sorted(where), [f"{base}#alpha", f"{base}#beta"])
        self.assertTrue(where[f"{base}#alpha"].startswith("warm"), where)  # loaded last
        slots = await (await stack.http.get(stack.admin + "/slots")).json()
        self.assertEqual(sorted(b["url"] for b in slots["backends"]), [f"{base}#alpha", f"{base}#beta"])
        health = await (await stack.http.get(stack.admin + "/health")).json()
        self.assertEqual(
            sorted(b["url"] for b in health["backends"]), [base, f"{base}#alpha", f"{base}#beta"]
        )
        metrics = (await (await stack.http.get(stack.admin + "/metrics")).content()).decode()
        self.assertIn(f'backend="{base}#beta"', metrics)
        out, err, code = await bioproxy("status", "--admin", stack.admin, cwd=directory)
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rf"@t0\s+warm in \S+.*{base}#alpha")
        self.assertIn(f"{base}#beta", out)
        # Each line about a backend's state once per change: never the same
        # line twice in a row (a warmup's outcome is an event of its own).
        lines = [
            formatEvent(e)
            for e in seen
            if "http://127.0.0.1" in formatEvent(e) and e.get("log_namespace") != "bioproxy.backend.warmup"
        ]
        repeated = [a for a, b in zip(lines, lines[1:], strict=False) if a == b]
        self.assertEqual(repeated, [], lines)

    async def ask(self, stack: RealStack, model: str, content: str) -> dict[str, Any]:
        response = await stack.http.post(
            stack.proxy + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2},
        )
        body: dict[str, Any] = await response.json()
        self.assertEqual(response.code, 200, body)
        return body
