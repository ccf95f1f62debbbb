"""Writing an export folder: packed safetensors shards, config, tokenizer, manifest.

Everything is written into a temporary folder beside the target and renamed at the end, so a
failure never leaves a half-written export.
"""

from __future__ import annotations

import copy
import errno
import itertools
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.adapters.files import ADAPTER_DIR, write_adapter_folder
from compress.errors import ExportError, FormatError, PassError
from compress.export import bitsandbytes, compressed_tensors, entropy
from compress.export.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANT_METHOD,
    guard_config_dict,
)
from compress.export.stream import StoredItem
from compress.formats import runtime_for
from compress.formats.bitmask.spec import VALUE_DTYPES, BitmaskFormat
from compress.formats.int.spec import IntFormat
from compress.formats.nm.spec import NMIntFormat, nonzero_codes
from compress.ir import Adapter, ConfigPatch, QuantizedWeight, SparsityMask, get, get_quantized
from compress.ir import records as ir_records
from compress.registry import LayerAccess
from compress.utils.activations import ACTIVATION_QUANT_KEY
from compress.utils.fs import atomic_directory, probe_writable, sha256_file
from compress.utils.hadamard import ONLINE_HADAMARD_KEY
from compress.utils.kvcache import KV_CACHE_KEY
from compress.utils.modules import decoder_layers
from compress.utils.progress import NullProgress, Progress
from compress.utils.safetensors_io import ShardWriter

__all__ = [
    "LAYOUTS",
    "CompressLayout",
    "CompressedTensorsLayout",
    "ExportLayout",
    "check_export_target",
    "export_model",
    "layout_for",
    "packed_state",
    "sparse_float_record",
    "unwritable_target",
]

DEFAULT_SHARD_BYTES = 2 * 1024**3


def packed_state(
    model: nn.Module,
    layers: LayerAccess | None = None,
    records: dict[str, QuantizedWeight] | None = None,
    ties: dict[str, str] | None = None,
    *,
    sparse: bool = False,
) -> Iterator[StoredItem]:
    """The tensors an export stores, in module order; quantized weights packed, aliases dropped.

    ``sparse``: an integer-quantized Linear that an ``N:M`` prune left sparse is stored in the
    N:M sparse format (kept codes and their positions, :func:`stored_record`); a pruned Linear
    of a decoder layer that no pass quantized, in the bitmask format (its nonzero values and one
    bit a weight, :func:`sparse_float_record`) where that is smaller.

    Tied weights (``lm_head`` sharing the embedding) are stored once: dense ones are re-tied by
    transformers; a quantized pair (one record on both modules) is added to ``ties`` as
    ``{"lm_head": "model.embed_tokens"}`` and re-tied by our loader.
    With an offloading ``layers`` store, each decoder layer is loaded just for its own tensors,
    so memory holds one layer, never the model. The quantization records met on the way are
    added to ``records`` as shape and format only (their tensors on the meta device).
    """
    access = layers or LayerAccess()
    try:
        prefix, blocks = decoder_layers(model)
    except PassError:  # not a decoder stack: nothing to stream
        prefix, blocks = "", nn.ModuleList()
    seen: set[int] = set()
    packed_owner: dict[int, str] = {}  # id(record) -> module whose tensors hold it
    current: int | None = None
    for key in list(model.state_dict().keys()):
        index = _layer_index(key, prefix) if len(blocks) else None
        if index != current:
            if current is not None:
                access.unload(current, blocks[current])
            if index is not None:
                access.load(index, blocks[index], codes_only=True)
            current = index
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        record = get_quantized(module)
        if record is not None and sparse:
            record = stored_record(owner, module, record)
        elif record is None and sparse and leaf == "weight" and index is not None:
            record = sparse_float_record(module)
        if record is not None and leaf == "weight":
            if id(record) in packed_owner:  # a tied module: its codes are stored already
                if ties is not None:
                    ties[owner] = packed_owner[id(record)]
                continue
            if index is None:  # records inside the layers are not kept alive past the layer
                packed_owner[id(record)] = owner
            if records is not None:  # shape and format only: codes of all layers would add up
                records[owner] = record.shape_only()
            packed = _packed_module(module, record)
            for name, buffer in packed.named_buffers():
                yield StoredItem(f"{owner}.{name}", buffer, record)
            continue
        if index is not None:  # the layer is loaded already
            yield StoredItem(key, _state_tensor(module, leaf).detach().contiguous())
            continue
        # tied weights (lm_head = embedding) are one Parameter object held by two modules; ids
        # are checked only outside the layers, whose objects live as long as the model
        tensor_id = id(_state_tensor(module, leaf))
        if tensor_id in seen:
            continue
        seen.add(tensor_id)
        with access.outside(model, [key]):
            yield StoredItem(key, _state_tensor(module, leaf).detach().contiguous())
    if current is not None:
        access.unload(current, blocks[current])


def stored_record(name: str, module: nn.Module, record: QuantizedWeight) -> QuantizedWeight:
    """``record`` in the N:M sparse format when ``module`` is an integer-quantized Linear with
    an ``N:M`` :class:`~compress.ir.SparsityMask` whose codes hold the pattern; else unchanged.

    The codes stay as they are (dense, the zero point where pruned): only what is stored
    changes. Codes that break the pattern (a later pass filled pruned positions) are refused."""
    mask = get(module, SparsityMask)
    pattern = mask.n_of_m() if mask is not None else None
    if pattern is None or not isinstance(record.fmt, IntFormat):
        return record
    if not isinstance(module, nn.Linear) or record.codes.device.type == "meta":
        return record
    n, m = pattern
    try:
        fmt = NMIntFormat.of(record.fmt, n, m)
        fmt.check_width(record.shape[1])
    except FormatError as error:
        raise ExportError(
            f"{name}: its {n}:{m} sparsity cannot be stored with {record.fmt.label()}: {error}",
            hint="export with sparse: false to store it dense",
        ) from None
    nonzero = nonzero_codes(record.codes, record.zeros, fmt)
    counts = nonzero.reshape(nonzero.shape[0], -1, m).sum(dim=2)
    if bool((counts > n).any()):
        row, run = (int(i) for i in (counts > n).nonzero()[0])
        raise ExportError(
            f"{name}: row {row}, columns {run * m}..{run * m + m - 1} hold "
            f"{int(counts[row, run])} nonzero codes, but the layer was pruned {n}:{m}",
            hint="prune after the passes that change weights, or export with sparse: false",
        )
    return QuantizedWeight(record.codes, record.scales, record.zeros, fmt)


def sparse_float_record(module: nn.Module) -> QuantizedWeight | None:
    """A pruned, unquantized Linear's weight in the bitmask sparse format (its nonzero values
    plus one bit a weight), when that is smaller than the dense weight; else ``None``.

    Lossless: the values are the weight's own, so the reloaded layer computes the same
    function (a ``-0.0`` weight reads back as ``+0.0``)."""
    if not isinstance(module, nn.Linear) or get(module, SparsityMask) is None:
        return None
    weight = module.weight.detach()
    if weight.device.type == "meta" or weight.dtype not in VALUE_DTYPES.values():
        return None
    fmt = BitmaskFormat.for_weight(weight)
    if not fmt.pays(module.in_features):
        return None
    codes, scales, zeros = fmt.quantize(weight)
    return QuantizedWeight(codes, scales, zeros, fmt)


def _packed_module(module: nn.Module, record: QuantizedWeight) -> nn.Module:
    """The module whose buffers are the stored tensors of a quantized Linear or Embedding,
    from the runtime of the record's format."""
    runtime = runtime_for(record.fmt)
    if isinstance(module, nn.Embedding) and runtime.embedding_from_record is not None:
        return runtime.embedding_from_record(module, record)
    if isinstance(module, nn.Linear):
        return runtime.linear_from_record(module, record)
    raise ExportError(
        f"{type(module).__name__} carries a quantization record ({record.fmt.label()}), but "
        "that format exports quantized "
        + ("Linear and Embedding" if runtime.embedding_from_record else "Linear")
        + " modules only",
        hint="leave the module out of the quantization pass (ignore:)",
    )


def _layer_index(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix + "."):
        return None
    return int(key[len(prefix) + 1 :].split(".", 1)[0])


def _state_tensor(module: nn.Module, leaf: str) -> torch.Tensor:
    tensor: torch.Tensor | None = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    if tensor is None:
        raise ExportError(f"{type(module).__name__} has no tensor {leaf!r} to export")
    return tensor


def check_export_target(directory: Path, *, overwrite: bool) -> None:
    """Refuse a target that cannot or must not be written, before any expensive work is done.

    ``overwrite`` only ever replaces an export of ours (a folder with our manifest) or an
    empty folder; anything else at ``directory`` is refused. The folder it would be created in
    is probed with a real file, so a read-only disk, a missing permission or a path under a
    regular file is named now, not after the passes ran.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(
            f"{directory}: is a file, not a folder; an export is a folder",
            hint="choose another export.dir (or -o DIR); compress never replaces a file",
        )
    if directory.exists() and not overwrite:
        raise ExportError(
            f"{directory}: export folder already exists",
            hint="choose another export.dir, or set export.overwrite: true (--overwrite)",
        )
    if directory.exists() and not _replaceable(directory):
        raise ExportError(
            f"{directory}: exists and is not a compress export (no {MANIFEST_NAME}); "
            "overwrite only replaces an earlier export",
            hint="choose another export.dir (or -o DIR), or move the folder away yourself",
        )
    try:
        probe_writable(directory.parent)
    except OSError as error:
        raise unwritable_target(directory, error) from None


def _replaceable(directory: Path) -> bool:
    try:
        return (directory / MANIFEST_NAME).is_file() or not any(directory.iterdir())
    except OSError:
        return False


def unwritable_target(directory: Path, error: OSError) -> ExportError:
    """An :class:`ExportError` for an ``OSError`` met writing the export ``directory``: the path
    the system named, what went wrong, and a hint for that kind of failure."""
    where = error.filename or directory
    reason = error.strerror or type(error).__name__
    hints = {
        errno.EROFS: "the file system is read-only; choose an export.dir (-o DIR) on a "
        "writable disk",
        errno.EACCES: "no permission to write there; choose an export.dir (-o DIR) you can "
        "write to, or fix the folder's permissions",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another export.dir",
        errno.ENOSPC: "the disk is full; free some space or choose an export.dir (-o DIR) on "
        "another disk",
        errno.ENOENT: "that folder cannot hold files (a pseudo file system such as /proc?); "
        "choose an ordinary folder",
    }
    hints[errno.EPERM] = hints[errno.EACCES]
    hints[errno.EDQUOT] = hints[errno.ENOSPC]
    hint = hints.get(error.errno or 0, "choose another export.dir (-o DIR)")
    return ExportError(f"{where}: cannot write the export {directory}: {reason}", hint=hint)


def quantization_config(
    records: dict[str, QuantizedWeight], ties: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The ``quantization_config`` block of ``config.json``, or None if nothing is quantized.

    ``tied`` (only when some module is): modules that read another module's packed tensors.
    """
    if not records:
        return None
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": {name: record.fmt.to_dict() for name, record in records.items()},
    }
    if ties:
        config["tied"] = dict(ties)
    return config


class ExportLayout(Protocol):
    """One on-disk layout of an export: how the packed stream is laid out and what
    ``config.json`` says. Stages that apply to every layout (entropy coding, config patches)
    live in the writer."""

    name: str

    def check(self, model: nn.Module) -> None:
        """Refuse, before anything is written, what this layout cannot hold."""
        ...

    def lay(self, items: Iterator[StoredItem], model: nn.Module) -> Iterator[StoredItem]:
        """The stream re-laid (renamed, converted) on the fly, one module deep."""
        ...

    def quantization_config(
        self, records: dict[str, QuantizedWeight], ties: dict[str, str], model: nn.Module
    ) -> dict[str, Any] | None:
        """``config.json``'s ``quantization_config`` (None: the export is not quantized)."""
        ...

    def finish_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The saved ``config.json`` as a dict, changed as the layout needs."""
        ...


class CompressLayout:
    """Ours: every format, loaded after ``import compress`` by our transformers quantizer."""

    name = QUANT_METHOD

    def check(self, model: nn.Module) -> None:
        return None

    def lay(self, items: Iterator[StoredItem], model: nn.Module) -> Iterator[StoredItem]:
        return items

    def quantization_config(
        self, records: dict[str, QuantizedWeight], ties: dict[str, str], model: nn.Module
    ) -> dict[str, Any] | None:
        return quantization_config(records, ties)

    def finish_config(self, config: dict[str, Any]) -> dict[str, Any]:
        qconfig = config.get("quantization_config")
        if (
            isinstance(qconfig, dict)
            and qconfig.get("quant_method") == QUANT_METHOD
            and (qconfig.get("modules") or qconfig.get("entropy"))  # not: plain + contextual
        ):
            return guard_config_dict(config)  # stock transformers must not load it half-way
        return config


class CompressedTensorsLayout:
    """vLLM's compressed-tensors ``pack-quantized``: the same codes, re-laid and renamed."""

    name = compressed_tensors.FORMAT_NAME

    def check(self, model: nn.Module) -> None:
        _refuse_quantized_embeddings(model, self.name)

    def lay(self, items: Iterator[StoredItem], model: nn.Module) -> Iterator[StoredItem]:
        return compressed_tensors.convert_state(items, dtype=_float_dtype(model))

    def quantization_config(
        self, records: dict[str, QuantizedWeight], ties: dict[str, str], model: nn.Module
    ) -> dict[str, Any] | None:
        return compressed_tensors.quantization_config(records, model)

    def finish_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return config


class BitsandbytesLayout:
    """bitsandbytes' 4-bit serialization: NF4 / FP4 codes re-laid as ``Linear4bit`` saves them."""

    name = bitsandbytes.FORMAT_NAME

    def check(self, model: nn.Module) -> None:
        _refuse_quantized_embeddings(model, self.name)
        for name, module in model.named_modules():
            record = get_quantized(module)
            if record is not None:
                bitsandbytes.check_representable(name, record.fmt, record.shape)

    def lay(self, items: Iterator[StoredItem], model: nn.Module) -> Iterator[StoredItem]:
        return bitsandbytes.convert_state(items, dtype=_float_dtype(model))

    def quantization_config(
        self, records: dict[str, QuantizedWeight], ties: dict[str, str], model: nn.Module
    ) -> dict[str, Any] | None:
        return bitsandbytes.quantization_config(records, model, _float_dtype(model))

    def finish_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return config


LAYOUTS: dict[str, ExportLayout] = {
    layout.name: layout
    for layout in (CompressLayout(), CompressedTensorsLayout(), BitsandbytesLayout())
}
"""Export layouts by ``export.format`` name."""


def layout_for(format: str) -> ExportLayout:
    try:
        return LAYOUTS[format]
    except KeyError:
        raise ExportError(
            f"unknown export format {format!r}",
            hint=f"use one of {', '.join(sorted(LAYOUTS))}",
        ) from None


def export_model(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    *,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    layers: LayerAccess | None = None,
    format: str = QUANT_METHOD,
    sparse: bool = True,
) -> Path:
    """Write ``model`` (with its IR records) as a loadable export folder.

    Stages: the packed stream (:func:`packed_state`), laid out by the export ``format``'s
    :class:`ExportLayout`, optionally entropy-coded (an :class:`~compress.ir.EntropyPlan` on the
    model), written shard by shard; then ``config.json`` with the layout's
    ``quantization_config`` and every :class:`~compress.ir.ConfigPatch` a pass left (shapes a
    structured pass changed), the tokenizer and the manifest.

    ``sparse``: N:M-pruned integer layers are stored as kept codes plus positions, pruned
    unquantized layers as a bitmask plus their nonzero values (our format only; the other
    layouts store them dense).
    """
    progress = progress or NullProgress()
    directory = Path(directory)
    check_export_target(directory, overwrite=overwrite)
    config = getattr(model, "config", None)
    if config is None:
        raise ExportError(f"{type(model).__name__} has no Hugging Face config to export")
    layout = layout_for(format)
    layout.check(model)
    if layout.name != QUANT_METHOD and any(True for _ in ir_records(model, Adapter)):
        raise ExportError(  # refused before any shard is written
            f"the {layout.name} export does not carry adapters",
            hint="export with format: compress, or drop lora_correct / qwha",
        )
    if layout.name != QUANT_METHOD and getattr(config, ACTIVATION_QUANT_KEY, None):
        raise ExportError(
            f"the {layout.name} export cannot carry act_quant's run-time activation "
            "quantization: its loader would feed the layers unrounded activations",
            hint="export with format: compress, or leave act_quant out",
        )
    if layout.name != QUANT_METHOD and getattr(config, ONLINE_HADAMARD_KEY, None):
        raise ExportError(
            f"the {layout.name} export cannot run the online Hadamard transform of rotate's "
            "online_down: its loader would compute another function",
            hint="export with format: compress, or set online_down: false",
        )
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        records: dict[str, QuantizedWeight] = {}
        ties: dict[str, str] = {}
        sparse_here = sparse and layout.name == QUANT_METHOD
        items = layout.lay(packed_state(model, layers, records, ties, sparse=sparse_here), model)
        coder = entropy.encoder_for(model, format)  # lossless coding (entropy_code pass)
        if coder is not None:
            items = coder.encode(items)
        written = _write_shards(tmp, items, progress, _stored_modules(model), max_shard_bytes)

        config = copy.deepcopy(config)
        # Recorded so loaders need not open a shard to guess it (and meet a corrupt one first).
        config.dtype = _float_dtype(model)
        for _, patch in ir_records(model, ConfigPatch):
            for key, value in patch.updates.items():
                setattr(config, key, value)
        qconfig = layout.quantization_config(records, ties, model)
        adapter = write_adapter_folder(model, tmp / ADAPTER_DIR, config.dtype)
        if adapter is not None:  # a PEFT adapter folder our loader applies (compress.adapters)
            config.compress_adapter = adapter
        if ties:  # our loader re-ties the packed tensors; transformers would look for .weight
            config.tie_word_embeddings = False
        if coder is not None:
            qconfig = coder.quantization_config(qconfig)
        runtime = (
            getattr(config, "contextual_sparsity", None)
            or getattr(config, ONLINE_HADAMARD_KEY, None)
            or getattr(config, ACTIVATION_QUANT_KEY, None)
            or getattr(config, KV_CACHE_KEY, None)
        )
        if qconfig is None and runtime and layout.name == QUANT_METHOD:
            # plain weights with a run-time part (contextual sparsity, an online transform):
            # our loader installs it, while stock transformers skips the unknown quant_method
            # and loads the bare weights (not guarded)
            qconfig = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
        if qconfig is not None:
            config.quantization_config = qconfig
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        config_path = tmp / "config.json"
        saved = json.loads(config_path.read_text())
        finished = layout.finish_config(saved)
        if finished != saved:
            config_path.write_text(json.dumps(finished, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        files = {
            path.relative_to(tmp).as_posix(): {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
            for path in sorted(tmp.iterdir()) + sorted((tmp / ADAPTER_DIR).glob("*"))
            if path.is_file()
        }
        manifest = {
            "format": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "compress_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "modules": {
                name: {"format": record.fmt.to_dict(), "shape": list(record.shape)}
                for name, record in records.items()
            },
            **({"tied": dict(ties)} if ties else {}),
            "recipe": recipe or {},
            "files": files,
        }
        if coder is not None:
            manifest["entropy"] = coder.manifest_entry()
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    del written
    return directory


def _write_shards(
    folder: Path,
    items: Iterator[StoredItem],
    progress: Progress,
    modules: int,
    max_shard_bytes: int,
) -> list[tuple[Path, list[str], int]]:
    """Write the stream into shards as they fill (an offloaded model is never whole in memory)
    and name them once their count is known; the index too when there are several."""
    written: list[tuple[Path, list[str], int]] = []
    shard: ShardWriter | None = None
    for item in _module_progress(items, progress, modules):
        tensor = item.tensor
        nbytes = tensor.numel() * tensor.element_size()
        if shard is not None and shard.names and shard.nbytes + nbytes > max_shard_bytes:
            shard.close()
            written.append((shard.path, shard.names, shard.nbytes))
            shard = None
        if shard is None:
            shard = ShardWriter(folder / f".shard-{len(written)}.tmp", {"format": "pt"})
        shard.add(item.name, tensor)
        del tensor, item
    if shard is not None:
        shard.close()
        written.append((shard.path, shard.names, shard.nbytes))
    names = (
        ["model.safetensors"]
        if len(written) == 1
        else [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    )
    weight_map: dict[str, str] = {}
    for name, (path, keys, _) in zip(names, written, strict=True):
        os.replace(path, folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    if len(written) > 1:
        total = sum(nbytes for _, _, nbytes in written)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written


def _refuse_quantized_embeddings(model: nn.Module, format: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and get_quantized(module) is not None:
            raise ExportError(
                f"module {name!r} is a quantized embedding, which export format {format!r} "
                "cannot hold (it stores quantized Linear weights only)",
                hint=f"leave {name} out of the quantization pass, or export with format: "
                f"{QUANT_METHOD}",
            )


def _stored_modules(model: nn.Module) -> int:
    """How many modules own the tensors an export of ``model`` stores (tied ones count once)."""
    seen: set[int] = set()
    owners: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            owners.add(key.rpartition(".")[0])
    return len(owners)


def _module_progress(
    items: Iterator[StoredItem], progress: Progress, total: int
) -> Iterator[StoredItem]:
    """``state`` unchanged, with a bar of ``total`` modules: one step each time the tensors of a
    module have all been taken. Counted by module because packing, conversion and coding turn
    one weight into several stored tensors, a number known only once they are made."""
    ticks = iter(progress.track(itertools.repeat(None), "export (modules)", total=total))
    owner: str | None = None
    try:
        for item in items:
            if item.owner != owner:
                next(ticks)  # the previous module's tensors are written
                owner = item.owner
            yield item
            del item
        next(ticks)
    finally:
        close = getattr(ticks, "close", None)
        if close is not None:
            close()


def _float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.state_dict().values():  # meta tensors (offloaded layers) keep a dtype
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _version() -> str:
    from compress import __version__

    return __version__
