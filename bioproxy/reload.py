"""SIGHUP: re-read the config file and take its new `prefixes`, without a restart."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .config import Config, ConfigError
from .service import templateSources
from .watcher import TemplateWatcher

log = Logger()


class HangupReloader(Service):
    """Installs a SIGHUP handler while running; a broken new config changes nothing."""

    def __init__(self, reread: Callable[[], Config], watcher: TemplateWatcher, reactor: Any) -> None:
        self.reread = reread
        self.watcher = watcher
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._onSignal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _onSignal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> defer.Deferred[None]:
        try:
            config = self.reread()
        except ConfigError as e:
            log.warn("SIGHUP: config not reloaded, keeping the running one: {error}", error=str(e))
            return defer.succeed(None)
        log.info("SIGHUP: reloading templates from {source}", source=config.source or "(defaults)")
        return self.watcher.reload(config.prefixes, templateSources(config))
