"""Where things are inside a decoder of each supported family, in one place.

Passes that change several modules together ask this module, never hard-code names: activation
scaling (AWQ, SmoothQuant) needs the op that produces a Linear's input, so that a per-channel
scale can be folded into it; rotations and channel rearrangement need every module that reads or
writes the residual stream, the attention heads and RoPE's dimension pairs; structured pruning
needs the heads, key/value groups and MLP channels that must go together.

A :class:`Layout` names modules relative to a decoder layer (``self_attn.q_proj``) or to the
model (``model.embed_tokens``). :func:`layout_of` builds one from a loaded model: the family is
read from ``config.model_type``, and any model whose decoder layers carry the Llama names is
accepted as Llama-like (most of the Hugging Face zoo).

Supported: Llama, Mistral, Qwen2, Qwen3 (per-head q/k norms), Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), Gemma 2 and Gemma 3 (four norms per layer, norms that scale by ``1 + w``,
GeGLU, scaled embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from compress.errors import PassError
from compress.utils.modules import decoder_layers

__all__ = [
    "Attention",
    "Layout",
    "Mlp",
    "ScaleGroup",
    "layout_of",
    "rope_pairs",
    "supported_families",
]

NormKind = Literal["rms", "rms_one_plus"]
"""``rms``: ``x / rms(x) * w`` (Llama); ``rms_one_plus``: ``x / rms(x) * (1 + w)`` (Gemma)."""


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and the op that produces it.

    A per-input-channel scale ``s`` of the linears can be folded into ``source``: multiply the
    linears' input columns by ``s`` and divide ``source``'s output channels by ``s`` (a norm's
    weight, or a Linear's output rows ``source_rows`` of a fused projection), and the layer
    computes the same function.
    """

    source: str
    linears: tuple[str, ...]
    source_kind: Literal["norm", "linear"]
    source_rows: tuple[int, int] | None = None
    """For a fused producer (Phi-3's ``gate_up_proj``): the half of its output rows that is
    the input of ``linears``; ``None``: all of them."""


@dataclass(frozen=True)
class Attention:
    """Attention projections of a decoder layer and the head geometry."""

    q: str | None  # None when fused into ``qkv``
    k: str | None
    v: str | None
    o: str
    qkv: str | None  # fused q|k|v rows (Phi-3), else None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    """Leading dimensions of each head that RoPE rotates (the whole head unless partial)."""
    q_norm: str | None = None  # per-head RMSNorm after the projection (Qwen3, Gemma 3)
    k_norm: str | None = None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def readers(self) -> tuple[str, ...]:
        """The projections that read the attention input."""
        return (self.qkv,) if self.qkv else tuple(n for n in (self.q, self.k, self.v) if n)


@dataclass(frozen=True)
class Mlp:
    """The gated MLP of a decoder layer: ``down(act(gate(x)) * up(x))``."""

    gate: str | None  # None when fused into ``gate_up``
    up: str | None
    down: str
    gate_up: str | None  # fused [gate; up] rows (Phi-3), else None
    intermediate_size: int
    activation: str

    def readers(self) -> tuple[str, ...]:
        return (self.gate_up,) if self.gate_up else tuple(n for n in (self.gate, self.up) if n)


@dataclass(frozen=True)
class Layout:
    """One family's decoder structure, names relative to a decoder layer unless noted."""

    family: str
    layers: str  # qualified name of the decoder layers' ModuleList
    num_layers: int
    hidden_size: int
    embedding: str  # qualified
    lm_head: str  # qualified
    final_norm: str  # qualified
    tied_embeddings: bool
    norm_kind: NormKind
    attention: Attention
    mlp: Mlp
    attention_norm: str  # the norm whose output the attention reads
    mlp_norm: str  # the norm whose output the MLP reads
    output_norms: tuple[str, ...] = ()
    """Norms applied to a block's output before the residual add (Gemma's post norms)."""
    embedding_scale: float | None = None
    """Factor the embedding module applies to looked-up rows (Gemma: sqrt(hidden))."""
    scale_groups: tuple[ScaleGroup, ...] = field(default=())

    def layer_name(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def qualified(self, index: int, relative: str) -> str:
        return f"{self.layers}.{index}.{relative}"

    def linears(self) -> tuple[str, ...]:
        """Every Linear of a decoder layer, in execution order."""
        attention = self.attention
        return (*attention.readers(), attention.o, *self.mlp.readers(), self.mlp.down)

    def residual_readers(self) -> tuple[str, ...]:
        """Norms that read the residual stream inside a layer (a rotation of the stream must
        be undone in their consumers)."""
        return (self.attention_norm, self.mlp_norm)

    def residual_writers(self) -> tuple[str, ...]:
        """Linears whose output is added to the residual stream (after ``output_norms``)."""
        return (self.attention.o, self.mlp.down)


def rope_pairs(rotary_dim: int) -> list[tuple[int, int]]:
    """Dimension pairs ``(i, i + rotary_dim/2)`` that RoPE rotates together in a head.

    Hugging Face's ``rotate_half`` convention, used by every family here: a permutation of head
    dimensions commutes with RoPE only if it moves both members of a pair alike.
    """
    half = rotary_dim // 2
    return [(i, i + half) for i in range(half)]


# ----------------------------------------------------------------------------------- families


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _geometry(config: Any) -> tuple[int, int, int, int, int]:
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(_config_value(config, "num_key_value_heads", default=heads))
    head_dim = int(_config_value(config, "head_dim", default=hidden // heads))
    partial = float(_config_value(config, "partial_rotary_factor", default=1.0))
    return hidden, heads, kv_heads, head_dim, int(head_dim * partial)


def _llama_like(model: nn.Module, family: str, *, qk_norm: bool = False) -> Layout:
    config: Any = getattr(model, "config", None)
    prefix, blocks = decoder_layers(model)
    hidden, heads, kv_heads, head_dim, rotary = _geometry(config)
    attention = Attention(
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.o_proj",
        qkv=None,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary,
        q_norm="self_attn.q_norm" if qk_norm else None,
        k_norm="self_attn.k_norm" if qk_norm else None,
    )
    mlp = Mlp(
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
        gate_up=None,
        intermediate_size=int(config.intermediate_size),
        activation=str(_config_value(config, "hidden_act", "hidden_activation", default="silu")),
    )
    groups = (
        ScaleGroup("input_layernorm", attention.readers(), "norm"),
        # with grouped-query attention a value channel feeds several o_proj inputs: a pass
        # checks the widths and skips this group then
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        ScaleGroup("post_attention_layernorm", mlp.readers(), "norm"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    )
    base = prefix.rpartition(".")[0]
    return Layout(
        family=family,
        layers=prefix,
        num_layers=len(blocks),
        hidden_size=hidden,
        embedding=f"{base}.embed_tokens" if base else "embed_tokens",
        lm_head="lm_head",
        final_norm=f"{base}.norm" if base else "norm",
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        norm_kind="rms",
        attention=attention,
        mlp=mlp,
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        scale_groups=groups,
    )


def _phi3(model: nn.Module, family: str) -> Layout:
    llama = _llama_like(model, family)
    intermediate = llama.mlp.intermediate_size
    attention = Attention(
        q=None,
        k=None,
        v=None,
        o="self_attn.o_proj",
        qkv="self_attn.qkv_proj",
        num_heads=llama.attention.num_heads,
        num_kv_heads=llama.attention.num_kv_heads,
        head_dim=llama.attention.head_dim,
        rotary_dim=llama.attention.rotary_dim,
    )
    mlp = Mlp(
        gate=None,
        up=None,
        down="mlp.down_proj",
        gate_up="mlp.gate_up_proj",
        intermediate_size=intermediate,
        activation=llama.mlp.activation,
    )
    q_rows = attention.num_heads * attention.head_dim
    kv_rows = attention.num_kv_heads * attention.head_dim
    groups = (
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "norm"),
        # the value rows of the fused projection feed o_proj
        ScaleGroup(
            "self_attn.qkv_proj",
            ("self_attn.o_proj",),
            "linear",
            (q_rows + kv_rows, q_rows + 2 * kv_rows),
        ),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "norm"),
        # gate_up's rows are [gate; up]: only the up half multiplies into down's input
        ScaleGroup(
            "mlp.gate_up_proj", ("mlp.down_proj",), "linear", (intermediate, 2 * intermediate)
        ),
    )
    return replace(llama, attention=attention, mlp=mlp, scale_groups=groups)


def _gemma(model: nn.Module, family: str, *, qk_norm: bool) -> Layout:
    llama = _llama_like(model, family, qk_norm=qk_norm)
    groups = (
        ScaleGroup("input_layernorm", llama.attention.readers(), "norm"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "linear"),
        ScaleGroup("pre_feedforward_layernorm", llama.mlp.readers(), "norm"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "linear"),
    )
    return replace(
        llama,
        norm_kind="rms_one_plus",
        mlp_norm="pre_feedforward_layernorm",
        output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        embedding_scale=float(llama.hidden_size) ** 0.5,
        scale_groups=groups,
    )


_FAMILIES: dict[str, Callable[[nn.Module, str], Layout]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": lambda model, family: _llama_like(model, family, qk_norm=True),
    "phi3": _phi3,
    "gemma2": lambda model, family: _gemma(model, family, qk_norm=False),
    "gemma3_text": lambda model, family: _gemma(model, family, qk_norm=True),
}


def supported_families() -> list[str]:
    """``config.model_type`` values with a known layout (others must look like Llama)."""
    return sorted(_FAMILIES)


def layout_of(model: nn.Module) -> Layout:
    """The layout of ``model``; checked against its modules, so a mismatch fails here, early.

    Unknown families are accepted when their decoder layers carry Llama's module names.
    """
    config = getattr(model, "config", None)
    family = str(getattr(config, "model_type", "") or "")
    if config is None:
        raise PassError(
            f"{type(model).__name__} has no Hugging Face config: its layout is unknown",
            hint="load the model with transformers' AutoModelForCausalLM",
        )
    known = family in _FAMILIES
    if not known:  # Llama-like? the names first: an alien config lacks the fields read below
        _check_llama_names(model, family)
    build = _FAMILIES.get(family, _llama_like)
    layout = build(model, family or type(model).__name__)
    _check(model, layout, known=known)
    return layout


_LLAMA_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                "post_attention_layernorm")  # fmt: skip


def _check_llama_names(model: nn.Module, family: str) -> None:
    prefix, blocks = decoder_layers(model)
    names = {name for name, _ in blocks[0].named_modules()}
    missing = next((n for n in _LLAMA_NAMES if n not in names), None)
    if missing is not None:
        raise PassError(
            f"{type(model).__name__} ({family or 'unknown family'}): decoder layer 0 "
            f"({prefix}.0, {type(blocks[0]).__name__}) has no module {missing!r}",
            hint=f"compress knows the layouts of {', '.join(supported_families())} and of "
            "Llama-like models (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)",
        )


def _check(model: nn.Module, layout: Layout, *, known: bool) -> None:
    modules = dict(model.named_modules())
    expected = [
        *layout.linears(),
        layout.attention_norm,
        layout.mlp_norm,
        *layout.output_norms,
        *(n for n in (layout.attention.q_norm, layout.attention.k_norm) if n),
    ]
    for index in range(layout.num_layers):
        for relative in expected:
            name = layout.qualified(index, relative)
            if name not in modules:
                families = ", ".join(supported_families())
                raise PassError(
                    f"{type(model).__name__} ({layout.family or 'unknown family'}): decoder "
                    f"layer {index} has no module {relative!r}",
                    hint=(
                        "its layout differs from the one compress knows for this family"
                        if known
                        else f"compress knows the layouts of {families} and of Llama-like "
                        "models (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)"
                    ),
                )
            if relative in layout.linears() and not isinstance(modules[name], nn.Linear):
                raise PassError(
                    f"{name} is a {type(modules[name]).__name__}, expected nn.Linear",
                    hint="quantized or otherwise replaced modules have no layout; run layout-"
                    "aware passes before quantization",
                )
