"""asd: anomalous sound detection for machine condition monitoring."""

from asd.errors import AsdError

__all__ = ["AsdError"]
__version__ = "0.1.0"
