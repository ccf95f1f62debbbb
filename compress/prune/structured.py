"""Structured pruning: remove whole attention-head groups, MLP channels or decoder layers.

The ``prune`` pass with ``structure: heads | channels | layers`` (dispatched here from
:mod:`compress.prune.prune`) makes the model physically smaller: Linears are replaced by smaller
ones holding the kept rows / columns, removed layers leave the decoder's ``ModuleList``, and the
model's config (in memory, and through a :class:`compress.ir.ConfigPatch` on the root model, in
the exported ``config.json``) says so. Every layer keeps the same widths, so the family's
standard config describes the result and plain transformers loads the export.

Importance comes from calibration activations (Minitron, Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"), collected layer by layer through
:func:`compress.sequential.run_sequential` (heads and channels of layer i are scored on the
outputs of the already pruned layers before it):

* ``channels``: MLP channel j scores ``‖a_j‖`` over all calibration tokens, ``a`` the input of
  ``down_proj`` (``act(gate(x)) * up(x)``); ``score: l2`` takes the L2 norm, ``mean_abs`` the mean
  of ``|a_j|``.
* ``heads``: a query head scores the same aggregate of its attention output (its slice of
  ``o_proj``'s input); a key/value group sums the scores of its query heads. Whole groups go (the
  query heads with their key/value head), so grouped-query attention keeps its group size.
* ``layers``: block influence (ShortGPT, Men et al. 2024): ``1 - cos(h_in, h_out)`` of the
  layer's input and output hidden states, averaged over tokens; the least influential go.

Counts: ``sparsity`` is the fraction of that structure removed (of the key/value groups of each
layer, of each layer's MLP channels, of the layers), rounded to the nearest whole count;
``remove`` gives the count itself. Several structures combine as several ``prune`` passes.

Not done here: pruning a quantized model (prune first), offloaded runs (the layer store holds
layers of fixed shape), fused projections (Phi-3's ``qkv_proj`` / ``gate_up_proj``). The pass
writes no per-layer checkpoint: after ``--resume`` it runs again (it is deterministic).

Example recipe entries (25% of SmolLM2-135M's decoder parameters)::

    calibration: {dataset: builtin:wiki, samples: 32, seq_len: 512}
    passes:
      - {pass: prune, structure: channels, sparsity: 0.3333}   # 1536 -> 1024 MLP channels
      - {pass: prune, structure: layers, remove: 2}            # 30 -> 28 layers
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import PassError
from compress.ir import ConfigPatch, attach, get, get_quantized
from compress.layouts import Layout, layout_of
from compress.registry import PassContext, PassReport
from compress.sequential import run_sequential
from compress.utils.hooks import capture_inputs
from compress.utils.modules import decoder_layers

__all__ = [
    "Structure",
    "block_influence",
    "channel_scores",
    "group_scores",
    "keep_columns",
    "keep_rows",
    "prune_structured",
    "removed_count",
]

Structure = Literal["heads", "channels", "layers"]
Score = Literal["l2", "mean_abs"]

_WHAT = {"heads": "key/value head groups", "channels": "MLP channels", "layers": "decoder layers"}


# --------------------------------------------------------------------------------- tensor maths


def channel_scores(held: torch.Tensor, count: int, score: Score) -> torch.Tensor:
    """Per-channel importance from accumulated statistics.

    ``held``: (channels,) sum of squares (``l2``) or sum of ``|a|`` (``mean_abs``) over ``count``
    tokens.
    """
    return held.sqrt() if score == "l2" else held / max(count, 1)


def _accumulate(held: torch.Tensor | None, inputs: torch.Tensor, score: Score) -> torch.Tensor:
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)  # (tokens, channels)
    part = x.square().sum(dim=0) if score == "l2" else x.abs().sum(dim=0)
    return part if held is None else held + part


def group_scores(
    channel: torch.Tensor, num_heads: int, group_size: int, score: Score
) -> torch.Tensor:
    """Importance of each key/value group from per-channel statistics of ``o_proj``'s input.

    ``channel``: (num_heads * head_dim,) sums as in :func:`channel_scores`; a query head's score
    is the norm (``l2``) or mean absolute value (``mean_abs``) of its whole output; a group sums
    its ``group_size`` query heads. Returns (num_heads / group_size,).
    """
    per_head = channel.reshape(num_heads, -1).sum(dim=1)  # (num_heads,)
    if score == "l2":
        per_head = per_head.sqrt()
    return per_head.reshape(-1, group_size).sum(dim=1)


def block_influence(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of ``1 - cos(h_in, h_out)`` and the token count (ShortGPT's BI)."""
    a = hidden_in.reshape(-1, hidden_in.shape[-1]).to(torch.float32)
    b = hidden_out.reshape(-1, hidden_out.shape[-1]).to(torch.float32)
    cos = nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return float((1 - cos).sum()), int(a.shape[0])


def removed_count(total: int, fraction: float | None, count: int | None) -> int:
    """How many of ``total`` structures go: ``count``, or ``fraction`` rounded to nearest."""
    if count is not None:
        return count
    assert fraction is not None  # the config requires one of them
    return round(fraction * total)


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new Linear with only the output rows ``index`` (and their bias entries)."""
    return _sliced(linear, linear.weight.detach()[index], None if linear.bias is None else index)


def keep_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new Linear with only the input columns ``index`` (the bias is kept whole)."""
    return _sliced(linear, linear.weight.detach()[:, index], slice(None))


def _sliced(linear: nn.Linear, weight: torch.Tensor, bias_index: Any) -> nn.Linear:
    out_features, in_features = weight.shape
    new = nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[bias_index])
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None and linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def _head_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads of the kept ``groups`` (each ``per_group`` heads wide)."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)[None, :]).reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


# ------------------------------------------------------------------------------- orchestration


def prune_structured(
    model: nn.Module,
    structure: Structure,
    context: PassContext,
    *,
    fraction: float | None,
    count: int | None,
    score: Score,
    batch_size: int,
) -> PassReport:
    """Remove ``structure`` from ``model`` in place (see the module docstring)."""
    _refuse(model, structure, context)
    layout = layout_of(model)
    _check_layout(model, layout, structure)
    _, blocks = decoder_layers(model)
    total = {
        "heads": layout.attention.num_kv_heads,
        "channels": layout.mlp.intermediate_size,
        "layers": len(blocks),
    }[structure]
    removed = removed_count(total, fraction, count)
    amount = f"remove {count}" if count is not None else f"sparsity {fraction}"
    if removed >= total:
        raise PassError(
            f"prune: structure {structure} with {amount} removes {removed} of {total} "
            f"{_WHAT[structure]}, leaving none",
            hint=f"remove fewer than {total} {_WHAT[structure]}",
        )
    if removed <= 0:
        raise PassError(
            f"prune: structure {structure} with {amount} removes none of the {total} "
            f"{_WHAT[structure]} (rounded to 0)",
            hint=f"a sparsity of at least {0.5 / total:.3g}, or remove: 1",
        )
    calibration = context.require_calibration(f"prune (structure {structure})")
    report = PassReport(name="prune")
    before = _count(model)
    decoder_before = _count(blocks)

    if structure == "layers":
        _prune_layers(model, layout, blocks, calibration, removed, batch_size, context, report)
    else:
        _prune_widths(model, layout, structure, calibration, removed, score, batch_size, context,
                      report)  # fmt: skip

    report.metrics.update(
        parameters_before=float(before),
        parameters_after=float(_count(model)),
        decoder_parameters_before=float(decoder_before),
        decoder_parameters_after=float(_count(blocks)),
        decoder_fraction_removed=1 - _count(blocks) / decoder_before,
        removed=float(removed),
        of=float(total),
        calibration_tokens=float(calibration.numel()),
    )
    return report


def _refuse(model: nn.Module, structure: str, context: PassContext) -> None:
    if getattr(context.layers, "offloaded", False):
        raise PassError(
            f"prune: structure {structure} cannot run on an offloaded model (the layer store "
            "keeps layers of fixed shape on disk)",
            hint="run without --offload, or prune in a run of its own and offload the next one",
        )
    prefix, blocks = decoder_layers(model)
    for name, module in blocks.named_modules():
        if get_quantized(module) is not None:
            raise PassError(
                f"prune: layer {prefix}.{name} is already quantized; structure {structure} "
                "cannot remove parts of quantized codes",
                hint="put the prune pass before rtn/gptq in the recipe",
            )


def _check_layout(model: nn.Module, layout: Layout, structure: str) -> None:
    attention, mlp = layout.attention, layout.mlp
    if structure == "heads" and attention.qkv is not None:
        raise PassError(
            f"prune: structure heads needs separate q/k/v projections, but "
            f"{layout.qualified(0, attention.qkv)} is fused ({layout.family})",
            hint="head removal supports the q_proj/k_proj/v_proj/o_proj layout; "
            "try structure: channels or layers",
        )
    if structure == "channels" and mlp.gate_up is not None:
        raise PassError(
            f"prune: structure channels needs separate gate/up projections, but "
            f"{layout.qualified(0, mlp.gate_up)} is fused ({layout.family})",
            hint="channel removal supports the gate_proj/up_proj/down_proj layout; "
            "try structure: layers",
        )
    if structure == "heads" and attention.num_heads % attention.num_kv_heads:
        raise PassError(
            f"prune: {attention.num_heads} query heads do not split into "
            f"{attention.num_kv_heads} key/value groups",
            hint="structure heads needs num_attention_heads divisible by num_key_value_heads",
        )


def _prune_widths(
    model: nn.Module,
    layout: Layout,
    structure: str,
    calibration: torch.Tensor,
    removed: int,
    score: Score,
    batch_size: int,
    context: PassContext,
    report: PassReport,
) -> None:
    attention, mlp = layout.attention, layout.mlp
    reader = attention.o if structure == "heads" else mlp.down

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        module = layer.get_submodule(reader)
        held: list[torch.Tensor | None] = [None]
        tokens = [0]

        def collect(_: str, inputs: torch.Tensor) -> None:
            held[0] = _accumulate(held[0], inputs, score)
            tokens[0] += inputs.numel() // inputs.shape[-1]

        with capture_inputs({reader: module}, collect):
            run()
        if held[0] is None:
            raise PassError(f"prune: layer {layer_name} saw no calibration input")
        if structure == "heads":
            scores = group_scores(held[0], attention.num_heads, attention.group_size, score)
            scores = scores / max(tokens[0], 1) if score == "mean_abs" else scores
            kept = _top(scores, len(scores) - removed)
            _keep_groups(layer, layout, kept)
            report.per_module[layer_name] = {
                "kv_groups_removed": float(removed),
                "kv_groups_kept": float(len(kept)),
                "heads_removed": float(removed * attention.group_size),
                "heads_kept": float(len(kept) * attention.group_size),
                "kept_score_share": float(scores[kept].sum() / scores.sum().clamp_min(1e-30)),
            }
        else:
            scores = channel_scores(held[0], tokens[0], score)
            kept = _top(scores, len(scores) - removed)
            _keep_channels(layer, layout, kept)
            report.per_module[layer_name] = {
                "channels_removed": float(removed),
                "channels_kept": float(len(kept)),
                "kept_score_share": float(scores[kept].sum() / scores.sum().clamp_min(1e-30)),
            }
        report.touched.append(layer_name)

    run_sequential(
        model,
        calibration,
        step,
        batch_size=batch_size,
        description=f"prune {structure}",
        progress=context.progress,
    )
    config: Any = model.config
    if structure == "heads":
        kept_groups = attention.num_kv_heads - removed
        updates = {
            "num_attention_heads": kept_groups * attention.group_size,
            "num_key_value_heads": kept_groups,
            "head_dim": attention.head_dim,
        }
    else:
        updates = {"intermediate_size": mlp.intermediate_size - removed}
    _patch_config(model, config, updates)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in ascending index order (ties: lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values


def _keep_groups(layer: nn.Module, layout: Layout, groups: torch.Tensor) -> None:
    attention = layout.attention
    assert attention.q and attention.k and attention.v  # checked by _check_layout
    q_rows = _head_rows(groups, attention.group_size, attention.head_dim)
    kv_rows = _head_rows(groups, 1, attention.head_dim)
    _replace(layer, attention.q, keep_rows(_linear(layer, attention.q), q_rows))
    _replace(layer, attention.k, keep_rows(_linear(layer, attention.k), kv_rows))
    _replace(layer, attention.v, keep_rows(_linear(layer, attention.v), kv_rows))
    _replace(layer, attention.o, keep_columns(_linear(layer, attention.o), q_rows))
    owner = layer.get_submodule(attention.o.rpartition(".")[0])
    for name, value in (
        ("num_heads", len(groups) * attention.group_size),
        ("num_attention_heads", len(groups) * attention.group_size),
        ("num_key_value_heads", len(groups)),
    ):
        if isinstance(getattr(owner, name, None), int):  # older attention classes keep counts
            setattr(owner, name, value)


def _keep_channels(layer: nn.Module, layout: Layout, channels: torch.Tensor) -> None:
    mlp = layout.mlp
    assert mlp.gate and mlp.up  # checked by _check_layout
    _replace(layer, mlp.gate, keep_rows(_linear(layer, mlp.gate), channels))
    _replace(layer, mlp.up, keep_rows(_linear(layer, mlp.up), channels))
    _replace(layer, mlp.down, keep_columns(_linear(layer, mlp.down), channels))
    owner = layer.get_submodule(mlp.down.rpartition(".")[0])
    if isinstance(getattr(owner, "intermediate_size", None), int):
        setattr(owner, "intermediate_size", len(channels))  # noqa: B010


def _prune_layers(
    model: nn.Module,
    layout: Layout,
    blocks: nn.ModuleList,
    calibration: torch.Tensor,
    removed: int,
    batch_size: int,
    context: PassContext,
    report: PassReport,
) -> None:
    sums: dict[int, tuple[float, int]] = {}

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        total = [0.0, 0]

        def seen(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
            part, tokens = block_influence(hidden_in, hidden_out)
            total[0] += part
            total[1] += tokens

        with _block_io(layer, seen):
            run()
        sums[index] = (float(total[0]), int(total[1]))

    run_sequential(
        model,
        calibration,
        step,
        batch_size=batch_size,
        description="score layers",
        progress=context.progress,
    )
    influence = torch.tensor([sums[i][0] / max(sums[i][1], 1) for i in range(len(blocks))])
    drop = set(_top(-influence, removed).tolist())
    for index in range(len(blocks)):
        report.per_module[layout.layer_name(index)] = {
            "block_influence": float(influence[index]),
            "removed": float(index in drop),
        }
        if index in drop:
            report.touched.append(layout.layer_name(index))
    config: Any = model.config
    kept = [i for i in range(len(blocks)) if i not in drop]
    for index in sorted(drop, reverse=True):
        del blocks[index]  # in place: the pipeline's layer store holds this very list
    for new_index, layer in enumerate(blocks):
        for module in layer.modules():  # the KV cache is indexed by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_index)  # noqa: B010
    updates: dict[str, Any] = {"num_hidden_layers": len(blocks)}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == len(kept) + len(drop):
        updates["layer_types"] = [layer_types[i] for i in kept]
    _patch_config(model, config, updates)


@contextlib.contextmanager
def _block_io(
    layer: nn.Module, seen: Callable[[torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``seen(hidden_in, hidden_out)`` on every forward of ``layer``; the hook is removed
    on exit, errors included."""

    def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden_out = output[0] if isinstance(output, tuple) else output
        seen(args[0].detach(), hidden_out.detach())

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _patch_config(model: nn.Module, config: Any, updates: dict[str, Any]) -> None:
    """Change the in-memory config and record the change for the export's ``config.json``."""
    for key, value in updates.items():
        setattr(config, key, value)
    held = get(model, ConfigPatch)
    attach(model, ConfigPatch({**(held.updates if held else {}), **updates}))


def _linear(layer: nn.Module, relative: str) -> nn.Linear:
    module = layer.get_submodule(relative)
    if not isinstance(module, nn.Linear):
        raise PassError(
            f"prune: {relative} is a {type(module).__name__}, expected nn.Linear",
            hint="structured pruning runs before passes that replace Linears",
        )
    return module


def _replace(layer: nn.Module, relative: str, module: nn.Module) -> None:
    owner, _, leaf = relative.rpartition(".")
    setattr(layer.get_submodule(owner) if owner else layer, leaf, module)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
