"""Writing an export folder: packed safetensors shards, config, tokenizer, manifest.

Everything is written into a temporary folder beside the target and renamed at the end, so a
failure never leaves a half-written export.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compress.errors import ExportError
from compress.export.manifest import FORMAT_VERSION, MANIFEST_NAME, QUANT_METHOD
from compress.export.qlinear import QuantLinear
from compress.ir import quantized_modules
from compress.utils.fs import atomic_directory, sha256_file
from compress.utils.progress import NullProgress, Progress

__all__ = ["check_export_target", "export_model", "packed_state"]

DEFAULT_SHARD_BYTES = 2 * 1024**3


def packed_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors an export stores, in module order; quantized weights packed, aliases dropped.

    Tied weights (``lm_head`` sharing the embedding) are stored once; transformers re-ties them.
    """
    records = quantized_modules(model)
    modules = dict(model.named_modules())
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in records and leaf == "weight":
            packed = QuantLinear.from_record(modules[owner], records[owner])
            for name, buffer in packed.named_buffers():
                yield f"{owner}.{name}", buffer
            continue
        alias = (tensor.data_ptr(), tuple(tensor.shape))
        if alias in seen:
            continue
        seen.add(alias)
        yield key, tensor.detach().contiguous()


def _shards(
    tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


def check_export_target(directory: Path, *, overwrite: bool) -> None:
    """Refuse an existing target up front, before any expensive work is done."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ExportError(
            f"{directory}: export folder already exists",
            hint="choose another export.dir, or set export.overwrite: true (--overwrite)",
        )
    if directory.exists() and not directory.is_dir():
        raise ExportError(
            f"{directory}: exists and is not a folder", hint="choose another export.dir"
        )


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization_config`` block of ``config.json``, or None if nothing is quantized."""
    records = quantized_modules(model)
    if not records:
        return None
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": {name: record.fmt.describe() for name, record in records.items()},
    }


def export_model(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    *,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> Path:
    """Write ``model`` (with its quantization records) as a loadable export folder."""
    progress = progress or NullProgress()
    directory = Path(directory)
    check_export_target(directory, overwrite=overwrite)
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"{type(model).__name__} has no Hugging Face config to export")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        shards = list(_shards(packed_state(model), max_shard_bytes))
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map: dict[str, str] = {}
        for name, shard in progress.track(
            zip(names, shards, strict=True), "export shards", total=len(names)
        ):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        del shards

        config = copy.deepcopy(config)
        # Recorded so loaders need not open a shard to guess it (and meet a corrupt one first).
        config.dtype = _float_dtype(model)
        qconfig = quantization_config(model)
        if qconfig is not None:
            config.quantization_config = qconfig
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        files = {
            path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(tmp.iterdir())
            if path.is_file()
        }
        manifest = {
            "format": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "compress_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "modules": {
                name: {"format": record.fmt.describe(), "shape": list(record.shape)}
                for name, record in quantized_modules(model).items()
            },
            "recipe": recipe or {},
            "files": files,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return directory


def _float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _version() -> str:
    from compress import __version__

    return __version__
