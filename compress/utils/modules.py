"""Finding the modules a pass acts on: decoder layers and the Linear layers inside them."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from compress.errors import PassError

__all__ = ["decoder_layers", "match_any", "select_linears"]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` holding the decoder blocks of an HF causal LM.

    Looks for the largest ``ModuleList`` whose children share one class, which covers Llama,
    Mistral, Qwen, GPT-2 (``transformer.h``), OPT (``model.decoder.layers``) and most others.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise PassError(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
            "identical blocks",
            hint="supported: Hugging Face decoders whose blocks live in one ModuleList",
        )
    return best


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches any glob pattern (``*`` spans dots: ``*.mlp.*``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_linears(
    model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str]
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Linear modules a pass should touch, and the ones it skips with the reason.

    ``targets=None`` means every Linear inside the decoder blocks (embeddings and ``lm_head``
    stay as they are). Otherwise glob patterns over full module names choose among all Linears.
    """
    if targets is None:
        prefix, _ = decoder_layers(model)
        candidates = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix + ".")
        }
    else:
        candidates = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and match_any(name, targets)
        }
    selected: dict[str, nn.Linear] = {}
    skipped: dict[str, str] = {}
    for name, module in candidates.items():
        if match_any(name, ignore):
            skipped[name] = "matched an ignore pattern"
        else:
            selected[name] = module
    return selected, skipped
