"""
The backends behind bioproxy: each llama-server, what bioproxy knows of its
process (process.py) and of its model (model.py), the pieces that serve it alone (member.py), and the
router that chooses among them (router.py).
"""

from .model import Reuse
from .process import PROBE_MARK, Backend, BackendListener, Persistence, SlotMode

__all__ = ["PROBE_MARK", "Backend", "BackendListener", "Persistence", "Reuse", "SlotMode"]
