# -*- test-case-name: tests.unit.test_config -*-
"""
Configuration: code defaults, then the config file, then command-line flags.

The original's ``config.json`` must load unchanged, so every key it knew keeps
its name and meaning; keys added here have defaults that keep old files valid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from twisted.internet.endpoints import serverFromString

MiB = 1024 * 1024

DEFAULT_DIR = Path("~/.config/bioproxy")
DEFAULT_NAMES = ("config.json", "config.yaml", "config.yml")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the config."""


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One llama-server behind bioproxy, as configured."""

    url: str
    api_key: str | None = None
    slots: int | None = None  # None: ask its /props
    weight: float = 1.0  # its share of templates placed by hashing
    # Its --slot-save-path, where bioproxy can reach it (the same machine):
    # the files of heads it gives up are deleted there. None: they stay.
    slot_save_path: str | None = None
    # One model of llama-server's router (--models-dir) at url, and the
    # aliases it answers to: bioproxy makes these specs itself, one per model
    # the router lists (models.py); a configured backend has none.
    model: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What views, logs and metrics call it: the URL, and the model behind a router."""
        return f"{self.url}#{self.model}" if self.model else self.url


@dataclasses.dataclass(frozen=True)
class Config:
    proxy_host: str = "localhost"
    proxy_port: int = 8088
    admin_host: str = "localhost"
    admin_port: int = 8089
    backend_url: str = "http://localhost:8081"
    warmup_check_interval: float = 30.0
    prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    listen: str | None = None
    admin_listen: str | None = None
    backend_timeout: float = 600.0
    # Deadlines and bounds of an exchange: the backend's silence in the middle
    # of its answer; what is kept for a client that is not reading, and how long
    # it may take nothing; how long a request's headers and body may take.
    backend_idle_timeout: float = 600.0
    response_buffer_bytes: int = 1 * MiB
    write_stall_timeout: float = 60.0
    client_timeout: float = 60.0
    max_body_bytes: int = 32 * MiB
    health_check_interval: float = 2.0
    shutdown_grace: float = 30.0
    admin_token: str | None = None
    # Leave GET /health open to probes when admin_token is set.
    admin_open_health: bool = False
    template_roots: tuple[str, ...] = ()
    max_template_bytes: int = 4 * MiB
    slots: int | None = None  # None: ask the backend's /props
    max_queue: int = 256
    max_queue_wait: float = 300.0
    # llama-server's --api-key, for bioproxy's own calls; or a file holding it,
    # or the BIOPROXY_BACKEND_API_KEY environment variable.
    backend_api_key: str | None = None
    backend_api_key_file: str | None = None
    # Heads learned from requests (a template behind a system prompt, an
    # agent's long system prompt): warmed and saved after this many uses,
    # at most this many kept, their files within this many bytes (0: no limit).
    learn_after: int = 1
    max_learned: int = 32
    max_learned_bytes: int = 0
    # Conversations and agent sessions (each at least about 512 tokens): at
    # most this many kept (0: none), each saved once it has had no turn for
    # conversation_idle seconds, so that its next turn after a llama-server
    # restart is restored; their files count in max_learned_bytes.
    max_conversations: int = 64
    conversation_idle: float = 5.0
    # Fix the per-conversation values of Claude Code's billing-header block
    # so that every conversation's prompt starts alike.
    normalise_billing_header: bool = True
    # Let clients of the proxy port save, restore and erase slots
    # (POST /slots/N?action=…): off, since those belong to bioproxy.
    allow_slot_actions: bool = False
    # One line per proxied request in the log (method, path, status, prefix, time).
    access_log: bool = True
    # Where the learned heads and the cache files saved for them are kept
    # across restarts of bioproxy (state.py). None: $STATE_DIRECTORY/state.json
    # under systemd's StateDirectory=, else nowhere (they last one process).
    state_file: str | None = None
    # llama-server's --slot-save-path, when it runs on this machine (relative
    # to the config file): the cache files of heads and conversations that
    # bioproxy gives up are deleted there. Unset: they stay until prune-cache.
    slot_save_path: str | None = None
    # Several llama-servers: URLs, or mappings of url, api_key, slots, weight.
    # Empty: the one backend of backend_url.
    backends: tuple[BackendSpec, ...] = ()
    # On how many backends each template is kept warm: a number, or "all".
    warm_on: int | None = 1  # None: all
    # The load guard (the SGLang gateway's rule): when the busiest backend has
    # more than balance_threshold more user requests than the least busy and
    # more than balance_ratio times as many, affinity gives way to load.
    balance_threshold: int = 64
    balance_ratio: float = 1.5
    # Behind llama-server's router (several models): the models every
    # template is warmed for, and per template prefix, its own list instead.
    # A template is also warmed for each model its requests name.
    models: tuple[str, ...] = ()
    template_models: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Where the config was read from; not a key, but includes resolve against it.
    source: str | None = None

    def statePath(self, environ: Mapping[str, str] = os.environ) -> Path | None:
        """The state file: the setting (beside the config when relative), else systemd's state directory's."""
        if self.state_file:
            path = Path(self.state_file).expanduser()
            if self.source and not path.is_absolute():
                path = Path(self.source).parent / path
            return path
        directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(directory) / "state.json" if directory else None

    @property
    def proxy_endpoint(self) -> str:
        return self.listen or tcpEndpoint(self.proxy_host, self.proxy_port)

    @property
    def admin_endpoint(self) -> str:
        return self.admin_listen or tcpEndpoint(self.admin_host, self.admin_port)

    def backendSpecs(self, environ: Mapping[str, str] = os.environ) -> list[BackendSpec]:
        """Every backend: those of `backends`, or else the one of backend_url and its settings."""
        key = self.backendApiKey(environ)
        if self.backends:  # the top-level key, slot count and directory are each backend's default
            return [
                dataclasses.replace(
                    spec,
                    api_key=spec.api_key or key,
                    slots=spec.slots or self.slots,
                    slot_save_path=self._beside(spec.slot_save_path or self.slot_save_path),
                )
                for spec in self.backends
            ]
        return [
            BackendSpec(self.backend_url, key, self.slots, slot_save_path=self._beside(self.slot_save_path))
        ]

    def _beside(self, path: str | None) -> str | None:
        """path, beside the config file when relative."""
        if path is None:
            return None
        resolved = Path(path).expanduser()
        if self.source and not resolved.is_absolute():
            resolved = Path(self.source).parent / resolved
        return str(resolved)

    def backendApiKey(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The key for bioproxy's own calls: the setting, else its file, else the environment."""
        if self.backend_api_key:
            return self.backend_api_key
        if self.backend_api_key_file:
            path = Path(self.backend_api_key_file).expanduser()
            if self.source and not path.is_absolute():
                path = Path(self.source).parent / path  # like templates: beside the config
            return readSecret("backend_api_key_file", str(path))
        return environ.get(API_KEY_VARIABLE) or None


API_KEY_VARIABLE = "BIOPROXY_BACKEND_API_KEY"


def readSecret(key: str, path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key {key!r}: cannot read {path!r}: {e}") from None
    if not text:
        raise ConfigError(f"config key {key!r}: {path!r} is empty")
    return text


KEYS = frozenset(f.name for f in dataclasses.fields(Config)) - {"source"}

# What each layer's host/port shortcut replaces: setting either one in a layer
# means that layer asked for TCP, so a `listen` from a lower layer must yield.
_SHORTCUTS = {
    "listen": ("proxy_host", "proxy_port"),
    "admin_listen": ("admin_host", "admin_port"),
}


def tcpEndpoint(host: str, port: int) -> str:
    """A Twisted endpoint string for host:port, localhost meaning loopback."""
    if host == "localhost":
        host = "127.0.0.1"
    if ":" in host:
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={host}"


LISTEN_BACKLOG = 1024
_BACKLOGGED = ("tcp", "tcp6", "ssl", "unix")


def withBacklog(description: str) -> str:
    """
    A listening endpoint string with a backlog of LISTEN_BACKLOG unless it
    names one. Twisted's default is 50: connections past it, arriving
    while the event loop is busy, wait for their SYN to be sent again (a
    second, then three) and can time out with no answer at all; the kernel
    caps the number at net.core.somaxconn.
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in _BACKLOGGED or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """
    Merge layers, later ones winning key by key.

    A host/port shortcut in a layer overrides an endpoint string from an
    earlier layer, because the later layer is the one the user meant.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        for endpointKey, shortcutKeys in _SHORTCUTS.items():
            if endpointKey not in layer and any(k in layer for k in shortcutKeys):
                merged.pop(endpointKey, None)
        merged.update(layer)
    return merged


def defaultPath(home: Path | None = None) -> Path | None:
    """The first default config file that exists, or None."""
    directory = (home / ".config/bioproxy") if home else DEFAULT_DIR.expanduser()
    for name in DEFAULT_NAMES:
        candidate = directory / name
        if candidate.exists():
            return candidate
    return None


def readFile(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file (YAML is a superset of JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = " ".join(str(e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML/JSON: {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    return data


def load(
    path: str | None = None,
    flags: Mapping[str, Any] | None = None,
    home: Path | None = None,
) -> Config:
    """
    Build the effective Config.

    An explicitly named file must exist; the default one may be absent.
    """
    filePath: Path | None
    if path is not None:
        filePath = Path(path).expanduser()
        fileLayer = readFile(filePath)
    else:
        filePath = defaultPath(home)
        fileLayer = readFile(filePath) if filePath else {}
    merged = merge(fileLayer, dict(flags or {}))
    source = str(filePath.resolve()) if filePath else None
    return validate(merged, source)


def validate(raw: Mapping[str, Any], source: str | None = None) -> Config:
    """Check every key and value, naming the key in any error."""
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(KEYS))}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check = _CHECKS[key]
        values[key] = check(key, value)
    config = Config(source=source, **values)
    _checkEndpoint("listen", config.proxy_endpoint)
    _checkEndpoint("admin_listen", config.admin_endpoint)
    if config.backend_api_key_file:
        config.backendApiKey()  # a missing or empty key file stops start-up here
    return config


def _host(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigError(f"config key {key!r}: expected a host name or address, got {value!r}")
    return value


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"config key {key!r}: expected a port number 0-65535, got {value!r}")
    return value


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"config key {key!r}: expected a positive number, got {value!r}")
    return float(value)


def _bytes(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config key {key!r}: expected a positive whole number of bytes, got {value!r}")
    return value


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"config key {key!r}: expected a whole number of bytes (0: no limit), got {value!r}"
        )
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
    return value


def _optionalCount(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config key {key!r}: expected a positive whole number, got {value!r}")
    return value


def _wholeNumber(key: str, value: Any) -> int:
    """A count that may be 0 (none)."""
    if value == 0 and not isinstance(value, bool):
        return 0
    return _count(key, value)


def _count(key: str, value: Any) -> int:
    counted = _optionalCount(key, value)
    if counted is None:
        raise ConfigError(f"config key {key!r}: expected a positive whole number, got None")
    return counted


def _url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config key {key!r}: expected a URL string, got {value!r}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"config key {key!r}: expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"config key {key!r}: the URL may not carry a query or fragment: {value!r}")
    del port  # parsed only so that a bad port is reported here
    return value.rstrip("/")


def _backends(key: str, value: Any) -> tuple[BackendSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"config key {key!r}: expected a list of backend URLs or mappings, got {value!r}")
    specs = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            specs.append(BackendSpec(_url(where, item)))
            continue
        if not isinstance(item, dict) or "url" not in item:
            raise ConfigError(f"config key {where!r}: expected a URL or a mapping with a url, got {item!r}")
        unknown = sorted(set(item) - {"url", "api_key", "slots", "weight", "slot_save_path"})
        if unknown:
            raise ConfigError(
                f"config key {where!r}: unknown key {unknown[0]!r}; "
                "known: url, api_key, slots, weight, slot_save_path"
            )
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"config key {where + '.weight'!r}: expected a positive number, got {weight!r}")
        specs.append(
            BackendSpec(
                _url(where + ".url", item["url"]),
                _optionalString(where + ".api_key", item.get("api_key")),
                _optionalCount(where + ".slots", item.get("slots")),
                float(weight),
                _optionalString(where + ".slot_save_path", item.get("slot_save_path")),
            )
        )
    urls = [spec.url for spec in specs]
    for url in urls:
        if urls.count(url) > 1:
            raise ConfigError(f"config key {key!r}: {url} is listed twice")
    return tuple(specs)


def _models(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config key {key!r}: expected a list of model names, got {value!r}")
    return tuple(value)


def _templateModels(key: str, value: Any) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"config key {key!r}: expected a mapping of template prefix to a list of models")
    return {prefix: _models(f"{key}.{prefix}", models) for prefix, models in value.items()}


def _ratio(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
        raise ConfigError(f"config key {key!r}: expected a number of at least 1, got {value!r}")
    return float(value)


def _warmOn(key: str, value: Any) -> int | None:
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'config key {key!r}: expected a positive whole number or "all", got {value!r}')
    return value


def _optionalString(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _roots(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config key {key!r}: expected a list of directory paths, got {value!r}")
    return tuple(value)


def _prefixes(key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r}: expected a mapping of prefix to template path")
    for prefix, path in value.items():
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(
                f"config key {key!r}: prefix {prefix!r} must be a non-empty string without spaces"
            )
        if not isinstance(path, str) or not path:
            raise ConfigError(f"config key {key!r}: template path for {prefix!r} must be a non-empty string")
    return dict(value)


_CHECKS = {
    "proxy_host": _host,
    "proxy_port": _port,
    "admin_host": _host,
    "admin_port": _port,
    "backend_url": _url,
    "warmup_check_interval": _positive,
    "prefixes": _prefixes,
    "listen": _optionalString,
    "admin_listen": _optionalString,
    "backend_timeout": _positive,
    "backend_idle_timeout": _positive,
    "response_buffer_bytes": _bytes,
    "write_stall_timeout": _positive,
    "client_timeout": _positive,
    "max_body_bytes": _bytes,
    "health_check_interval": _positive,
    "shutdown_grace": _positive,
    "admin_token": _optionalString,
    "admin_open_health": _flag,
    "template_roots": _roots,
    "max_template_bytes": _bytes,
    "slots": _optionalCount,
    "max_queue": _count,
    "max_queue_wait": _positive,
    "backend_api_key": _optionalString,
    "backend_api_key_file": _optionalString,
    "learn_after": _count,
    "max_learned": _count,
    "max_learned_bytes": _size,
    "max_conversations": _wholeNumber,
    "conversation_idle": _positive,
    "normalise_billing_header": _flag,
    "allow_slot_actions": _flag,
    "access_log": _flag,
    "state_file": _optionalString,
    "slot_save_path": _optionalString,
    "backends": _backends,
    "warm_on": _warmOn,
    "balance_threshold": _count,
    "balance_ratio": _ratio,
    "models": _models,
    "template_models": _templateModels,
}
assert set(_CHECKS) == KEYS, "every config key needs a check"


class _ParseOnlyReactor:
    """Stands in for a reactor so endpoint strings are parsed, never bound."""


def _checkEndpoint(key: str, description: str) -> None:
    try:
        serverFromString(_ParseOnlyReactor(), description)
    except (IndexError, KeyError) as e:
        if description.startswith("systemd:"):
            raise ConfigError(
                f"config key {key!r}: endpoint {description!r} needs a socket handed over by "
                f"systemd, and none named or numbered {e} was (LISTEN_FDS="
                f"{os.environ.get('LISTEN_FDS', 'unset')})"
            ) from None
        raise ConfigError(f"config key {key!r}: bad endpoint {description!r}: {e!r}") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's input
        raise ConfigError(f"config key {key!r}: bad endpoint {description!r}: {e}") from None
