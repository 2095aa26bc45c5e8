# -*- test-case-name: tests.e2e.test_proxy -*-
"""
makeService wires every piece together; it is the embedding API, and the
twistd plugin only parses options and calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from . import __version__
from .admin import adminRoot
from .backend.member import Member, build
from .backend.model import readFacts
from .config import BackendSpec, Config, withBacklog
from .connect import backendClients
from .heads import HeadBook
from .metrics import Metrics
from .models import ModelWatch
from .proxy import ProxyResource
from .router import Router
from .serve import ProxySite
from .site import JSONSite
from .snapshot import Snapshot
from .state import StateFile
from .templates import Sources, TemplateLibrary
from .watcher import TemplateWatcher

log = Logger()

# llama-server (cpp-httplib) drops idle keep-alive connections after 5 s; we
# drop ours first so a request never lands on a connection being closed.
IDLE_CONNECTION_TIMEOUT = 2


class _CallOnStop(Service):
    """Runs one cleanup when the service stops."""

    def __init__(self, name: str, stop: Any) -> None:
        self.setName(name)
        self._stop = stop

    def stopService(self) -> Any:
        super().stopService()
        return self._stop()


class _Drain(Service):
    """On stop, waits up to `grace` seconds for in-flight requests to end."""

    def __init__(self, site: ProxySite, grace: float) -> None:
        self.setName("drain")
        self.site = site
        self.grace = grace

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self.site.active:
            log.info(
                "waiting up to {grace} s for {n} in-flight request(s)",
                grace=self.grace,
                n=len(self.site.active),
            )
        return defer.ensureDeferred(self.site.drain(self.grace))


class _Announce(Service):
    """Logs the start-up summary once everything is listening."""

    def __init__(self, config: Config) -> None:
        self.setName("announce")
        self.config = config

    def startService(self) -> None:
        super().startService()
        c = self.config
        log.info(
            "bioproxy {version} started\n"
            "  proxy:     {proxy}\n"
            "  admin:     {admin}\n"
            "  backend:   {backend}\n"
            "  templates: {templates}\n"
            "  state:     {state}\n"
            "  config:    {source}",
            version=__version__,
            proxy=c.proxy_endpoint,
            admin=c.admin_endpoint,
            backend=", ".join(spec.url for spec in c.backendSpecs()),
            templates=len(c.prefixes),
            state=str(c.statePath() or "(none: learned heads last this process)"),
            source=c.source or "(defaults)",
        )


def _listen(reactor: Any, description: str, factory: Any, name: str) -> StreamServerEndpointService:
    service = StreamServerEndpointService(serverFromString(reactor, withBacklog(description)), factory)
    # Fail start-up loudly when the port cannot be bound, not log and carry on.
    service._raiseSynchronously = True
    service.setName(name)
    return service


def templateSources(config: Config) -> Sources:
    """Where config's templates and includes are looked for, and may live."""
    configDir = Path(config.source).parent if config.source else Path.cwd()
    return Sources.build(configDir, config.prefixes.values(), [configDir / r for r in config.template_roots])


def makeService(config: Config, reactor: Any) -> MultiService:
    """
    Build bioproxy. Templates are loaded here, blocking, so that a missing or
    broken one stops start-up with a TemplateError that names it.
    """
    top = MultiService()
    metrics = Metrics()

    library = TemplateLibrary()
    watcher = TemplateWatcher(
        library,
        config.prefixes,
        templateSources(config),
        reactor,
        config.warmup_check_interval,
        metrics,
        lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args),
        config.max_template_bytes,
    )
    watcher.setName("templates")
    watcher.loadAll()

    clients = backendClients(reactor, IDLE_CONNECTION_TIMEOUT)
    book = HeadBook(
        library,
        reactor.seconds,
        config.learn_after,
        config.max_learned,
        config.max_learned_bytes,
        config.max_conversations,
    )
    http = HTTPClient(clients.agent)

    def unit(spec: BackendSpec, name: str | None = None) -> Member:
        return build(
            spec,
            config,
            book,
            metrics,
            reactor,
            http,
            clients.forward,
            clients.retry,
            readModel=lambda path: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), readFacts, path
            ),
            name=f" {spec.name}" if name is None else name,
        )

    members = []
    for i, spec in enumerate(config.backendSpecs()):
        if spec.slot_save_path is None:
            log.info(
                "{url}: the cache files of learned heads and conversations that bioproxy gives up stay "
                "on llama-server's disk; set slot_save_path to its --slot-save-path (on this machine) "
                "to delete them, or run bioproxy prune-cache",
                url=spec.url,
            )
        members.append(unit(spec, "" if i == 0 else f" {spec.url}"))
    router = Router(
        members,
        config.warm_on,
        config.balance_threshold,
        config.balance_ratio,
        config.models,
        config.template_models,
    )
    for member in members:
        watcher.listeners.append(member.warmer.templateChanged)

    # The learned heads, and the names of the files each backend saved.
    statePath = config.statePath()
    state = StateFile(statePath, book, [(m.name, m.cache) for m in members], reactor) if statePath else None
    if state is not None:
        state.read()

    proxySite = ProxySite(
        ProxyResource(
            router, library, router, book, config.normalise_billing_header, config.allow_slot_actions
        ),
        metrics,
        reactor,
        config.max_body_bytes,
        config.access_log,
        timeout=config.client_timeout,
    )
    viewed = list(members)  # and the models of a router, as they are found
    snapshot = Snapshot(reactor, watcher, viewed, book, proxySite.recent)
    adminSite = JSONSite(
        adminRoot(metrics, snapshot, config.admin_token, config.admin_open_health),
        timeout=config.client_timeout,
    )

    # The models of a router (several models), each a backend of its own,
    # found after start-up; their services stop before the configured ones'.
    modelUnits = MultiService()
    modelUnits.setName("model units")

    def joined(member: Member) -> None:
        viewed.append(member)
        watcher.listeners.append(member.warmer.templateChanged)
        if state is not None:
            state.join(member.name, member.cache)
        for child in (
            _CallOnStop(f"backend {member.name}", member.backend.stop),
            member.warmer,
            member.monitor,
        ):
            child.setServiceParent(modelUnits)

    models = ModelWatch(members, unit, router, reactor, config.health_check_interval, joined)

    for child in (
        _CallOnStop("pool", clients.close),
        *(_CallOnStop(f"backend {m.name}", m.backend.stop) for m in members),
        *([state] if state is not None else []),
        *(m.warmer for m in members),
        *(m.monitor for m in members),
        modelUnits,
        models,
        watcher,
        _Drain(proxySite, config.shutdown_grace),
        _listen(reactor, config.admin_endpoint, adminSite, "admin"),
        _listen(reactor, config.proxy_endpoint, proxySite, "proxy"),
        _Announce(config),
    ):
        child.setServiceParent(top)
    return top
