"""Which process of a multi-process launch this is, read from the launcher's environment.

``accelerate launch`` and ``torchrun`` set ``RANK`` and ``WORLD_SIZE`` (MPI launchers their own
names); reading them needs neither torch.distributed nor accelerate to be initialised, so the
pipeline can decide early which process writes the export.
"""

from __future__ import annotations

import os

__all__ = ["process_rank"]

_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return default


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a multi-process launch."""
    return _first_int(_RANK, 0), max(1, _first_int(_WORLD, 1))
