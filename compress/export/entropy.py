"""Entropy-coded tensors in an export: the writer hook and the load path.

A coded tensor ``<owner>.<leaf>`` (``<leaf>`` = ``weight``, or ``qweight`` of a packed
QuantLinear) is stored as buffers of its owner module named ``<leaf>_ec_<part>`` (parts in
:mod:`compress.formats.entropy.codec`), so they load through transformers like any buffer and
size summaries count them with their module. The manifest's ``entropy`` block records the codec
and, per coded tensor, its :class:`StreamSpec` (shape, chunking, table size, checksum of the
decoded bytes); ``config.json`` carries ``quantization_config.entropy`` so that the compress
quantizer is invoked even for an otherwise unquantized model.

Loading: before weights load, the ``_ec_`` buffers are added on the meta device (the original
tensor is reported missing and left alone by transformers); after loading, either every tensor
is decoded in place (``load``, the default), or tensors inside decoder layers stay coded and are
expanded by a forward pre-hook just before their layer runs and dropped after it (``jit``: the
resident size stays the coded size plus one layer). Choose with :func:`decode_mode` or
``COMPRESS_ENTROPY_DECODE=jit``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import ExportError, FormatError
from compress.export.manifest import FORMAT_VERSION, QUANT_METHOD
from compress.export.stream import StoredItem
from compress.formats.entropy.codec import (
    CODEC,
    CODEC_VERSION,
    READABLE_VERSIONS,
    CodedTensor,
    StreamSpec,
    decode,
    encode_bf16,
    encode_codes,
    entropy_bits,
    split_bf16,
)
from compress.formats.nm.spec import NMIntFormat
from compress.formats.packing import pack_codes
from compress.ir import EntropyPlan, get

__all__ = [
    "EntropyEncoder",
    "EntropyLoader",
    "decode_mode",
    "encoder_for",
    "loader_for",
]

log = logging.getLogger(__name__)

DecodeMode = Literal["load", "jit"]
_MODE: ContextVar[DecodeMode | None] = ContextVar("compress_entropy_mode", default=None)
_PARTS = ("symbols", "lengths", "offsets", "stream", "raw")


@contextlib.contextmanager
def decode_mode(mode: DecodeMode) -> Iterator[None]:
    """Within the block, ``from_pretrained`` of a coded export decodes at ``mode``.

    ``load``: decode everything while loading. ``jit``: keep decoder layers coded in memory and
    expand one layer just before it runs.
    """
    if mode not in ("load", "jit"):
        raise ValueError(f"decode mode must be 'load' or 'jit', got {mode!r}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _current_mode() -> DecodeMode:
    mode = _MODE.get() or os.environ.get("COMPRESS_ENTROPY_DECODE", "load")
    if mode not in ("load", "jit"):
        raise ExportError(
            f"COMPRESS_ENTROPY_DECODE={mode!r} is not a decode mode",
            hint="use COMPRESS_ENTROPY_DECODE=load or COMPRESS_ENTROPY_DECODE=jit",
        )
    return mode  # type: ignore[return-value]


def stored_name(key: str, part: str) -> str:
    """``a.b.weight`` + ``stream`` -> ``a.b.weight_ec_stream``: a buffer of the same owner."""
    return f"{key}_ec_{part}"


@dataclass
class EntropyEncoder:
    """Writer hook: swaps selected tensors of the packed state for their coded streams."""

    config: EntropyPlan
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def wanted(self, item: StoredItem) -> str | None:
        """The kind of coding for a stored tensor, or None to keep it raw."""
        config = self.config
        if any(fnmatch.fnmatchcase(item.name, pattern) for pattern in config.ignore):
            return None
        if item.leaf == "qweight" and item.record is not None:
            if isinstance(item.record.fmt, NMIntFormat):  # kept codes, not the record's dense ones
                return None
            return "codes" if config.codes else None
        tensor = item.tensor
        ok = config.floats and tensor.dtype == torch.bfloat16
        return "bf16" if ok and tensor.numel() >= config.min_numel else None

    def encode(self, items: Iterator[StoredItem]) -> Iterator[StoredItem]:
        """The packed stream with coded tensors replaced by their ``_ec_`` parts."""
        for item in items:
            kind = self.wanted(item)
            coded = [item] if kind is None else self._encode(item, kind)
            # nothing of this tensor is held while the producer makes the next one
            del item
            yield from coded
            del coded

    def _encode(self, item: StoredItem, kind: str) -> list[StoredItem]:
        """The ``_ec_`` parts of one tensor; its entry for the manifest is recorded."""
        config = self.config
        tensor = item.tensor
        extra: dict[str, Any] = {}
        if kind == "bf16":
            coded = encode_bf16(tensor, chunk=config.chunk, table_bits=config.pair_bits)
            exponents, _ = split_bf16(tensor)
            bound = entropy_bits(exponents) + 8 * tensor.numel()
            raw_bytes = 2 * tensor.numel()
        else:
            record = item.record
            assert record is not None  # wanted() codes only packed codes of a record
            bits = record.fmt.code_bits
            codes = record.codes  # straight from the IR: no unpacking of what was just packed
            coded = encode_codes(codes, bits, chunk=config.chunk, table_bits=config.table_bits)
            bound = entropy_bits(codes, 1 << bits)
            raw_bytes = tensor.numel()
            extra = {"pack_bits": bits, "columns": record.shape[1]}
        self.entries[item.name] = {
            **coded.spec.to_dict(),
            **extra,
            "stream_bytes": coded.stream.numel(),
            "stored_bytes": coded.nbytes,
            "raw_bytes": raw_bytes,
            "entropy_bound_bytes": bound / 8,
        }
        return [
            StoredItem(stored_name(item.name, part), value)
            for part, value in coded.tensors().items()
        ]

    def quantization_config(self, qconfig: dict[str, Any] | None) -> dict[str, Any]:
        """``quantization_config`` with the entropy marker (one is made for a float model)."""
        base = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": {}}
        qconfig = dict(qconfig or base)
        qconfig["entropy"] = {"codec": CODEC, "version": CODEC_VERSION}
        return qconfig

    def manifest_entry(self) -> dict[str, Any]:
        stored = sum(e["stored_bytes"] for e in self.entries.values())
        raw = sum(e["raw_bytes"] for e in self.entries.values())
        return {
            "codec": CODEC,
            "version": CODEC_VERSION,
            "stored_bytes": stored,
            "raw_bytes": raw,
            "ratio": stored / raw if raw else 1.0,
            "tensors": self.entries,
        }


def encoder_for(model: nn.Module, format: str = QUANT_METHOD) -> EntropyEncoder | None:
    """The writer hook for ``model``, or None when no ``entropy_code`` pass ran on it."""
    plan = get(model, EntropyPlan)
    if plan is None:
        return None
    if format != QUANT_METHOD:
        raise ExportError(
            f"entropy_code: export format {format!r} cannot hold entropy-coded tensors",
            hint=f"use export.format: {QUANT_METHOD}, or drop the entropy_code pass",
        )
    return EntropyEncoder(plan)


# ---------------------------------------------------------------------------------- loading


@dataclass
class _Coded:
    name: str  # stored tensor name, e.g. model.layers.0.mlp.up_proj.weight
    owner: nn.Module
    leaf: str
    spec: StreamSpec
    pack_bits: int | None
    verified: bool = False

    def coded(self) -> CodedTensor:
        parts = {p: getattr(self.owner, f"{self.leaf}_ec_{p}", None) for p in _PARTS}
        return CodedTensor.from_tensors(
            self.spec, {k: v for k, v in parts.items() if v is not None}
        )

    def decoded(self) -> torch.Tensor:
        """The tensor as the module stores it (BF16 weight, or packed qweight)."""
        value = decode(self.coded(), where=self.name, verify=not self.verified)
        self.verified = True
        if self.pack_bits is not None:
            value = pack_codes(value, self.pack_bits)
        return value


class EntropyLoader:
    """Load-side hook: declares the coded buffers before loading, decodes after."""

    def __init__(self, model: nn.Module, manifest: dict[str, Any], where: str) -> None:
        block = manifest.get("entropy")
        if not isinstance(block, dict) or block.get("codec") != CODEC:
            raise ExportError(
                f"{where}: config.json asks for entropy decoding but the manifest has no "
                f"{CODEC!r} entropy block",
                hint="the export is incomplete or from another version; re-export it",
            )
        if block.get("version") not in READABLE_VERSIONS:
            raise ExportError(
                f"{where}: entropy codec version {block.get('version')!r} (this compress reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})",
                hint="upgrade compress, or re-export the model with this version",
            )
        modules = dict(model.named_modules())
        self.items: list[_Coded] = []
        for name, entry in block.get("tensors", {}).items():
            spec = StreamSpec.from_dict(entry, f"{where}: entropy.tensors[{name!r}]")
            owner_name, _, leaf = name.rpartition(".")
            owner = modules.get(owner_name)
            if owner is None or not hasattr(owner, leaf):
                raise ExportError(
                    f"{where}: entropy-coded tensor {name!r} has no place in "
                    f"{type(model).__name__}",
                    hint="the export does not match its config.json; re-export it",
                )
            pack_bits = entry.get("pack_bits") if spec.kind == "codes" else None
            self.items.append(_Coded(name, owner, leaf, spec, pack_bits))
            table = spec.alphabet * spec.alphabet if spec.pairs else spec.alphabet
            sizes = {
                "symbols": ((spec.alphabet,), torch.uint8),
                "lengths": ((table,), torch.uint8),
                "offsets": ((spec.n_chunks + 1,), torch.int64),
                "stream": ((int(entry.get("stream_bytes", 0)),), torch.uint8),
                "raw": ((spec.numel,), torch.uint8),
            }
            for part in _PARTS:
                if (part == "raw" and spec.kind != "bf16") or (
                    part == "symbols" and not spec.pairs
                ):
                    continue
                shape, dtype = sizes[part]
                owner.register_buffer(
                    f"{leaf}_ec_{part}", torch.empty(shape, dtype=dtype, device="meta")
                )
        # Weights tied to a coded tensor (lm_head to the embedding) are tied again after decoding;
        # untied now, transformers would warn that both are absent from the checkpoint.
        tied = getattr(model, "all_tied_weights_keys", None)
        coded = {item.name for item in self.items}
        self.ties = {t: s for t, s in (tied or {}).items() if s in coded}
        for target in self.ties:
            tied.pop(target)  # type: ignore[union-attr]
        # the dense tensors are absent from the files on purpose; keep the load report quiet
        ignore = {re.escape(name) + "$" for name in coded | set(self.ties)}
        existing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        model._keys_to_ignore_on_load_missing = list(existing | ignore)  # type: ignore[assignment]

    def finish(self, model: nn.Module, mode: DecodeMode | None = None) -> None:
        """Decode after loading: everything now (``load``), or decoder layers just in time."""
        mode = mode or _current_mode()
        layers = _decoder_layers(model) if mode == "jit" else {}
        per_layer: dict[nn.Module, list[_Coded]] = {}
        for item in self.items:
            layer = next((m for m in layers.values() if _contains(m, item.owner)), None)
            if layer is None:
                self._decode_in_place(item)
            else:
                per_layer.setdefault(layer, []).append(item)
                _set_tensor(item, _placeholder(item))
        for layer, items in per_layer.items():
            _JitLayer(items).attach(layer)
        for target, source in self.ties.items():
            owner_name, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(owner_name), leaf, model.get_parameter(source))
            model.all_tied_weights_keys[target] = source  # type: ignore[operator]
        log.info(
            "entropy-coded export: %d tensors decoded at load, %d decoder layers just in time",
            len(self.items) - sum(len(v) for v in per_layer.values()),
            len(per_layer),
        )

    @staticmethod
    def _decode_in_place(item: _Coded) -> None:
        value = item.decoded()
        current = getattr(item.owner, item.leaf)
        if isinstance(current, nn.Parameter) and current.shape == value.shape:
            # in place, so tied aliases (lm_head sharing the embedding) see the weights too
            with torch.no_grad():
                current.data = value.to(current.device, current.dtype)
        else:
            _set_tensor(item, value)
        _drop_parts(item)


def _set_tensor(item: _Coded, value: torch.Tensor) -> None:
    if item.leaf in item.owner._parameters:
        item.owner._parameters[item.leaf] = nn.Parameter(value, requires_grad=False)
    else:
        item.owner._buffers[item.leaf] = value


def _placeholder(item: _Coded) -> torch.Tensor:
    dtype = torch.uint8 if item.spec.kind == "codes" else torch.bfloat16
    return torch.empty(0, dtype=dtype)


def _drop_parts(item: _Coded) -> None:
    for part in _PARTS:
        item.owner._buffers.pop(f"{item.leaf}_ec_{part}", None)


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def _decoder_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Decoder blocks: modules whose class is in ``_no_split_modules`` (transformers' notion)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return {n: m for n, m in model.named_modules() if type(m).__name__ in names}


class _JitLayer:
    """Pre-hook expands a layer's coded tensors; post-hook drops them again."""

    def __init__(self, items: list[_Coded]) -> None:
        self.items = items

    def attach(self, layer: nn.Module) -> None:
        layer.register_forward_pre_hook(self.expand)
        layer.register_forward_hook(self.drop)

    def expand(self, module: nn.Module, args: Any) -> None:
        for item in self.items:
            _set_tensor(item, item.decoded())

    def drop(self, module: nn.Module, args: Any, output: Any) -> None:
        for item in self.items:
            _set_tensor(item, _placeholder(item))


def loader_for(
    model: nn.Module, qconfig_entropy: Any, manifest: dict[str, Any] | None, where: str
) -> EntropyLoader | None:
    """The load hook when ``config.json`` marks the export as entropy-coded, else None."""
    if not qconfig_entropy:
        return None
    if manifest is None:
        raise FormatError(
            f"{where}: an entropy-coded export needs its manifest to load",
            hint="load the export folder written by `compress apply`",
        )
    return EntropyLoader(model, manifest, where)
