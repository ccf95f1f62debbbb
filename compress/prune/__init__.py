"""Pruning algorithms (weight sparsity). Siblings of quant/ and distill/: they never import each
other."""
