# -*- test-case-name: tests.unit.test_state -*-
"""
What bioproxy learns while it runs and must not lose when it restarts: the
learned heads (templates behind system prompts, agents' system prompts and
tools) with their uses, and the cache files it saved. Without this, a
restart of bioproxy forgets them, and the next llama-server restart
recomputes every agent's prompt; with it, their files are restored as
templates' are.

The file is JSON, readable by bioproxy's user alone (it holds prompt text),
with each backend's files under its URL (format 2; format 1 kept the first
backend's apart, and still loads),
written whole to a temporary file and renamed over the old one: at most once per `interval`, when a head or a file came or went
(uses alone wait), and once more on stop, uses and all. A file that cannot
be read is reported and set aside: bioproxy then starts with nothing
learned, as it would without one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .backend.kvcache import KVCache
from .heads import HeadBook

log = Logger()

FORMAT = 2  # 1: "files" of the first backend, "other_backends_files" by URL; 2: "backends" by URL


class StateFile(Service):
    def __init__(
        self,
        path: Path,
        book: HeadBook,
        backends: Sequence[tuple[str, KVCache]],
        clock: IReactorTime,
        interval: float = 10.0,
    ) -> None:
        """backends: every backend, by URL, in the configuration's order."""
        self.path = path
        self.book = book
        self.backends = list(backends)
        self.clock = clock
        self.interval = interval
        self._written: tuple[int, frozenset[tuple[str, str]]] | None = None
        self._read: dict[
            str, list[Any]
        ] = {}  # the files the file named, by backend: for those that join later
        self._loop: LoopingCall | None = None

    def read(self) -> None:
        """Add what the file holds to the book and the backends' known files; nothing if there is no file."""
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") not in (1, FORMAT):
                raise ValueError(f"not a bioproxy state file of format 1 or {FORMAT}")
            heads = data.get("heads", [])
            files = _filesByURL(data, [url for url, _ in self.backends])
            if not isinstance(heads, list):
                raise ValueError("its heads must be a list")
        except FileNotFoundError:
            return
        except Exception as e:  # noqa: BLE001 - whatever it holds (1e999, nesting past Python's limit), never a crash
            self._setAside(e)
            return
        self.book.addEntries(heads)
        # Files this bioproxy saved before; a restore finds out whether they are still there.
        self._read = files
        for url, cache in self.backends:
            cache.noteFilesSaved(f for f in files.get(url, []) if isinstance(f, str))
        self._written = self._version()
        log.info("read {n} learned head(s) from {path}", n=len(self.book.entries), path=str(self.path))

    def join(self, name: str, cache: KVCache) -> None:
        """A backend found after start-up (a model of llama-server's router): its files are kept too."""
        self.backends.append((name, cache))
        cache.noteFilesSaved(f for f in self._read.get(name, []) if isinstance(f, str))

    def _setAside(self, e: Exception) -> None:
        aside = self.path.with_name(self.path.name + ".unreadable")
        log.warn(
            "state file {path} cannot be read ({why}); moved to {aside}, starting afresh",
            path=str(self.path),
            why=f"{type(e).__name__}: {e}"[:200],
            aside=str(aside),
        )
        try:
            self.path.replace(aside)
        except OSError:
            pass

    def write(self, force: bool = False) -> None:
        """
        Write the book and the known files, if they changed since the last
        write (or, with force, anyway: the uses and their order, on stop).
        It runs on the reactor: a few dozen heads, written rarely.
        """
        version = self._version()
        if version == self._written and not force:
            return
        data: dict[str, Any] = {
            "format": FORMAT,
            "heads": self.book.entriesData(),
            "backends": {url: sorted(cache.files) for url, cache in self.backends},
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The heads are prompt text: only bioproxy's user may read them.
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(descriptor, 0o600)  # a .tmp left over from before keeps its own mode otherwise
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, ensure_ascii=False))
            os.replace(temporary, self.path)
        except OSError as e:
            log.warn("cannot write state file {path}: {why}", path=str(self.path), why=str(e))
            return
        self._written = version

    def _version(self) -> tuple[int, frozenset[tuple[str, str]]]:
        known = {(url, f) for url, cache in self.backends for f in cache.files}
        return self.book.changes, frozenset(known)

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.write)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.write(force=True)


def _filesByURL(data: dict[str, Any], urls: list[str]) -> dict[str, list[Any]]:
    """Each backend's files, by URL, from either format (1: the first backend's were "files")."""
    if data["format"] == 1:
        files = data.get("files", [])
        others = data.get("other_backends_files") or {}
        if not isinstance(files, list) or not isinstance(others, dict):
            raise ValueError("its files must be a list, and other_backends_files an object")
        return {**others, **({urls[0]: files} if urls else {})}
    backends = data.get("backends", {})
    if not isinstance(backends, dict) or not all(isinstance(v, list) for v in backends.values()):
        raise ValueError("its backends must be an object of lists")
    return backends
