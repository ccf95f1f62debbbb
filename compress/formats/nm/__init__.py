"""The N:M sparse integer format (kept codes plus their positions): spec, packed module,
kernels."""

from compress.formats.nm.spec import NMIntFormat

__all__ = ["NMIntFormat"]
