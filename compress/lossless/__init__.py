"""Lossless passes: ``entropy_code`` (DFloat11-style Huffman coding of exponents or codes)."""
