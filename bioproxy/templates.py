# -*- test-case-name: tests.unit.test_templates -*-
"""
Prompt templates: pure rendering, include resolution with confinement, and
the library that maps a message's prefix to its template.

Rendering is a single pass over the template's own text. Text that came from
the user's message or from an included file is never scanned again, so a
user who types `<{/etc/passwd}>` gets exactly that text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

PLACEHOLDER = re.compile(r"<\{([^{}]*)\}>")
MESSAGE = "message"
MiB = 1024 * 1024


class TemplateError(Exception):
    """A template that cannot be used, with the reason in the message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # a metrics label: missing, unreadable, encoding, too_large, include, confined


def includeNames(text: str) -> list[str]:
    """The include paths a template names, in order, without duplicates."""
    names = (m.group(1).strip() for m in PLACEHOLDER.finditer(text))
    return list(dict.fromkeys(n for n in names if n != MESSAGE))


def render(text: str, message: str, includes: Mapping[str, str]) -> str:
    """Fill the placeholders of text in one non-recursive pass."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        return message if name == MESSAGE else includes[name]

    return PLACEHOLDER.sub(fill, text)


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a cheap stat says about a file; a change means re-read it."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> Signature:
        st = path.stat()
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


@dataclasses.dataclass(frozen=True)
class Template:
    prefix: str
    path: Path
    text: str
    includes: Mapping[str, str]  # name as written -> content
    includePaths: Mapping[str, Path]  # name as written -> resolved file
    signatures: Mapping[Path, Signature]
    hash: str  # sha256 of the text rendered with an empty message
    size: int  # bytes of that rendering

    def render(self, message: str) -> str:
        return render(self.text, message, self.includes)

    @property
    def key(self) -> str:
        """Names this version of the template: what a slot holds, and its cache file."""
        return f"{self.prefix}@{self.hash[:12]}"

    def changedOnDisk(self) -> bool:
        """True when any file the template was built from looks different."""
        for path, signature in self.signatures.items():
            try:
                if Signature.of(path) != signature:
                    return True
            except OSError:
                return True
        return False


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where template paths and includes are looked for, and where they may live."""

    configDir: Path
    cwd: Path
    roots: tuple[Path, ...]

    @classmethod
    def build(
        cls,
        configDir: Path,
        templatePaths: Iterable[str] = (),
        extraRoots: Iterable[Path] = (),
        cwd: Path | None = None,
    ) -> Sources:
        """By default the roots are the config's folder and each template's folder."""
        partial = cls(configDir, cwd or Path.cwd(), ())
        folders = {partial.templatePath(raw).resolve().parent for raw in templatePaths}
        roots = {configDir.resolve(), *folders, *(r.resolve() for r in extraRoots)}
        return dataclasses.replace(partial, roots=tuple(sorted(roots)))

    def templatePath(self, raw: str) -> Path:
        """A configured template path: absolute, else beside the config, else the working directory."""
        path = Path(raw).expanduser()
        if path.is_absolute():
            return path
        beside = self.configDir / path
        return beside if beside.exists() or not (self.cwd / path).exists() else self.cwd / path

    def include(self, name: str, templateDir: Path) -> tuple[Path, Path]:
        """
        Resolve an include: the template's folder, the config's, then the
        working directory. Returns the path as found, which is what is
        watched (so that a symlink pointed elsewhere is a change), and the
        file it resolves to, which is what must lie inside the roots.
        """
        candidates = (
            [Path(name)]
            if Path(name).is_absolute()
            else [d / name for d in (templateDir, self.configDir, self.cwd)]
        )
        for candidate in candidates:
            if candidate.is_file():
                real = candidate.resolve()
                if not any(real.is_relative_to(root) for root in self.roots):
                    raise TemplateError(
                        "confined",
                        f"include {name!r} resolves to {str(real)!r}, outside the template roots "
                        f"({', '.join(str(r) for r in self.roots)})",
                    )
                return candidate, real
        raise TemplateError(
            "include", f"include {name!r} not found (looked in: {', '.join(str(c) for c in candidates)})"
        )


def _read(path: Path, what: str, maxBytes: int) -> tuple[str, Signature]:
    try:
        signature = Signature.of(path)
        if signature.size > maxBytes:
            # Refused by its size, before it is read: a huge file costs a stat, not its bytes.
            raise TemplateError(
                "too_large", f"{what} {str(path)!r} is {signature.size} bytes; the limit is {maxBytes}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise TemplateError("missing", f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise TemplateError("unreadable", f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        return data.decode("utf-8"), signature
    except UnicodeDecodeError as e:
        raise TemplateError("encoding", f"{what} {str(path)!r} is not valid UTF-8 (byte {e.start})") from None


def load(prefix: str, path: Path, sources: Sources, maxBytes: int = 4 * MiB) -> Template:
    """Read a template and its includes from disk. Blocking: call it off the reactor."""
    text, signature = _read(path, f"template for {prefix!r}", maxBytes)
    signatures = {path: signature}
    includes: dict[str, str] = {}
    includePaths: dict[str, Path] = {}
    for name in includeNames(text):
        try:
            found, resolved = sources.include(name, path.parent)
            # Read where it resolves; watched where it was found (stat follows the link).
            includes[name], signatures[found] = _read(resolved, f"include {name!r}", maxBytes)
        except TemplateError as e:
            raise TemplateError(
                e.kind if e.kind in ("confined", "encoding", "too_large") else "include",
                f"template {prefix!r}: {e}",
            ) from None
        includePaths[name] = resolved
    rendered = render(text, "", includes).encode("utf-8")
    if len(rendered) > maxBytes:
        raise TemplateError(
            "too_large",
            f"template {prefix!r} is {len(rendered)} bytes with includes; the limit is {maxBytes}",
        )
    return Template(
        prefix=prefix,
        path=path,
        text=text,
        includes=includes,
        includePaths=includePaths,
        signatures=signatures,
        hash=hashlib.sha256(rendered).hexdigest(),
        size=len(rendered),
    )


def validPrefix(prefix: str) -> bool:
    return bool(prefix) and not any(c.isspace() for c in prefix)


class TemplateLibrary:
    """The current good version of every template, by prefix."""

    def __init__(self, templates: Iterable[Template] = ()) -> None:
        self.templates: dict[str, Template] = {}
        self._byLength: list[str] = []
        for template in templates:
            self.put(template)

    def put(self, template: Template) -> None:
        self.templates[template.prefix] = template
        self._reorder()

    def remove(self, prefix: str) -> None:
        self.templates.pop(prefix, None)
        self._reorder()

    def _reorder(self) -> None:
        # Longest first, so `@code` wins over `@c` whatever the config's order.
        self._byLength = sorted(self.templates, key=lambda p: (-len(p), p))

    def match(self, text: str) -> tuple[Template, str] | None:
        """The template text starts with, and the message after prefix and whitespace."""
        for prefix in self._byLength:
            if text.startswith(prefix):
                rest = text[len(prefix) :]
                if not rest or rest[0].isspace():
                    return self.templates[prefix], rest.lstrip()
        return None


def describe(template: Template) -> dict[str, object]:
    """The JSON view the admin site shows."""
    return {
        "prefix": template.prefix,
        "path": str(template.path),
        "includes": {name: str(p) for name, p in template.includePaths.items()},
        "hash": template.hash,
        "size": template.size,
    }
