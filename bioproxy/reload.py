# -*- test-case-name: tests.e2e.test_systemd,tests.e2e.test_twistd -*-
"""
SIGHUP: re-read the config file and take what can change without a restart
(the templates: `prefixes` and `template_roots`); say which other keys
changed and wait for a restart.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from .config import KEYS, Config, ConfigError
from .service import templateSources
from .systemd import Notifier
from .watcher import TemplateWatcher

LIVE_KEYS = frozenset({"prefixes", "template_roots"})

log = Logger()


class HangupReloader(Service):
    """Installs a SIGHUP handler while running; a broken new config changes nothing."""

    def __init__(
        self,
        reread: Callable[[], Config],
        watcher: TemplateWatcher,
        reactor: Any,
        current: Config,
        notifier: Notifier | None = None,
    ) -> None:
        self.reread = reread
        self.watcher = watcher
        self.reactor = reactor
        self.current = current
        self.notifier = notifier
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._onSignal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _onSignal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(lambda: defer.ensureDeferred(self.reload()))

    async def reload(self) -> None:
        if self.notifier is not None:
            self.notifier.reloading(self.reactor)
        try:
            await self._reload()
        finally:
            if self.notifier is not None:
                self.notifier.reloaded()

    def _reload(self) -> defer.Deferred[None]:
        try:
            config = self.reread()
        except ConfigError as e:
            log.warn("SIGHUP: config not reloaded, keeping the running one: {error}", error=str(e))
            return defer.succeed(None)
        changed = sorted(k for k in KEYS if getattr(config, k) != getattr(self.current, k))
        later = [k for k in changed if k not in LIVE_KEYS]
        log.info(
            "SIGHUP: reloading templates from {source}; changed: {changed}",
            source=config.source or "(defaults)",
            changed=", ".join(changed) or "nothing",
        )
        if later:
            log.warn("SIGHUP: {keys} changed and take effect only after a restart", keys=", ".join(later))
        self.current = config
        return self.watcher.reload(config.prefixes, templateSources(config))
