# -*- test-case-name: tests.unit.test_architectures -*-
"""
What a model's memory lets llama-server reuse, and so what a saved slot is
worth: from the model file's own metadata (its GGUF header), confirmed on
the running server by a restore probe (process.py).

llama-server can cut a dense model's memory at any position, so a slot file
serves any request that shares a prefix with it. A hybrid model's recurrent
layers hold their state only at the last position computed, so a restored
file serves only requests that extend every token it holds. A
sliding-window model's file keeps only the window, and build 11434 reuses
none of it: it asks for a context checkpoint that a restore never brings.
`/props` says none of this, so bioproxy reads the header itself when the
model file is on its machine, and otherwise goes by the probe alone.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO


class Reuse(enum.Enum):
    """Which later requests a restored slot file gives a cache hit to."""

    UNKNOWN = "unknown"  # not probed (no slot files, or not yet)
    PREFIX = "any shared prefix"  # dense: any request that shares a start with it
    EXTENSION = "strict extensions"  # hybrid: only a request that extends every saved token
    NOTHING = "nothing"  # sliding window without --swa-full: restores are never reused


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the GGUF header says of a model's memory."""

    architecture: str
    slidingWindow: int | None  # tokens, where some layers see only a window
    recurrent: bool  # some layers keep a recurrent state (SSM, delta net, short convolution, RWKV)
    # The file's size and modification time: a model updated in place (the
    # same path, other weights) must not restore files of the old one.
    identity: str = ""

    def expected(self) -> Reuse:
        """What a restore should give on llama-server 11434 with its default flags."""
        if self.recurrent:
            return Reuse.EXTENSION
        if self.slidingWindow:
            return Reuse.NOTHING
        return Reuse.PREFIX

    def describe(self) -> str:
        if self.recurrent:
            return f"{self.architecture} (hybrid: recurrent layers)"
        if self.slidingWindow:
            return f"{self.architecture} ({self.slidingWindow}-token sliding window)"
        return f"{self.architecture} (dense attention)"

    def view(self) -> dict[str, Any]:
        return {
            "name": self.architecture,
            "sliding_window": self.slidingWindow,
            "recurrent": self.recurrent,
        }


# Keys (after "<architecture>.") that only models with recurrent layers carry.
_RECURRENT = ("ssm.", "shortconv.", "wkv.", "time_mix", "token_shift", "rescale_every_n_layers")

# GGUF value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class NotGGUF(ValueError):
    """The file is not a GGUF model, or its header is cut short."""


def readFacts(path: str | Path) -> ModelFacts:
    """
    The header's key-value pairs, read up to the tensors (a large vocabulary
    is skipped, not read): blocking file I/O, for a thread.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise NotGGUF(f"{path} is not a GGUF file")
        version, _tensors, count = struct.unpack("<IQQ", _exactly(f, 20))
        if version < 2:
            raise NotGGUF(f"{path} is GGUF version {version}; only 2 and later are read")
        values: dict[str, Any] = {}
        for _ in range(count):
            key = _string(f)
            values[key] = _value(f, struct.unpack("<I", _exactly(f, 4))[0])
        stat = os.fstat(f.fileno())
    return dataclasses.replace(factsOf(values), identity=f"{stat.st_size}:{stat.st_mtime_ns}")


def factsOf(values: dict[str, Any]) -> ModelFacts:
    arch = str(values.get("general.architecture", "unknown"))
    window = values.get(f"{arch}.attention.sliding_window")
    recurrent = any(key.startswith(f"{arch}.{part}") for key in values for part in _RECURRENT)
    return ModelFacts(arch, int(window) if isinstance(window, int) and window > 0 else None, recurrent)


def _exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise NotGGUF("the GGUF header ends early")
    return data


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _exactly(f, 8))
    return _exactly(f, length).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, length = struct.unpack("<IQ", _exactly(f, 12))
        if inner in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[inner])
            if length > 64:  # a vocabulary's scores or types: not needed, skipped
                f.seek(size * length, 1)
                return None
            return list(struct.unpack(f"<{length}{_SCALARS[inner]}", _exactly(f, size * length)))
        return [_value(f, inner) for _ in range(length)]
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, _exactly(f, struct.calcsize(fmt)))[0]
    raise NotGGUF(f"unknown GGUF value type {kind}")
