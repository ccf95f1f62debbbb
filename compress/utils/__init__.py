"""Small helpers shared by every layer: cache location, atomic folders, progress, module lookup."""
