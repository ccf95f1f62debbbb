"""Finding the modules a pass acts on: decoder layers and the Linear layers inside them."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from compress.errors import PassError

__all__ = [
    "decoder_layers",
    "embed_scale_of",
    "match_any",
    "select_decoder_linears",
    "select_linears",
    "select_weights",
    "untie_",
]


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
    selected, skipped = select_weights(model, targets, ignore, embeddings=False)
    return {n: m for n, m in selected.items() if isinstance(m, nn.Linear)}, skipped


def select_decoder_linears(
    model: nn.Module,
    targets: Sequence[str] | None,
    ignore: Sequence[str],
    *,
    pass_name: str,
    why: str,
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """:func:`select_linears` for a pass that works layer by layer on the decoder: a targeted
    Linear outside the decoder layers is skipped with ``why``, and nothing left is an error."""
    modules, skipped = select_linears(model, targets, ignore)
    prefix, _ = decoder_layers(model)
    for name in [n for n in modules if not n.startswith(prefix + ".")]:
        del modules[name]
        skipped[name] = f"outside the decoder layers: {why}"
    if not modules:
        raise PassError(
            f"{pass_name}: no Linear module in the decoder layers matched the targets",
            hint="check the targets/ignore patterns against model.named_modules()",
        )
    return modules, skipped


def select_weights(
    model: nn.Module,
    targets: Sequence[str] | None,
    ignore: Sequence[str],
    *,
    embeddings: bool = True,
) -> tuple[dict[str, nn.Linear | nn.Embedding], dict[str, str]]:
    """:func:`select_linears`, where named targets may also be ``nn.Embedding`` modules (their
    ``(vocab, hidden)`` weight is quantized like a Linear's ``(out, in)`` one)."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    candidates: dict[str, nn.Linear | nn.Embedding] = {}
    prefix = decoder_layers(model)[0] if targets is None else ""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Embedding):
            continue
        if targets is None:
            if isinstance(module, nn.Linear) and name.startswith(prefix + "."):
                candidates[name] = module
        elif isinstance(module, kinds) and match_any(name, targets):
            candidates[name] = module
    selected: dict[str, nn.Linear | nn.Embedding] = {}
    skipped: dict[str, str] = {}
    for name, module in candidates.items():
        if match_any(name, ignore):
            skipped[name] = "matched an ignore pattern"
        else:
            selected[name] = module
    return selected, skipped


def untie_(model: nn.Module, selected: Mapping[str, nn.Linear | nn.Embedding]) -> list[str]:
    """Give each selected module whose weight it shares with an unselected one its own copy.

    A pass that quantizes ``lm_head`` but not the embedding it is tied to (or the reverse) must
    not change the other; the model's config stops declaring the tie, so an export stores
    both. Returns one line per untied pair, for the pass report.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    notes = []
    for name, module in selected.items():
        sharing = [n for n in owners.get(id(module.weight), []) if n != name]
        if sharing and any(other not in selected for other in sharing):
            weight = module.weight
            module.weight = nn.Parameter(
                weight.detach().clone(), requires_grad=weight.requires_grad
            )
            config = getattr(model, "config", None)
            if config is not None and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            notes.append(
                f"{name} was tied to {', '.join(sharing)}; untied so that only {name} changes "
                "(both are stored)"
            )
    return notes


def embed_scale_of(embedding: nn.Module) -> float | None:
    """The factor a scaled embedding (Gemma's) applies to looked-up rows, if any.

    Read from the plain number such modules keep beside their buffer: at load time the
    buffer is still on the meta device.
    """
    scalar = getattr(embedding, "scalar_embed_scale", None)
    if isinstance(scalar, int | float):
        return float(scalar)
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and not scale.is_meta:
        return float(scale.item())
    if isinstance(scale, int | float):
        return float(scale)
    if scale is not None:
        raise ValueError(f"cannot read the embedding scale of {type(embedding).__name__}")
    return None
