"""What an export folder holds: formats, sizes and stored bits per weight.

Read from the manifest and the safetensors headers only (no tensor data), so it is cheap even
for large exports. Used by ``compress inspect`` and by the run report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from compress.errors import ExportError
from compress.export.manifest import read_manifest, verify_files
from compress.formats import IntFormat

__all__ = ["ExportSummary", "format_label", "summarize_export"]

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def format_label(fmt: IntFormat) -> str:
    """Short human name of a format, e.g. ``int4 g64 sym``."""
    group = f"g{fmt.group_size}" if fmt.group_size else "per-channel"
    return f"int{fmt.bits} {group} {'sym' if fmt.symmetric else 'asym'}"


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

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0

    @property
    def model_bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["quantized_bits_per_weight"] = self.quantized_bits_per_weight
        data["model_bits_per_weight"] = self.model_bits_per_weight
        data["per_format"] = {
            label: {
                **asdict(group),
                "bits_per_weight": group.bits_per_weight,
                "nominal_bits_per_weight": group.nominal_bits_per_weight,
            }
            for label, group in self.per_format.items()
        }
        return data


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


def summarize_export(directory: Path, *, verify: bool = False) -> ExportSummary:
    """Sizes and formats of an export; ``verify`` also checks every file's checksum."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    shapes = _tensor_shapes(directory)
    modules = {
        name: (IntFormat.from_dict(entry["format"]), entry["shape"])
        for name, entry in manifest["modules"].items()
    }
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
    files_bytes = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
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
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _nbytes(shape: list[int], dtype: str) -> int:
    return _numel(shape) * _DTYPE_BYTES[dtype]
