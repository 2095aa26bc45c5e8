# -*- test-case-name: tests.unit.test_llamalog -*-
"""
What llama-server's own log says it did, for tests and benchmarks that
compare bioproxy with llama-server alone.

Run with `-lv 5` (trace lines), llama-server says each time it copies a
slot's state into its RAM prompt cache: an idle slot's as a new task starts
(`--cache-idle-slots`, on by default), and the slot a task is placed on when
what it holds is about to be lost. Each copy is the slot's whole KV state
(megabytes on the tiny test model, hundreds of MiB on a real one), made
before the task's prefill. Every copy is tried with "saving prompt with
length"; a copy of what the cache already holds, or of more than it may
hold, is given up with a line of its own.
"""

from __future__ import annotations

import re

VERBOSITY = ("-lv", "5")  # the flags that make llama-server say so

_TRIED = b" - saving prompt with length"
_GIVEN_UP = (b" - prompt is already in the cache, skipping", b"exceeds cache size limit")


def ramCopies(log: bytes) -> int:
    """How many slot states the log says were copied into the RAM cache."""
    return log.count(_TRIED) - sum(log.count(line) for line in _GIVEN_UP)


_COMPUTED = re.compile(rb"prompt eval time =\s+[0-9.]+ ms /\s+([0-9]+) tokens")


def promptTokens(log: bytes) -> int:
    """
    Prompt tokens llama-server computed, over every task it finished
    (bioproxy's warmups and probes included): its own per-task timing
    lines, which it logs at its default verbosity.
    """
    return sum(int(n) for n in _COMPUTED.findall(log))
