"""Quantization algorithms. Siblings of prune/ and distill/: they never import each other."""
