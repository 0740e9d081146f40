"""PC backends behind :class:`pcfast.pc.PCEngine`: one small interface (:mod:`.base`), the
reference backend (autograd, the oracle) and the fast backend (explicit VJPs, fused ops, CUDA
graphs). Backends never import the front; the front chooses among them.
"""

from pcfast.pc.backends.base import BackendUnavailable, PCBackend, PCResult, PCSettings
from pcfast.pc.backends.reference import ReferenceBackend

__all__ = ["BackendUnavailable", "PCBackend", "PCResult", "PCSettings", "ReferenceBackend"]
