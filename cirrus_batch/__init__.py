"""CIRRUS: cloud recognition and reconstruction for LWIR all-sky camera archives."""

from cirrus_batch.errors import CirrusError

__version__ = "0.1.0"
__all__ = ["CirrusError", "__version__"]
