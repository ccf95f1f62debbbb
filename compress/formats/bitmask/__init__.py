"""The bitmask sparse format (nonzero values plus one bit a weight): spec, packed module,
kernels."""

from compress.formats.bitmask.spec import BitmaskFormat

__all__ = ["BitmaskFormat"]
