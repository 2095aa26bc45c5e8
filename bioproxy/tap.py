# -*- test-case-name: tests.unit.test_config -*-
"""twistd glue: command-line options on top of the config file."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver
from twisted.python import usage

from . import config as configModule
from .config import Config, ConfigError
from .logs import FORMATS, HeldUntilStarted, observer, twistdLogsToStdout

# flag name -> config key
_FLAG_KEYS = {
    "host": "proxy_host",
    "port": "proxy_port",
    "admin-host": "admin_host",
    "admin-port": "admin_port",
    "listen": "listen",
    "admin-listen": "admin_listen",
}


def _portFlag(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        flag = next(f for f, k in _FLAG_KEYS.items() if k == key)
        raise ConfigError(f"flag --{flag}: expected a port number, got {value!r}") from None


class Options(usage.Options):
    synopsis = "[--config FILE] [options]"
    longdesc = (
        "bioproxy: a reverse proxy for llama.cpp's llama-server that expands prompt "
        "templates and keeps their KV cache warm. Settings come from code defaults, "
        "then the config file, then these flags."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "Config file (YAML or JSON). Default: ~/.config/bioproxy/config.json or config.yaml.",
        ],
        ["host", None, None, "Proxy listen host (default localhost). Shortcut for --listen."],
        ["port", "p", None, "Proxy listen port (default 8088). Shortcut for --listen."],
        ["admin-host", None, None, "Admin listen host (default localhost)."],
        ["admin-port", None, None, "Admin listen port (default 8089)."],
        [
            "listen",
            None,
            None,
            "Proxy endpoint string, e.g. tcp:8088:interface=127.0.0.1, "
            "unix:/run/bioproxy.sock, systemd:domain=INET:index=0.",
        ],
        ["admin-listen", None, None, "Admin endpoint string."],
        ["log-format", None, "text", "Log format: text (time, source, message) or json (one object a line)."],
    ]

    config: Config
    flags: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.backends: list[str] = []

    def opt_backend(self, url: str) -> None:
        """llama-server base URL (default http://localhost:8081); repeat it for several."""
        self.backends.append(url)

    opt_b = opt_backend

    def postOptions(self) -> None:
        try:
            self.flags = {key: self[flag] for flag, key in _FLAG_KEYS.items() if self[flag] is not None}
            # --backend replaces the file's backends, whether given once or more.
            if len(self.backends) == 1:
                self.flags["backend_url"], self.flags["backends"] = self.backends[0], None
            elif self.backends:
                self.flags["backends"] = list(self.backends)
            for key in ("proxy_port", "admin_port"):
                if key in self.flags:
                    self.flags[key] = _portFlag(key, self.flags[key])
            self.config = self.reread()
        except ConfigError as e:
            _fail(e)
        if self["log-format"] not in FORMATS:
            _fail(
                ConfigError(
                    f"flag --log-format: expected one of {', '.join(FORMATS)}, got {self['log-format']!r}"
                )
            )

    def reread(self) -> Config:
        """The config as these options make it; SIGHUP calls this again."""
        return configModule.load(self["config"], self.flags)


def _fail(error: Exception) -> NoReturn:
    # One clear line, not the usage text and not a traceback.
    # sys.__stderr__: once twistd has started logging, sys.stderr goes into the log.
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"bioproxy: {error}\n")
    stream.flush()
    raise SystemExit(2)


class _Root(MultiService):
    """
    Hands twistd the chosen log observer, which it asks its application
    for, and holds what is logged until the start succeeds: a start-up
    error is then the only line.
    """

    def __init__(self, logObserver: ILogObserver | None) -> None:
        super().__init__()
        self.held = HeldUntilStarted(logObserver) if logObserver is not None else None
        self.logObserver: ILogObserver | None = self.held

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logObserver)

    # A port in use, a permission refused, a socket path that cannot be made:
    # one line and status 2, as for a bad config, not a traceback. twistd
    # binds in privilegedStartService (before dropping privileges).
    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            self._failed(e)

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            self._failed(e)
        if self.held is not None:
            self.held.release()

    def _failed(self, error: Exception) -> NoReturn:
        if self.held is not None:
            self.held.drop()
        _fail(error)


def makeService(options: Options) -> IService:
    import os

    from twisted.internet import reactor

    from .reload import HangupReloader
    from .service import makeService as build
    from .systemd import Notifier
    from .templates import TemplateError

    reactorAny: Any = reactor
    try:
        service = build(options.config, reactorAny)
    except TemplateError as e:
        _fail(e)
    # twistd's own options are the parent of ours when it runs us.
    toStdout = twistdLogsToStdout(getattr(options, "parent", None))
    root = _Root(observer(options["log-format"], toStdout))
    service.setServiceParent(root)
    # Last, so that it starts once everything listens and stops first.
    notifier = Notifier(
        os.environ,
        reactorAny,
        status="proxying to " + ", ".join(spec.url for spec in options.config.backendSpecs()),
    )
    watcher = service.getServiceNamed("templates")
    HangupReloader(options.reread, watcher, reactorAny, options.config, notifier).setServiceParent(root)
    notifier.setServiceParent(root)
    return root
