"""What an export with ``contextual_sparsity`` in its ``config.json`` gets when loaded.

The export loader (:mod:`compress.export.hf`, after ``from_pretrained`` has loaded the weights)
calls :func:`install_`: the projections become
:class:`compress.prune.contextual.ContextualLinear` with the exported thresholds, and where the
export asks for Sirius correction, ``generate`` on this model instance uses
:func:`compress.prune.sirius.sirius_decoding` unless the caller passes a ``custom_generate`` of
its own (bound the way transformers binds a repository's ``custom_generate``).
"""

from __future__ import annotations

import functools
import logging

from torch import nn

from compress.prune.contextual import install_from_config_
from compress.prune.sirius import configured_period, sirius_decoding

__all__ = ["install_"]

log = logging.getLogger(__name__)


def install_(model: nn.Module) -> None:
    """Make a freshly loaded export sparse (and Sirius-corrected) as its config says."""
    count = install_from_config_(model)
    period = configured_period(model)
    if period is not None:
        generate = type(model).generate  # type: ignore[attr-defined]
        model.generate = functools.partial(  # type: ignore[assignment]
            generate, model, custom_generate=sirius_decoding
        )
    log.info(
        "contextual sparsity: %d projections sparse%s",
        count,
        f"; generate() corrects with Sirius every {period} tokens" if period else "",
    )
