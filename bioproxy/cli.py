# -*- test-case-name: tests.e2e.test_cli -*-
"""
The `bioproxy` command, beside `twistd -n bioproxy` (which keeps working).

    bioproxy [run] [flags]          run in the foreground: no pid file, no daemon
    bioproxy --version              bioproxy's version, not Twisted's
    bioproxy check-config [--config F]
                                    load the config, every template and include; a summary, exit 0 or 2
    bioproxy status [--admin URL] [--token T]
                                    templates, slots and the queue, from a running bioproxy's admin API
    bioproxy prune-cache --dir D [--admin URL] [--token T] [--dry-run]
                                    remove from llama-server's --slot-save-path D the cache files
                                    of template versions and builds a running bioproxy no longer uses

`run` hands its flags to twistd's bioproxy plugin, so both take the same
flags and report errors alike: one line on stderr and exit status 2, as
every usage or start-up error of every subcommand. Each takes --help and
--version.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__

USAGE = __doc__.split("\n\n")[1]


COMMANDS = ("run", "check-config", "status", "prune-cache")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and not args[0].startswith("-") else "run"
    rest = args[1:] if args and args[0] == command else args
    if "--version" in rest or "-V" in rest or args[:1] in (["--version"], ["-V"]):
        print(f"bioproxy {__version__}")
        return
    if args[:1] in (["--help"], ["-h"], ["help"]):
        print(USAGE)
        print("`bioproxy COMMAND --help` says more of each.")
        return
    if command in COMMANDS and ("--help" in rest or "-h" in rest):
        print(commandHelp(command))
        return
    if command == "run":
        run(rest)
    elif command == "check-config":
        raise SystemExit(checkConfig(rest))
    elif command == "status":
        raise SystemExit(status(rest))
    elif command == "prune-cache":
        raise SystemExit(pruneCache(rest))
    else:
        _fail(
            f"unknown command {command!r}; one of run, check-config, status, prune-cache (see bioproxy --help)"
        )


def commandHelp(command: str) -> str:
    """A subcommand's own usage: its line of USAGE, and for run the flags it takes."""
    lines = USAGE.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[1:2] in ([command], [f"[{command}]"]))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].split()[:1] == ["bioproxy"]), len(lines))
    text = "\n".join(line.strip() if i == start else line for i, line in enumerate(lines[start:end], start))
    if command != "run":
        return "usage: " + text
    from .tap import Options

    flags = [
        line
        for line in str(Options()).splitlines()[1:]
        if "Twisted version" not in line and not line.startswith("Options:")
    ]
    return "usage: " + text + "\n\nflags:\n" + "\n".join(flags).rstrip()


def run(flags: list[str]) -> None:
    """twistd in the foreground, with no pid file: what a service manager and a terminal both want."""
    from twisted.python import usage
    from twisted.scripts.twistd import run as twistd

    from .config import ConfigError
    from .tap import Options

    try:  # a bad flag is one line and status 2 here, not twistd's usage text and status 1
        Options().parseOptions(flags)
    except (usage.UsageError, ConfigError) as e:
        _fail(str(e))
    sys.argv = ["bioproxy", "--nodaemon", "--pidfile=", "bioproxy", *flags]
    twistd()


def checkConfig(args: list[str]) -> int:
    from .config import ConfigError, load
    from .service import templateSources
    from .templates import TemplateError
    from .templates import load as loadTemplate

    path = _option(args, "--config", "-c")
    try:
        config = load(path, {})
        sources = templateSources(config)
        templates = [
            loadTemplate(prefix, sources.templatePath(raw), sources, config.max_template_bytes)
            for prefix, raw in config.prefixes.items()
        ]
    except (ConfigError, TemplateError) as e:
        sys.stderr.write(f"bioproxy: {e}\n")
        return 2
    print(f"config: {config.source or 'defaults (no file)'}")
    print(f"backend: {config.backend_url}")
    print(f"proxy: {config.proxy_endpoint}; admin: {config.admin_endpoint}")
    for template in templates:
        includes = f", includes {', '.join(template.includePaths)}" if template.includePaths else ""
        print(f"template {template.prefix}: {template.path} ({template.size} bytes{includes})")
    print(f"ok: {len(templates)} template(s)")
    return 0


def status(args: list[str]) -> int:
    admin = (_option(args, "--admin") or "http://localhost:8089").rstrip("/")
    token = _option(args, "--token")
    try:
        templates = _get(admin + "/templates", token)
        slots = _get(admin + "/slots", token)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"bioproxy: cannot read {admin}: {e}\n")
        return 2
    several = len(templates.get("backends") or []) > 1
    rows: list[tuple[str, ...]] = [
        (
            "TEMPLATE",
            "WARM STATE",
            *(("WHERE",) if several else ()),
            "HITS",
            "MISSES",
            "TOKENS",
            "SAVED",
            "MODE",
            "ERROR",
        )
    ]
    for t in templates.get("templates", []):
        rows.append(
            (
                t["prefix"],
                t.get("warm_state") or ("warm" if t.get("warm") else "cold"),
                *((t.get("warmest_backend") or "",) if several else ()),
                str(t.get("hits", 0)),
                str(t.get("misses", 0)),
                str(t.get("tokens") or ""),
                str(t.get("tokens_saved", "")),
                str(t.get("warmup_mode") or ""),
                t.get("warmup_error") or t.get("last_error") or "",
            )
        )
    print(_table(rows))
    for backend in templates.get("backends") or []:
        model = (backend.get("model") or {}).get("name") or "unknown"
        where = f" at {backend.get('url')}" if several else ""
        print(f"\nmodel {model}{where}: a restored cache file reuses {backend.get('restore_reuses')}")
        if backend.get("restore_reuses_why"):
            print(f"  {backend['restore_reuses_why']}")
    print()
    rows = [(*(("BACKEND",) if several else ()), "SLOT", "STATE", "HOLDS", "BUSY", "IDLE S")]
    for backend in slots.get("backends") or [slots]:
        for s in backend.get("slots", []):
            idle = s.get("idle_seconds")
            rows.append(
                (
                    *((backend.get("url") or "",) if several else ()),
                    str(s["id"]),
                    s.get("state") or "",
                    s.get("template") or "",
                    s.get("holder") or "",
                    "" if idle is None else f"{idle:.0f}",
                )
            )
    print(_table(rows))
    waiting = slots.get("waiting", {})
    print(f"\nwaiting: {', '.join(f'{k} {v}' for k, v in sorted(waiting.items())) or 'none'}")
    return 0


# What bioproxy names its cache files: <head>-<12 hex of its version>-<build fingerprint>.bin
_CACHE_FILE = re.compile(r"^[A-Za-z0-9_-]+-[0-9a-f]{12}-[0-9a-f]+\.bin$")


def pruneCache(args: list[str]) -> int:
    """
    Obsolete files are those named as bioproxy names cache files that no head
    of the running bioproxy uses now: older versions of edited templates,
    dropped learned heads and conversations, other llama-server builds. bioproxy cannot delete
    through llama-server, which has no such action, hence a command run where
    the directory is.
    """
    directory = _option(args, "--dir")
    if directory is None:
        _fail("prune-cache needs --dir, llama-server's --slot-save-path")
    if not Path(directory).is_dir():
        _fail(f"--dir {directory}: no such directory (llama-server's --slot-save-path)")
    admin = (_option(args, "--admin") or "http://localhost:8089").rstrip("/")
    try:
        view = _get(admin + "/templates", _option(args, "--token"))
    except (OSError, ValueError) as e:
        sys.stderr.write(f"bioproxy: cannot read {admin}: {e}\n")
        return 2
    if not any(b.get("fingerprint") for b in view.get("backends") or [view.get("backend") or {}]):
        sys.stderr.write(
            "bioproxy: the backend is not probed yet, so the files in use are not known; try again\n"
        )
        return 2
    heads = [
        *view["templates"],
        *(v for t in view["templates"] for v in t.get("variants", [])),
        *view["learned"],
        *(view.get("conversations") or {}).get("conversations", []),
    ]
    used = {h.get("cache_file") for h in heads}
    dryRun = "--dry-run" in args
    removed = 0
    try:
        paths = sorted(Path(directory).iterdir())
    except OSError as e:
        _fail(f"--dir {directory}: {e.strerror or e}")
    for path in paths:
        if path.is_file() and _CACHE_FILE.match(path.name) and path.name not in used:
            print(("would remove " if dryRun else "removed ") + str(path))
            if not dryRun:
                path.unlink()
            removed += 1
    print(f"{removed} obsolete file(s); {len(used - {None})} in use kept")
    return 0


def _get(url: str, token: str | None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise OSError(f"HTTP {e.code} from {url}") from None


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"bioproxy: {message}\n")
    raise SystemExit(2)
