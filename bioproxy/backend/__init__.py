# -*- test-case-name: tests.unit.test_process -*-
"""
One llama-server, as bioproxy serves it: built once per backend by
member.build, and importing nothing above it (tests/unit/test_layers.py).

- llamacpp.py: its API client; monitor.py: its health checks;
- process.py: what bioproxy knows of its process (slots, persistence, restarts), model.py: of its model;
- scheduler.py: its slots and their queues; kvcache.py: its cache's facts (pure, one writer);
- cacheio.py: what asks llama-server about them (boundaries, restores, saves, slot files);
- warmup.py: its warmups; dispatch.py: requests run on its slots;
- member.py: the pieces together (Member), and build.

The router, which chooses among backends, stands above them (bioproxy/router.py).
"""

from .model import Reuse
from .process import PROBE_MARK, Backend, BackendListener, Persistence, SlotMode

__all__ = ["PROBE_MARK", "Backend", "BackendListener", "Persistence", "Reuse", "SlotMode"]
