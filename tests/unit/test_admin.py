"""The admin site and the backend monitor, in memory on a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from bioproxy import __version__
from bioproxy.admin import adminRoot
from bioproxy.backend.monitor import BackendMonitor
from bioproxy.metrics import Metrics
from bioproxy.snapshot import LISTED_PER_TURN, Parts, Snapshot
from bioproxy.templates import Sources, TemplateLibrary
from bioproxy.watcher import TemplateWatcher

from ..helpers import asyncTest


class ScriptedLlama:
    """A LlamaClient stand-in whose health answers come from a list."""

    base = name = "http://llama:8080"

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls = 0

    async def health(self) -> Any:
        up = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if not up:
            raise ConnectionRefusedError("connection refused")
        return {"status": "ok"}

    props_: dict[str, Any] = {"total_slots": 2, "model_path": "/m.gguf"}

    async def props(self) -> Any:
        return self.props_


class Listener:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def backendReady(self, props: dict[str, Any], restarted: bool) -> None:
        self.events.append(("ready", restarted))

    def backendLost(self) -> None:
        self.events.append("lost")


class MonitorTests(TestCase):
    def test_pollsAndRecords(self) -> None:
        clock, metrics = Clock(), Metrics()
        llama = ScriptedLlama([False, True])
        monitor = BackendMonitor(llama, clock, metrics, interval=2)  # type: ignore[arg-type]
        monitor.startService()
        self.assertEqual((llama.calls, monitor.reachable), (1, False))
        self.assertIn("refused", monitor.lastError or "")
        self.assertEqual(
            metrics.registry.get_sample_value("bioproxy_backend_up", {"backend": "http://llama:8080"}), 0.0
        )
        clock.advance(2)
        self.assertEqual((llama.calls, monitor.reachable, monitor.lastError), (2, True, None))
        self.assertEqual(
            metrics.registry.get_sample_value("bioproxy_backend_up", {"backend": "http://llama:8080"}), 1.0
        )
        monitor.stopService()
        clock.advance(10)
        self.assertEqual(llama.calls, 2)

    def test_keepsPollingAfterErrors(self) -> None:
        clock = Clock()

        class Broken:
            calls = 0

            async def health(self) -> Any:
                self.calls += 1
                raise RuntimeError("surprise")

        broken = Broken()
        monitor = BackendMonitor(broken, clock, Metrics(), interval=1)  # type: ignore[arg-type]
        monitor.startService()
        clock.pump([1, 1, 1])
        self.assertEqual(broken.calls, 4)
        monitor.stopService()


class RestartTests(TestCase):
    """What counts as a backend restart, which costs every slot's contents."""

    def monitor(
        self, answers: list[bool], props: dict[str, Any]
    ) -> tuple[BackendMonitor, ScriptedLlama, Listener]:
        llama = ScriptedLlama(answers)
        llama.props_ = props
        monitor = BackendMonitor(llama, Clock(), Metrics(), 1)  # type: ignore[arg-type]
        listener = Listener()
        monitor.listeners.append(listener)
        self.addCleanup(monitor.stopService)
        return monitor, llama, listener

    def test_newProcessMarkerWithoutAnOutage(self) -> None:
        monitor, llama, listener = self.monitor([True], {"model_path": "/m", "media_marker": "a"})
        monitor.startService()
        monitor.check()
        self.assertEqual(listener.events, [("ready", False)])
        llama.props_ = {"model_path": "/m", "media_marker": "b"}
        monitor.check()
        self.assertEqual(listener.events, [("ready", False), ("ready", True)])
        self.assertEqual(
            monitor.metrics.registry.get_sample_value(
                "bioproxy_backend_restarts_total", {"backend": "http://llama:8080"}
            ),
            1,
        )

    def test_outageWithTheSameMarkerIsNoRestart(self) -> None:
        monitor, llama, listener = self.monitor(
            [True, False, True], {"model_path": "/m", "media_marker": "a"}
        )
        monitor.startService()
        monitor.check()
        monitor.check()
        self.assertEqual(listener.events, [("ready", False), "lost", ("ready", False)])

    def test_withoutAMarkerAnOutageIsARestart(self) -> None:
        monitor, llama, listener = self.monitor([True, False, True], {"model_path": "/m"})
        monitor.startService()
        monitor.check()
        monitor.check()
        self.assertEqual(listener.events, [("ready", False), "lost", ("ready", True)])

    def test_anotherModelIsARestart(self) -> None:
        monitor, llama, listener = self.monitor([True], {"model_path": "/m"})
        monitor.startService()
        llama.props_ = {"model_path": "/other"}
        monitor.check()
        self.assertEqual(listener.events, [("ready", False), ("ready", True)])


class AdminTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.metrics = Metrics()
        self.monitor = BackendMonitor(ScriptedLlama([True]), self.clock, self.metrics, 2)  # type: ignore[arg-type]
        self.watcher = TemplateWatcher(
            TemplateLibrary(), {}, Sources.build(Path(".")), self.clock, 30, self.metrics, defer.maybeDeferred
        )

    def client(self, token: str | None = None, openHealth: bool = False) -> StubTreq:
        return StubTreq(
            adminRoot(
                self.metrics,
                Snapshot(self.clock, self.watcher, [Parts("http://b:1", self.monitor)]),
                token,
                openHealth=openHealth,
            )
        )

    def test_aLongListingLetsRequestsThrough(self) -> None:
        """
        Issue 26, item 1: /templates and /status are built a slice of
        LISTED_PER_TURN templates per reactor turn, and give what one
        turn would have.
        """
        where = Path(self.mktemp())
        where.mkdir()
        count = 2 * LISTED_PER_TURN + 1
        paths = {f"@t{i}": f"t{i}.txt" for i in range(count)}
        for name in paths.values():
            (where / name).write_text("A template. {message}")
        library = TemplateLibrary()
        watcher = TemplateWatcher(
            library,
            paths,
            Sources.build(where, list(paths.values()), cwd=where),
            self.clock,
            30,
            self.metrics,
            defer.maybeDeferred,
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        snapshot = Snapshot(self.clock, watcher, [Parts("http://b:1", self.monitor)])
        self.assertEqual(len(snapshot.templates()["templates"]), count)
        for view, whole in (
            (snapshot.templatesInTurns, snapshot.templates),
            (snapshot.wholeInTurns, snapshot.whole),
        ):
            d = defer.ensureDeferred(view())
            self.assertNoResult(d)  # the reactor turns between slices
            self.clock.advance(0)
            self.assertEqual(self.successResultOf(d), whole())

    @asyncTest
    async def test_health(self) -> None:
        http = self.client()
        self.clock.advance(5)
        body = await (await http.get("http://admin/health")).json()
        self.assertEqual(body["status"], "degraded")  # not checked yet
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.clock.advance(2.5)
        body = await (await http.get("http://admin/health")).json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["version"], __version__)
        self.assertEqual(body["uptime_seconds"], 7.5)
        self.assertEqual(body["backend"]["reachable"], True)
        self.assertEqual(body["backend"]["url"], "http://b:1")

    @asyncTest
    async def test_metricsFromThisRegistryOnly(self) -> None:
        self.metrics.requests.labels(path="/x", method="GET", status="200", prefix="").inc()
        other = Metrics()
        other.requests.labels(path="/y", method="GET", status="200", prefix="").inc()
        response = await self.client().get("http://admin/metrics")
        self.assertIn(b"text/plain", response.headers.getRawHeaders("content-type")[0].encode())
        text = await response.text()
        self.assertIn('bioproxy_requests_total{method="GET",path="/x",prefix="",status="200"} 1.0', text)
        self.assertNotIn('path="/y"', text)
        for family in (
            "bioproxy_time_to_first_byte_seconds",
            "bioproxy_request_duration_seconds",
            "bioproxy_requests_in_flight",
            "bioproxy_backend_errors_total",
            "process_",
        ):
            self.assertIn(family, text)
        self.assertNotIn("_created", text)

    @asyncTest
    async def test_metricsNegotiateOpenMetrics(self) -> None:
        """Issue 15, item 6: a scraper that asks for OpenMetrics gets it, with its # EOF."""
        self.metrics.requests.labels(path="/x", method="GET", status="200", prefix="").inc()
        response = await self.client().get(
            "http://admin/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        self.assertTrue(
            response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
        )
        text = await response.text()
        self.assertTrue(text.endswith("# EOF\n"), text[-50:])
        self.assertIn('bioproxy_requests_total{method="GET",path="/x",prefix="",status="200"} 1.0', text)
        self.assertNotIn("_created", text)

    @asyncTest
    async def test_tokenRequired(self) -> None:
        http = self.client(token="s3cret")
        for path in ("/health", "/metrics", "/"):
            self.assertEqual((await http.get("http://admin" + path)).code, 401)
            bad = await http.get("http://admin" + path, headers={"Authorization": "Bearer nope"})
            self.assertEqual(bad.code, 401)
        ok = await http.get("http://admin/health", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(ok.code, 200)
        denied = await (await http.get("http://admin/metrics")).json()
        self.assertEqual(denied["error"]["type"], "authentication_error")

    @asyncTest
    async def test_pageTokenOpensThePageAlone(self) -> None:
        """Issue 26, item 10: the status page's query token opens "/" only, not "//metrics" and the like."""
        http = self.client(token="s3cret")
        self.assertNotEqual((await http.get("http://admin/?token=s3cret")).code, 401)
        for path in ("//metrics", "//status", "//templates", "/metrics"):
            self.assertEqual((await http.get(f"http://admin{path}?token=s3cret")).code, 401, path)
        warm = await http.post("http://admin//templates/%40code/warmup?token=s3cret")
        self.assertEqual(warm.code, 401)

    @asyncTest
    async def test_unknownPathIs404(self) -> None:
        self.assertEqual((await self.client().get("http://admin/nope")).code, 404)

    @asyncTest
    async def test_errorsAreJSON(self) -> None:
        """Issue 13, item 9: unknown paths and methods are JSON 404 and 405, not Twisted's HTML pages."""
        http = self.client()
        for path in ("/nope", "/health/deeper", "/metrics/x/y"):
            response = await http.get("http://admin" + path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            self.assertEqual((await response.json())["error"]["code"], "not_found")
        for method, path in (("DELETE", "/health"), ("PUT", "/templates"), ("POST", "/slots")):
            response = await http.request(method, "http://admin" + path)
            self.assertIn(response.code, (404, 405), path)
            if response.code == 405:
                self.assertTrue(response.headers.getRawHeaders("allow"), path)
            self.assertEqual((await response.json())["error"]["type"], "invalid_request_error")
        response = await http.delete("http://admin/health")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])

    @asyncTest
    async def test_rootListsEndpoints(self) -> None:
        http = self.client(token="s3cret")
        response = await http.get("http://admin/", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(response.code, 200)
        endpoints = (await response.json())["endpoints"]
        self.assertEqual(set(endpoints), {"/health", "/ready", "/metrics", "/templates", "/status"})
        for path in endpoints:
            answer = await http.get("http://admin" + path, headers={"Authorization": "Bearer s3cret"})
            self.assertEqual(answer.code, 503 if path == "/ready" else 200, path)  # no backend here

    @asyncTest
    async def test_healthMayBeOpen(self) -> None:
        """Issue 15, item 5: with admin_open_health, a probe reads /health without the token, and only /health."""
        http = self.client(token="s3cret", openHealth=True)
        self.assertEqual((await http.get("http://admin/health")).code, 200)
        for path in ("/", "/metrics", "/templates", "/ready"):
            self.assertEqual((await http.get("http://admin" + path)).code, 401, path)
