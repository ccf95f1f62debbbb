"""What passes leave behind for export: typed records attached to modules.

Passes hand their results to export only through these records; export never imports an
algorithm. One API for every kind: :func:`attach` a record to a module (one record of a kind per
module; the model itself holds model-wide ones such as :class:`EntropyPlan`), :func:`get` it back
by type, :func:`detach` it, and :func:`records` iterates ``(module name, record)`` over a model.

Kinds:

* :class:`QuantizedWeight` — codes, scales, zero points of a weight in a
  :class:`~compress.formats.Format`. A quantization pass also sets the module's dense weight to the
  dequantized values (:func:`set_quantized`), so the in-memory model computes exactly what the
  exported one will.
* :class:`SparsityMask` — which weights a pruning pass zeroed (unstructured or N:M).
* :class:`BitWidth` — the code width a bit-allocation pass chose for a weight.
* :class:`Permutation` — a channel order fused into the weights (channel rearrangement).
* :class:`Rotation` — an orthogonal transform fused into the weights, or applied online.
* :class:`Adapter` — a trainable correction beside a weight (low-rank or Walsh-Hadamard).
* :class:`EntropyPlan` — the model's tensors to entropy-code at export (model-wide).
* :class:`ConfigPatch` — keys of ``config.json`` a pass changed (structured pruning's shapes).

Every record turns into named tensors plus JSON metadata (:meth:`Record.to_state`) and back
(:func:`record_from_state`): offload checkpoints and resume store every kind the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from compress.formats import Format, format_from_dict

__all__ = [
    "Adapter",
    "BitWidth",
    "ConfigPatch",
    "EntropyPlan",
    "Permutation",
    "QuantizedWeight",
    "Record",
    "Rotation",
    "SparsityMask",
    "attach",
    "clear_quantized",
    "detach",
    "get",
    "get_quantized",
    "quantized_modules",
    "record_from_state",
    "record_kinds",
    "records",
    "records_of",
    "set_quantized",
]

_ATTR = "_compress_records"

R = TypeVar("R", bound="Record")

_KINDS: dict[str, type[Record]] = {}


class Record:
    """Base of every IR record: a kind name and a tensors + metadata form."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
                raise ValueError(f"IR record kind {cls.kind!r} is already defined")
            _KINDS[cls.kind] = cls

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Named tensors and JSON-able metadata that :meth:`from_state` rebuilds it from."""
        raise NotImplementedError

    @classmethod
    def from_state(cls: type[R], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> R:
        raise NotImplementedError


def record_kinds() -> dict[str, type[Record]]:
    return dict(_KINDS)


def record_from_state(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Record:
    """The record of ``kind`` that :meth:`Record.to_state` described."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown IR record kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    return cls.from_state(tensors, meta)


# -------------------------------------------------------------------------------------- kinds


@dataclass
class QuantizedWeight(Record):
    """Codes of one Linear (or Embedding) weight in a :class:`~compress.formats.Format`.

    codes:  (out_features, in_features) uint8 (an Embedding's (num_embeddings, dim) alike)
    scales: per group or block, in the format's scale dtype
    zeros:  per group uint8, or None (symmetric and float formats)
    """

    kind: ClassVar[str] = "quantized"

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: Format

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(self.codes, self.scales, self.zeros, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.codes.shape
        return out_features, in_features

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            tensors["zeros"] = self.zeros
        return tensors, {"format": self.fmt.to_dict()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedWeight:
        return cls(
            tensors["codes"],
            tensors["scales"],
            tensors.get("zeros"),
            format_from_dict(meta["format"]),
        )

    def shape_only(self) -> QuantizedWeight:
        """The same record with storage-free (meta) tensors: shape, dtype and format only."""

        def meta(tensor: torch.Tensor) -> torch.Tensor:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")

        zeros = None if self.zeros is None else meta(self.zeros)
        return QuantizedWeight(meta(self.codes), meta(self.scales), zeros, self.fmt)


@dataclass
class SparsityMask(Record):
    """Weights a pruning pass set to zero: ``mask`` is True where a weight is kept.

    ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N kept in every M along the input axis).
    """

    kind: ClassVar[str] = "sparsity"

    mask: torch.Tensor  # (out, in) bool
    pattern: str = "unstructured"

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"mask": self.mask}, {"pattern": self.pattern}

    def n_of_m(self) -> tuple[int, int] | None:
        """``(n, m)`` of an ``"N:M"`` pattern, ``None`` when unstructured."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SparsityMask:
        return cls(tensors["mask"], str(meta.get("pattern", "unstructured")))


@dataclass
class BitWidth(Record):
    """The code width a bit-allocation pass chose for a module's weight; the quantizers that
    follow (``rtn``, ``gptq``) use it in place of their own ``bits``."""

    kind: ClassVar[str] = "bit_width"

    bits: int

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"bits": self.bits}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> BitWidth:
        return cls(int(meta["bits"]))


@dataclass
class Permutation(Record):
    """A channel order fused into a module's weight: ``rows[i]`` is the old index of new row
    ``i`` (output channels; a norm's or bias's only axis), ``columns[i]`` that of new column
    ``i`` (input channels; an embedding's hidden axis). Either may be None (unchanged).

    ``group`` names the set of modules permuted together (the function is unchanged only if all
    of them are); a module in two sets (down_proj: its columns with the MLP, its rows with the
    residual stream) names both, comma-separated.
    """

    kind: ClassVar[str] = "permutation"

    rows: torch.Tensor | None = None  # (out channels,) int64
    columns: torch.Tensor | None = None  # (in channels,) int64
    group: str = ""

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            name: order
            for name, order in (("rows", self.rows), ("columns", self.columns))
            if order is not None
        }
        return tensors, {"group": self.group}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Permutation:
        return cls(tensors.get("rows"), tensors.get("columns"), str(meta.get("group", "")))


@dataclass
class Rotation(Record):
    """An orthogonal transform of a module's input (or output) channels.

    ``fused``: folded into the weights (nothing at run time); otherwise applied online before
    the module (e.g. a fast Walsh-Hadamard transform on a down-projection's input). ``matrix``
    is kept only when the transform has no short description (a learned rotation).
    """

    kind: ClassVar[str] = "rotation"

    method: str  # "hadamard", "random_hadamard", "learned", ...
    size: int
    axis: str = "in"
    fused: bool = True
    seed: int | None = None
    matrix: torch.Tensor | None = None

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {} if self.matrix is None else {"matrix": self.matrix}
        meta = {
            "method": self.method,
            "size": self.size,
            "axis": self.axis,
            "fused": self.fused,
            "seed": self.seed,
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Rotation:
        return cls(
            str(meta["method"]),
            int(meta["size"]),
            str(meta.get("axis", "in")),
            bool(meta.get("fused", True)),
            meta.get("seed"),
            tensors.get("matrix"),
        )


@dataclass
class Adapter(Record):
    """A trainable correction beside a module's weight (LoRA factors, a Walsh-Hadamard
    spectrum, ...): ``method`` names it, ``tensors`` hold its parameters, ``config`` the rest."""

    kind: ClassVar[str] = "adapter"

    method: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        meta = {"method": self.method, "config": self.config, "trainable": self.trainable}
        return dict(self.tensors), meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Adapter:
        return cls(
            str(meta["method"]),
            dict(tensors),
            dict(meta.get("config", {})),
            bool(meta.get("trainable", True)),
        )


@dataclass
class EntropyPlan(Record):
    """Model-wide: which stored tensors the export entropy-codes, and how.

    ``floats``: BF16 tensors (exponents coded); ``codes``: quantized integer codes;
    ``min_numel``: smaller tensors stay raw; ``chunk``: weights per decodable chunk;
    ``table_bits`` / ``pair_bits``: longest code of integer codes / BF16 exponent pairs;
    ``ignore``: glob patterns of tensor names kept raw.
    """

    kind: ClassVar[str] = "entropy_plan"

    floats: bool
    codes: bool
    min_numel: int
    chunk: int
    table_bits: int
    pair_bits: int
    ignore: list[str] = field(default_factory=list)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {
            "floats": self.floats,
            "codes": self.codes,
            "min_numel": self.min_numel,
            "chunk": self.chunk,
            "table_bits": self.table_bits,
            "pair_bits": self.pair_bits,
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> EntropyPlan:
        return cls(**meta)


@dataclass
class ConfigPatch(Record):
    """Model-wide: keys of the model's ``config.json`` a pass changed (e.g. structured pruning's
    ``intermediate_size``); the writer applies them, later patches winning."""

    kind: ClassVar[str] = "config_patch"

    updates: dict[str, Any] = field(default_factory=dict)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"updates": self.updates}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ConfigPatch:
        return cls(dict(meta.get("updates", {})))


# ---------------------------------------------------------------------------------------- API


def records_of(module: nn.Module) -> dict[str, Record]:
    """Every record attached to ``module``, by kind (a copy)."""
    held = module.__dict__.get(_ATTR)
    return dict(held) if isinstance(held, dict) else {}


def attach(module: nn.Module, record: Record) -> None:
    """Attach ``record`` to ``module``, replacing a record of the same kind."""
    if not record.kind:
        raise TypeError(f"{type(record).__name__} has no kind")
    held = module.__dict__.setdefault(_ATTR, {})
    held[record.kind] = record


def get(module: nn.Module, kind: type[R]) -> R | None:
    """The record of type ``kind`` attached to ``module``, if any."""
    held = module.__dict__.get(_ATTR)
    record = held.get(kind.kind) if isinstance(held, dict) else None
    return record if isinstance(record, kind) else None


def detach(module: nn.Module, kind: type[Record]) -> None:
    """Remove ``module``'s record of type ``kind`` (nothing if it has none)."""
    held = module.__dict__.get(_ATTR)
    if isinstance(held, dict):
        held.pop(kind.kind, None)
        if not held:
            del module.__dict__[_ATTR]


def records(model: nn.Module, kind: type[R]) -> Iterator[tuple[str, R]]:
    """``(qualified module name, record)`` of every module holding a record of ``kind``, in
    module order (the model itself is named ``""``)."""
    for name, module in model.named_modules():
        record = get(module, kind)
        if record is not None:
            yield name, record


# ------------------------------------------------------------------- quantized weights


def set_quantized(
    module: nn.Linear | nn.Embedding, record: QuantizedWeight, *, update_weight: bool = True
) -> None:
    """Attach ``record`` and make the module's weight its dequantized value (unless not
    ``update_weight``: the weight is already that value, or a storage-free placeholder)."""
    if tuple(module.weight.shape) != record.shape:
        raise ValueError(f"record shape {record.shape} != weight {tuple(module.weight.shape)}")
    if update_weight:
        with torch.no_grad():
            module.weight.copy_(record.dequantize(module.weight.dtype))
    attach(module, record)


def clear_quantized(module: nn.Module) -> None:
    """Drop a module's quantization record (its weight is being replaced or released)."""
    detach(module, QuantizedWeight)


def get_quantized(module: nn.Module) -> QuantizedWeight | None:
    return get(module, QuantizedWeight)


def quantized_modules(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized module of ``model`` by qualified name, in module order."""
    return dict(records(model, QuantizedWeight))
