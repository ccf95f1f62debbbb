"""Outlier channel rearrangement, fused into the weights ("Accurate Block Quantization in LLMs
with Outliers": sort channels so that outliers share blocks).

A block format (int with groups, MX, NVFP4, NF4, BFP) gives each block of consecutive input
columns one scale, set by its largest value. Outlier columns scattered over many blocks inflate
the scale of each of those blocks, and every ordinary column in them is rounded coarsely.
Sorting the input channels of a weight by magnitude puts the outliers in a few blocks of their
own, and the other blocks get scales that fit them.

The order of a channel is free wherever every module that reads or writes it is permuted alike;
then the model computes the same function, and nothing runs at inference time:

- ``mlp``: the intermediate channels (gate/up rows, down_proj's columns), scored by down_proj's
  column norms;
- ``values``: each key/value head's dimensions (v_proj's rows of the head, o_proj's columns of
  every query head that reads it), scored by o_proj's column norms;
- ``residual``: the hidden channels of the whole model (embedding columns, every norm, the
  columns of every Linear that reads the stream and the rows of every one that writes it, the
  output head's columns), scored by the summed, normalised column norms of the readers. A tied
  embedding stays tied: its rows are residual vectors and its columns move with the head's.

Query/key head dimensions matter only for a quantized K cache (RoPE pairs them; see
:func:`compress.layouts.rope_pairs`) and are not permuted here.

Every module keeps a :class:`~compress.ir.Permutation` record (rows and/or columns), so a later
pass can put the original model in the same order (``lora_correct`` / ``qwha`` do). The report
gives, per site, the mean "crest" of the weight blocks the quantizer will see (a block's
absolute maximum over its root mean square, for blocks of ``block_size`` columns) before and
after: lower means the scales fit the ordinary values better.

``rotate`` does the same job by mixing channels instead of sorting them; one excludes the other
(refused in either order).

Example recipe entry (before the quantization pass)::

    passes:
      - {pass: rearrange, sites: [mlp, values, residual], block_size: 32}
      - {pass: gptq, format: mxfp4, act_order: true}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.ir import Permutation, Rotation, attach, get, records
from compress.layouts import Layout, layout_of
from compress.quant.basis import decoder_linear, require_whole_float_model
from compress.registry import PassConfig, PassContext, PassReport, register_pass

__all__ = ["RearrangeConfig", "apply_permutation_records", "block_crest", "rearrange"]

Site = Literal["mlp", "values", "residual"]
_SITES: tuple[Site, ...] = ("mlp", "values", "residual")


class RearrangeConfig(PassConfig):
    """Settings of the ``rearrange`` pass."""

    sites: list[Site] = Field(
        default_factory=lambda: list(_SITES),
        min_length=1,
        description="channel sets to sort: mlp (intermediate channels), values (head "
        "dimensions of v/o), residual (hidden channels of the whole model)",
    )
    block_size: int = Field(
        default=32, gt=0, description="columns per block of the target format, for the report"
    )
    order: Literal["magnitude", "random"] = Field(
        default="magnitude",
        description="magnitude: channels by decreasing energy (the method); random: a seeded "
        "random permutation of the same sites, a control that separates what sorting buys from "
        "what any reshuffle of the blocks changes",
    )
    seed: int = Field(default=0, description="seed of order: random")


# ------------------------------------------------------------------------------------ helpers


def block_crest(weight: torch.Tensor, block_size: int) -> float:
    """Mean over blocks of ``block_size`` consecutive columns (per row) of absmax / rms: how far
    the largest value of a block stands above the rest (1 for a flat block)."""
    rows, columns = weight.shape
    usable = columns - columns % block_size
    if usable == 0:
        return 1.0
    blocks = weight[:, :usable].detach().float().reshape(rows, -1, block_size)
    rms = blocks.square().mean(-1).sqrt().clamp_min(1e-12)
    return float((blocks.abs().amax(-1) / rms).mean())


def _descending(score: torch.Tensor) -> torch.Tensor:
    # stable, so equal scores keep their order (a flat score leaves the model untouched)
    return torch.sort(score, descending=True, stable=True).indices


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise PassError(f"rearrange: {name} ({type(module).__name__}) has no weight tensor")
    return weight


def _reorder_(
    module: nn.Module, name: str, rows: torch.Tensor | None, columns: torch.Tensor | None
) -> None:
    weight = _weight(module, name)
    with torch.no_grad():
        if rows is not None:
            weight.copy_(weight[rows.to(weight.device)])
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(bias[rows.to(bias.device)])
        if columns is not None:
            weight.copy_(weight[:, columns.to(weight.device)])


def _permute_(
    module: nn.Module,
    name: str,
    rows: torch.Tensor | None,
    columns: torch.Tensor | None,
    group: str,
) -> None:
    """Reorder ``module``'s weight (and bias rows) in place; merge into its record."""
    _reorder_(module, name, rows, columns)
    held = get(module, Permutation)
    if held is not None:  # compose with an earlier site's order on the same module
        rows = rows if held.rows is None else (held.rows if rows is None else held.rows[rows])
        columns = (
            columns
            if held.columns is None
            else (held.columns if columns is None else held.columns[columns])
        )
        group = ",".join(dict.fromkeys([*held.group.split(","), group]))
    # a tensor of its own per record: checkpoints store records with safetensors, which
    # refuses tensors that share memory
    own = [None if order is None else order.clone() for order in (rows, columns)]
    attach(module, Permutation(own[0], own[1], group))


def apply_permutation_records(source: nn.Module, target: nn.Module) -> list[str]:
    """Put ``target`` (another copy of the model ``source`` came from, e.g. the original) in
    ``source``'s channel order, from ``source``'s records; the names reordered."""
    targets = dict(target.named_modules())
    done: list[str] = []
    seen: set[int] = set()  # a tied weight is one tensor: reordered once
    for name, record in records(source, Permutation):
        module = targets.get(name)
        if module is None:
            raise PassError(f"rearrange: {name} is missing from the model to reorder")
        weight = _weight(module, name)
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        _reorder_(module, name, record.rows, record.columns)
        done.append(name)
    return done


# -------------------------------------------------------------------------------------- sites


class _Model:
    """Name lookups over one model's modules, and the channel order the pass applies."""

    def __init__(self, model: nn.Module, layout: Layout, config: RearrangeConfig) -> None:
        self.modules = dict(model.named_modules())
        self.layout = layout
        self._random = (
            torch.Generator().manual_seed(config.seed) if config.order == "random" else None
        )

    def order(self, score: torch.Tensor) -> torch.Tensor:
        """Channels by decreasing score, or (order: random) a seeded random permutation."""
        if self._random is None:
            return _descending(score)
        return torch.randperm(score.numel(), generator=self._random).to(score.device)

    def linear(self, index: int, relative: str) -> nn.Linear:
        return decoder_linear(self.modules, self.layout.qualified(index, relative), "rearrange")


def _column_energy(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum over matrices of each column's share of the matrix's energy."""
    total: torch.Tensor | None = None
    for weight in weights:
        energy = weight.detach().float().square().sum(0)
        share = energy / energy.sum().clamp_min(1e-30)
        total = share if total is None else total + share.to(total.device)
    assert total is not None
    return total


def _mlp(m: _Model, index: int, block_size: int) -> tuple[float, float]:
    mlp = m.layout.mlp
    down = m.linear(index, mlp.down)
    before = block_crest(down.weight, block_size)
    order = m.order(_column_energy([down.weight]))
    group = m.layout.qualified(index, "mlp")
    if mlp.gate_up:
        fused = torch.cat([order, order + mlp.intermediate_size])
        name = m.layout.qualified(index, mlp.gate_up)
        _permute_(m.linear(index, mlp.gate_up), name, fused, None, group)
    for relative in (mlp.gate, mlp.up):
        if relative:
            name = m.layout.qualified(index, relative)
            _permute_(m.linear(index, relative), name, order, None, group)
    _permute_(down, m.layout.qualified(index, mlp.down), None, order, group)
    return before, block_crest(down.weight, block_size)


def _values(m: _Model, index: int, block_size: int) -> tuple[float, float]:
    attention = m.layout.attention
    d, heads, kv_heads = attention.head_dim, attention.num_heads, attention.num_kv_heads
    o_proj = m.linear(index, attention.o)
    before = block_crest(o_proj.weight, block_size)
    energy = o_proj.weight.detach().float().square().sum(0).view(heads, d)
    energy = energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)
    per_kv = energy.view(kv_heads, heads // kv_heads, d).sum(1)  # query heads of a group
    orders = [m.order(per_kv[g]) for g in range(kv_heads)]
    value_rows = torch.cat([g * d + orders[g] for g in range(kv_heads)])
    group = m.layout.qualified(index, "self_attn.values")
    if attention.qkv:
        offset = (heads + kv_heads) * d  # fused q|k|v rows: v comes last
        qkv = m.linear(index, attention.qkv)
        rows = torch.arange(qkv.out_features)
        rows[offset:] = offset + value_rows
        _permute_(qkv, m.layout.qualified(index, attention.qkv), rows, None, group)
    else:
        assert attention.v is not None
        v_name = m.layout.qualified(index, attention.v)
        _permute_(m.linear(index, attention.v), v_name, value_rows, None, group)
    columns = torch.cat([h * d + orders[h // (heads // kv_heads)] for h in range(heads)])
    _permute_(o_proj, m.layout.qualified(index, attention.o), None, columns, group)
    return before, block_crest(o_proj.weight, block_size)


def _residual(m: _Model, block_size: int) -> tuple[float, float]:
    layout = m.layout
    readers = [
        (m.layout.qualified(i, r), m.linear(i, r))
        for i in range(layout.num_layers)
        for r in (*layout.attention.readers(), *layout.mlp.readers())
    ]
    lm_head = m.modules[layout.lm_head]
    embedding = m.modules[layout.embedding]
    tied = _weight(lm_head, layout.lm_head) is _weight(embedding, layout.embedding)
    scored = [w.weight for _, w in readers] + [_weight(lm_head, layout.lm_head)]
    before = sum(block_crest(w, block_size) for w in scored) / len(scored)
    order = m.order(_column_energy(scored))
    group = "residual"
    for name, linear in readers:
        _permute_(linear, name, None, order, group)
    for i in range(layout.num_layers):
        for relative in layout.residual_writers():
            name = layout.qualified(i, relative)
            _permute_(m.linear(i, relative), name, order, None, group)
        for relative in (*layout.residual_readers(), *layout.output_norms):
            name = layout.qualified(i, relative)
            _permute_(m.modules[name], name, order, None, group)
    _permute_(m.modules[layout.final_norm], layout.final_norm, order, None, group)
    _permute_(embedding, layout.embedding, None, order, group)  # rows are residual vectors
    if not tied:
        _permute_(lm_head, layout.lm_head, None, order, group)
    else:  # one tensor: its columns moved with the embedding's; the record says so
        attach(lm_head, Permutation(None, order.clone(), group))
    after = sum(block_crest(w, block_size) for w in scored) / len(scored)
    return before, after


def _check(model: nn.Module) -> None:
    require_whole_float_model(model, "rearrange", "a new channel order", "reorders")
    if next(records(model, Rotation), None) is not None:
        raise PassError(
            "rearrange after rotate: the rotation already spread the outlier channels over all "
            "of them, so there is nothing left to sort",
            hint="use one of rotate and rearrange",
        )
    if next(records(model, Permutation), None) is not None:
        raise PassError(
            "rearrange twice: the model's channels are already sorted",
            hint="keep one rearrange pass, listing every site in it",
        )


@register_pass("rearrange", RearrangeConfig)
def rearrange(model: nn.Module, config: RearrangeConfig, context: PassContext) -> PassReport:
    """Sort channels so outliers share blocks, fused into the weights: the same function,
    block scales that fit the ordinary values."""
    _check(model)
    layout = layout_of(model)
    m = _Model(model, layout, config)
    report = PassReport(name="rearrange")
    crests: dict[str, list[tuple[float, float]]] = {}
    per_layer = [site for site in config.sites if site != "residual"]
    if per_layer:
        for index in context.progress.track(range(layout.num_layers), "rearrange layers"):
            for layer_site in per_layer:
                step = _mlp if layer_site == "mlp" else _values
                crests.setdefault(layer_site, []).append(step(m, index, config.block_size))
    if "residual" in config.sites:
        crests["residual"] = [_residual(m, config.block_size)]
    for site, pairs in crests.items():
        before = sum(b for b, _ in pairs) / len(pairs)
        after = sum(a for _, a in pairs) / len(pairs)
        report.metrics[f"{site}_block_crest_before"] = before
        report.metrics[f"{site}_block_crest_after"] = after
        report.notes.append(
            f"{site}: mean block crest (absmax / rms over {config.block_size} columns) "
            f"{before:.2f} → {after:.2f}"
        )
    report.touched = [name for name, _ in records(model, Permutation)]
    return report
