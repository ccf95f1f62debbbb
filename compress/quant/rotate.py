"""Rotation of the residual stream and of the attention values, fused into the weights (QuaRot).

Outlier channels make a few input columns of every Linear much larger than the rest, and a
group's scale follows its largest value, so the others are rounded coarsely. An orthogonal ``Q``
spreads each outlier over all channels. A decoder computes the same function with a rotated
residual stream ``x' = Qᵀ x`` once every norm's scale is folded into the Linears that read it
(RMSNorm only divides by the norm, which ``Q`` keeps), every Linear that reads the stream
becomes ``W Q``, every Linear that writes it ``Qᵀ W`` (bias ``Qᵀ b``), the embedding ``E Q`` and
the output head ``W Q``. Per head, the values may be rotated too: ``v_proj`` rows become
``Rᵀ W`` per head and ``o_proj``'s columns ``W R``. Nothing runs at inference time; the export is
an ordinary model with other weights. The quantization pass that follows (``rtn``, ``gptq``,
``awq``) sees weights without outlier columns.

``online_down: true`` adds the one transform that cannot be fused: the MLP's intermediate
activation (``act(gate x) * up x``) has outlier channels of its own, and no weight before
``down_proj`` can rotate it (the product is elementwise). ``down_proj``'s weight becomes
``W Hᵀ`` and a Hadamard transform of its input runs at inference time
(:func:`~compress.utils.hadamard.hadamard_transform`, ``n·Σfᵢ`` multiply-adds: 215k per token for
SmolLM2's 1536 = 128·12, against 885k for ``down_proj`` itself). The modules are listed in the
model's config (``compress_online_hadamard``) and our export loader installs the transform.

``method: hadamard`` (default) uses a Hadamard matrix with random signs (orders from
:mod:`compress.utils.hadamard`: SmolLM2's 576 = 8·72); ``random_orthogonal`` a Haar-random
one, for any width. Tied embeddings are untied (the output head folds the final norm's scale);
the report says so. Families whose blocks normalise their output before the residual add (Gemma's
post-norms) are not rotation-invariant without an online transform, and are refused.

Example recipe entry (before the quantization pass)::

    passes:
      - {pass: rotate, method: hadamard, seed: 0}
      - {pass: gptq, bits: 3, group_size: 64, symmetric: false, act_order: true}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.ir import (
    ConfigPatch,
    Permutation,
    Rotation,
    attach,
    get,
    records,
)
from compress.layouts import Layout, layout_of
from compress.quant.basis import decoder_linear, require_whole_float_model
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.utils.activations import ACTIVATION_QUANT_KEY
from compress.utils.hadamard import (
    ONLINE_HADAMARD_KEY,
    hadamard_transform,
    has_hadamard,
    install_online_hadamard,
    prebuild,
    random_orthogonal,
    randomized_hadamard,
)
from compress.utils.modules import untie_

__all__ = ["RotateConfig", "rotate", "rotation_matrix"]


class RotateConfig(PassConfig):
    """Settings of the ``rotate`` pass."""

    method: Literal["hadamard", "random_orthogonal"] = Field(
        default="hadamard",
        description="hadamard: a Hadamard matrix with random signs; random_orthogonal: any width",
    )
    seed: int = Field(default=0, ge=0, description="seed of the random signs / matrix")
    values: bool = Field(
        default=True, description="also rotate each head's values (v_proj rows, o_proj columns)"
    )
    online_down: bool = Field(
        default=False,
        description="also a Hadamard transform of each down_proj's input, run online at "
        "inference (its weight holds W Hᵀ): rotates the MLP activation's outliers",
    )


def rotation_matrix(method: str, size: int, seed: int) -> torch.Tensor:
    """The ``size``×``size`` orthogonal matrix of ``method`` (float64)."""
    if method == "hadamard":
        return randomized_hadamard(size, seed)
    return random_orthogonal(size, seed)


def _check_supported(model: nn.Module, layout: Layout, config: RotateConfig) -> None:
    if layout.norm_kind != "rms" or layout.output_norms:
        raise PassError(
            f"rotate: {layout.family} normalises each block's output before the residual add "
            f"({', '.join(layout.output_norms) or layout.norm_kind}); a fused rotation of the "
            "residual stream does not commute with that",
            hint="leave rotate out for this family (Llama, Mistral, Qwen2/3 and Phi-3 work)",
        )
    require_whole_float_model(model, "rotate", "a rotation", "changes")
    if getattr(getattr(model, "config", None), ACTIVATION_QUANT_KEY, None):
        raise PassError(
            "rotate after act_quant: the activations would be quantized before they are "
            "rotated, and the export's loader installs the two the other way round",
            hint="put act_quant after rotate",
        )
    if next(records(model, Permutation), None) is not None:
        raise PassError(
            "rotate after rearrange: the channels were sorted so outliers share blocks, and a "
            "rotation would mix them over all channels again",
            hint="use one of rotate and rearrange",
        )
    width = layout.mlp.intermediate_size
    if config.online_down and not has_hadamard(width):
        raise PassError(
            f"rotate: online_down needs a Hadamard matrix of the MLP width {width}, which "
            "has no construction here (orders 1, 2, and multiples of 4 built from 2s and Paley "
            "blocks)",
            hint="set online_down: false for this model",
        )
    if config.online_down and getattr(model.config, ONLINE_HADAMARD_KEY, None):
        raise PassError(
            "rotate: the model already transforms its down_proj inputs online (an earlier "
            "rotate pass with online_down)",
            hint="keep one rotate pass in the recipe",
        )


def _set(parameter: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    parameter.data.copy_(value.to(parameter.dtype))


def _weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise PassError(f"rotate: {type(module).__name__} has no weight tensor")
    return weight


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``W · diag(g)`` for each reader and ``g = 1``: the norm then only divides by the rms."""
    scale = _weight(norm).detach().double()
    for linear in readers:
        _set(linear.weight, linear.weight.detach().double() * scale[None, :])
    _set(_weight(norm), torch.ones_like(scale))


def _read_rotated(module: nn.Module, q: torch.Tensor) -> None:
    """A Linear reading the rotated stream (``W Q``), or the embedding writing it (``E Q``)."""
    weight = _weight(module)
    _set(weight, weight.detach().double() @ q)


def _write_rotated(linear: nn.Linear, q: torch.Tensor) -> None:
    _set(linear.weight, q.T @ linear.weight.detach().double())
    if linear.bias is not None:
        _set(linear.bias, q.T @ linear.bias.detach().double())


def _rotate_values(v_proj: nn.Linear, o_proj: nn.Linear, r: torch.Tensor, heads: int) -> None:
    """Per head: values ``Rᵀ v`` (v_proj rows, bias), o_proj's columns of the head ``· R``."""
    d = r.shape[0]
    weight = v_proj.weight.detach().double()
    kv_heads = weight.shape[0] // d
    rotated = torch.einsum("ji,hjk->hik", r, weight.view(kv_heads, d, -1))
    _set(v_proj.weight, rotated.reshape(weight.shape))
    if v_proj.bias is not None:
        bias = v_proj.bias.detach().double().view(kv_heads, d)
        _set(v_proj.bias, (bias @ r).reshape(-1))
    out = o_proj.weight.detach().double()
    _set(o_proj.weight, (out.view(out.shape[0], heads, d) @ r).reshape(out.shape))


@register_pass("rotate", RotateConfig)
def rotate(model: nn.Module, config: RotateConfig, context: PassContext) -> PassReport:
    """Fuse an orthogonal rotation of the residual stream (and per-head values) into the
    weights: the same function, weights without outlier channels."""
    layout = layout_of(model)
    _check_supported(model, layout, config)
    modules = dict(model.named_modules())
    attention, mlp = layout.attention, layout.mlp
    report = PassReport(name="rotate")
    if layout.tied_embeddings or modules[layout.lm_head].weight is modules[layout.embedding].weight:
        lm_head = modules[layout.lm_head]
        assert isinstance(lm_head, nn.Linear)
        report.notes += untie_(model, {layout.lm_head: lm_head})
    q = rotation_matrix(config.method, layout.hidden_size, config.seed)
    touched: list[tuple[str, str]] = []  # (module, the axis the rotation is fused into)
    online: list[str] = []  # down_proj modules whose input is transformed at run time

    def linear(name: str) -> nn.Linear:
        return decoder_linear(modules, name, "rotate")

    with torch.no_grad():
        for index in context.progress.track(range(layout.num_layers), "rotate layers"):
            at = layout.qualified
            for norm, readers in (
                (layout.attention_norm, attention.readers()),
                (layout.mlp_norm, mlp.readers()),
            ):
                linears = [linear(at(index, r)) for r in readers]
                _fold_norm(modules[at(index, norm)], linears)
                for name, module in zip(readers, linears, strict=True):
                    _read_rotated(module, q)
                    touched.append((at(index, name), "in"))
            for name in layout.residual_writers():
                _write_rotated(linear(at(index, name)), q)
                touched.append((at(index, name), "out"))
            if config.values and attention.v is not None:
                # one seed per layer; not a record of its own (a module holds one rotation
                # record: the residual one), the report notes it
                r = rotation_matrix(config.method, attention.head_dim, config.seed + 1 + index)
                v_proj, o_proj = linear(at(index, attention.v)), linear(at(index, attention.o))
                _rotate_values(v_proj, o_proj, r, attention.num_heads)
            if config.online_down:
                down = linear(at(index, mlp.down))
                _set(down.weight, hadamard_transform(down.weight.detach().double()))  # W Hᵀ
                install_online_hadamard(down)
                online.append(at(index, mlp.down))
        lm_head = linear(layout.lm_head)
        _fold_norm(modules[layout.final_norm], [lm_head])
        _read_rotated(lm_head, q)
        _read_rotated(modules[layout.embedding], q)  # its rows are residual vectors: E Q
        touched += [(layout.lm_head, "in"), (layout.embedding, "out")]
    for name, axis in touched:
        attach(modules[name], Rotation(config.method, layout.hidden_size, axis, True, config.seed))
    if online:
        prebuild()  # the native transform compiles while the next pass calibrates
        spec = {"method": "hadamard", "modules": online}
        held = get(model, ConfigPatch)
        attach(model, ConfigPatch({**(held.updates if held else {}), ONLINE_HADAMARD_KEY: spec}))
        setattr(model.config, ONLINE_HADAMARD_KEY, spec)  # the in-memory config says it too
        report.notes.append(
            f"online Hadamard transform of {len(online)} down_proj inputs (order "
            f"{mlp.intermediate_size}); the export's loader installs it"
        )
    report.touched = [name for name, _ in touched]
    report.metrics = {"hidden_size": float(layout.hidden_size)}
    report.notes.append(
        f"residual stream rotated ({config.method}, order {layout.hidden_size}, seed "
        f"{config.seed})"
        + (f"; values per head (order {attention.head_dim})" if config.values else "")
    )
    return report
