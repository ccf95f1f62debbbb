"""Formats on disk: packing, packed modules, the export writer, and the transformers plug-in."""
