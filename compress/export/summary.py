"""What an export folder holds: formats, sizes and stored bits per weight.

Read from the manifest and the safetensors headers only (no tensor data), so it is cheap even
for large exports. Used by ``compress inspect`` and by the run report.

Verifying (:func:`verify_export`, ``compress inspect`` and ``compress report`` by default) checks
every file's size and SHA-256 against the manifest, the format versions of the manifest, of
``config.json`` and of the entropy codec, each module's format entry, and that each quantized
module's stored tensors have the shapes and dtypes its format and weight shape imply.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from compress.adapters.files import ADAPTER_DIR
from compress.errors import CompressError, ExportError
from compress.export import bitsandbytes, compressed_tensors
from compress.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANT_METHOD,
    read_manifest,
    verify_files,
)
from compress.formats import Format, format_from_dict

__all__ = ["ExportSummary", "format_label", "summarize_export", "verify_export"]

_CORRUPTED = "the export is corrupted; re-run `compress apply` or restore the file"

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


_SAFETENSORS_DTYPES = {
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
}  # fmt: skip


def format_label(fmt: Format) -> str:
    """Short human name of a format, e.g. ``int4 g64 sym``."""
    return fmt.label()


@dataclass
class FormatGroup:
    modules: int = 0
    params: int = 0
    stored_bytes: int = 0
    nominal_bits: float = 0.0  # Σ params x nominal bits per weight of each module

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.params if self.params else 0.0

    @property
    def nominal_bits_per_weight(self) -> float:
        """Parameter-weighted: per-channel formats cost differently per input width."""
        return self.nominal_bits / self.params if self.params else 0.0


@dataclass
class ExportSummary:
    directory: str
    format_version: int
    files_bytes: int  # every file in the folder
    tensor_bytes: int  # safetensors payloads
    params: int  # parameters of the dense model the export stands for
    quantized_params: int
    quantized_bytes: int
    per_format: dict[str, FormatGroup] = field(default_factory=dict)
    per_module: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    adapter_bytes: int = 0  # the adapter/ folder's tensors (lora_correct, qwha)

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def corrected_bits_per_weight(self) -> float:
        """Quantized modules' stored bits per weight with their adapters counted in."""
        stored = self.quantized_bytes + self.adapter_bytes
        return 8 * stored / self.quantized_params if self.quantized_params else 0.0

    @property
    def model_bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantized_bits_per_weight"] = self.quantized_bits_per_weight
        data["model_bits_per_weight"] = self.model_bits_per_weight
        data["corrected_bits_per_weight"] = self.corrected_bits_per_weight
        data["per_format"] = {
            label: {
                **asdict(group),
                "bits_per_weight": group.bits_per_weight,
                "nominal_bits_per_weight": group.nominal_bits_per_weight,
            }
            for label, group in self.per_format.items()
        }
        return data


def _adapter_bytes(directory: Path, per_module: dict[str, dict[str, Any]]) -> int:
    """Bytes of the adapter folder's tensors, also added to each module's entry."""
    total = 0
    for key, (shape, dtype) in _tensor_shapes(directory / ADAPTER_DIR).items():
        size = _nbytes(shape, dtype)
        total += size
        module = key.removeprefix("base_model.model.").rpartition(".")[0]
        if module.endswith((".lora_A", ".lora_B")):
            module = module.rpartition(".")[0]
        if module in per_module:
            per_module[module]["adapter_bytes"] = per_module[module].get("adapter_bytes", 0) + size
    return total


def _tensor_shapes(directory: Path) -> dict[str, tuple[list[int], str]]:
    shapes: dict[str, tuple[list[int], str]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    piece = handle.get_slice(key)
                    shapes[key] = (list(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as error:
            raise ExportError(
                f"{path}: unreadable safetensors file: {error}",
                hint="the export is corrupted; re-run `compress apply` or restore the file",
            ) from None
    return shapes


def verify_export(directory: Path) -> ExportSummary:
    """Check an export folder in full (files, versions, tensor shapes); its summary if sound."""
    return summarize_export(directory, verify=True)


def summarize_export(directory: Path, *, verify: bool = False) -> ExportSummary:
    """Sizes and formats of an export; ``verify`` also checks every file's checksum, the format
    versions and the stored tensors' shapes and dtypes against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    shapes = _tensor_shapes(directory)
    modules = _modules(directory, manifest)
    if verify:
        _check_versions(directory, manifest)
        _check_layout(directory, manifest, modules, shapes)
    quantized_keys: set[str] = set()
    per_format: dict[str, FormatGroup] = defaultdict(FormatGroup)
    per_module: dict[str, dict[str, Any]] = {}
    params = quantized_params = quantized_bytes = 0
    for name, (fmt, (out_features, in_features)) in modules.items():
        keys = [k for k in shapes if k.rpartition(".")[0] == name and not k.endswith(".bias")]
        quantized_keys.update(keys)
        stored = sum(_nbytes(*shapes[k]) for k in keys)
        count = out_features * in_features
        group = per_format[format_label(fmt)]
        group.modules += 1
        group.params += count
        group.stored_bytes += stored
        group.nominal_bits += count * fmt.bits_per_weight(in_features)
        per_module[name] = {
            "format": format_label(fmt),
            "shape": [out_features, in_features],
            "bits_per_weight": 8 * stored / count,
            "nominal_bits_per_weight": fmt.bits_per_weight(in_features),
        }
        quantized_params += count
        quantized_bytes += stored
    tensor_bytes = sum(_nbytes(shape, dtype) for shape, dtype in shapes.values())
    for key, (shape, _) in shapes.items():
        if key not in quantized_keys:
            params += _numel(shape)
    params += quantized_params
    adapter_bytes = _adapter_bytes(directory, per_module)
    files = [*directory.iterdir(), *(directory / ADAPTER_DIR).glob("*")]
    files_bytes = sum(p.stat().st_size for p in files if p.is_file())
    return ExportSummary(
        directory=str(directory),
        format_version=manifest["format_version"],
        files_bytes=files_bytes,
        tensor_bytes=tensor_bytes,
        params=params,
        quantized_params=quantized_params,
        quantized_bytes=quantized_bytes,
        per_format=dict(per_format),
        per_module=per_module,
        recipe=manifest.get("recipe", {}),
        adapter_bytes=adapter_bytes,
    )


def _modules(directory: Path, manifest: dict[str, Any]) -> dict[str, tuple[Format, list[int]]]:
    """Each module's format and weight shape (out, in), refusing entries that make no sense."""
    modules = {}
    entries = manifest.get("modules")
    if not isinstance(entries, dict):
        raise ExportError(
            f"{directory / MANIFEST_NAME}: 'modules' is not a mapping", hint=_CORRUPTED
        )
    for name, entry in entries.items():
        try:
            fmt = format_from_dict(dict(entry["format"]))
            shape = [int(d) for d in entry["shape"]]
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"shape {entry['shape']!r} is not (out_features, in_features)")
            fmt.check_width(shape[1])
        except (CompressError, KeyError, TypeError, ValueError) as error:
            reason = error.message if isinstance(error, CompressError) else str(error)
            raise ExportError(
                f"{directory / MANIFEST_NAME}: module {name!r}: unreadable entry ({reason})",
                hint="written by a newer compress? upgrade it; otherwise " + _CORRUPTED,
            ) from None
        modules[name] = (fmt, shape)
    return modules


def _check_versions(directory: Path, manifest: dict[str, Any]) -> None:
    """config.json's quantization_config and the entropy codec must be versions we read."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing", hint=_CORRUPTED) from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable: {error}", hint=_CORRUPTED) from None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD:
        version = qconfig.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportError(
                f"{path}: quantization_config format_version {version!r}, but this compress "
                f"reads version {FORMAT_VERSION} (and the manifest says "
                f"{manifest.get('format_version')!r})",
                hint="upgrade compress, or re-export the model with this version",
            )
    entropy = manifest.get("entropy")
    if isinstance(entropy, dict):
        from compress.formats.entropy.codec import CODEC, CODEC_VERSION

        found = (entropy.get("codec"), entropy.get("version"))
        if found != (CODEC, CODEC_VERSION):
            raise ExportError(
                f"{directory / MANIFEST_NAME}: entropy codec {found[0]!r} version {found[1]!r}; "
                f"this compress decodes {CODEC!r} version {CODEC_VERSION}",
                hint="upgrade compress, or re-export the model with this version",
            )


def _check_layout(
    directory: Path,
    manifest: dict[str, Any],
    modules: dict[str, tuple[Format, list[int]]],
    shapes: dict[str, tuple[list[int], str]],
) -> None:
    """Each quantized module's stored tensors have the shape and dtype its format implies."""
    relaid = {
        compressed_tensors.FORMAT_NAME: compressed_tensors.expected_tensors,
        bitsandbytes.FORMAT_NAME: bitsandbytes.expected_tensors,
    }.get(_quant_method(directory) or "")
    for name, (fmt, (out_features, in_features)) in modules.items():
        expected: dict[str, tuple[list[int], str | None]]
        if relaid is not None:
            expected = {
                leaf: (list(shape), None if dtype is None else _SAFETENSORS_DTYPES[dtype])
                for leaf, (shape, dtype) in relaid(name, fmt, out_features, in_features).items()
            }
        else:
            expected = {
                tensor.name: (list(tensor.shape), _SAFETENSORS_DTYPES[tensor.dtype])
                for tensor in fmt.stored_tensors(out_features, in_features)
            }
        for leaf, (shape, dtype) in expected.items():
            key = f"{name}.{leaf}"
            if key not in shapes:
                if any(k.startswith(f"{key}_ec_") for k in shapes):
                    continue  # entropy-coded: its stream's own header is checked on load
                raise ExportError(
                    f"{directory}: tensor {key} of quantized module {name} is missing",
                    hint=_CORRUPTED,
                )
            found_shape, found_dtype = shapes[key]
            if found_shape != shape or (dtype is not None and found_dtype != dtype):
                want = f"{tuple(shape)} {dtype}" if dtype else str(tuple(shape))
                raise ExportError(
                    f"{directory}: tensor {key} is {tuple(found_shape)} {found_dtype}, but "
                    f"{format_label(fmt)} of a {out_features}x{in_features} weight stores "
                    f"{want}",
                    hint=_CORRUPTED,
                )


def _quant_method(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qconfig = config.get("quantization_config") if isinstance(config, dict) else None
    return qconfig.get("quant_method") if isinstance(qconfig, dict) else None


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _nbytes(shape: list[int], dtype: str) -> int:
    return _numel(shape) * _DTYPE_BYTES[dtype]
