"""
The backends behind bioproxy: each llama-server, what bioproxy knows of its
process (process.py), the pieces that serve it alone (member.py), and the
router that chooses among them (router.py).
"""

from .process import PROBE_MARK, Backend, BackendListener, Persistence, SlotMode

__all__ = ["PROBE_MARK", "Backend", "BackendListener", "Persistence", "SlotMode"]
