"""Safetensors files written one tensor at a time, and read without memory-mapping.

``safetensors.torch.save_file`` needs every tensor of a file at once, so an exporter that holds
one decoder layer would still hold a whole shard (hundreds of MB) before writing it. The format
is simple enough to stream: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. :class:`ShardWriter` appends each
tensor's bytes to a body file as it arrives and, on :meth:`ShardWriter.close`, writes the header
and copies the body after it (16 MB at a time), so memory holds one tensor. The files it
writes are read by ``safetensors`` and ``transformers`` like any other.

:func:`read_tensors` reads named tensors with plain file reads into fresh tensors. The library's
``safe_open`` maps the file, and the pages it touches count in the process's resident set next
to the copy until the file is closed, so reading a 400 MB embedding briefly costs 800 MB.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from compress.errors import ExportError

__all__ = ["ShardWriter", "read_file", "read_metadata", "read_tensors"]

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as safetensors


class ShardWriter:
    """One safetensors file, its tensors added one by one; nothing is at ``path`` before close."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.nbytes = 0
        self.names: list[str] = []
        self._entries: dict[str, dict[str, object]] = {}
        self._body_path = self.path.with_name(self.path.name + ".body")
        self._body = open(self._body_path, "wb")  # noqa: SIM115 - closed in close()/abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ExportError(f"{self.path.name}: tensor {name} written twice")
        dtype = _DTYPES.get(tensor.dtype)
        if dtype is None:
            raise ExportError(
                f"{name}: dtype {tensor.dtype} cannot be stored in safetensors",
                hint="cast the tensor to a supported dtype before export",
            )
        data = tensor.detach().to("cpu").contiguous()
        size = data.numel() * data.element_size()
        if size:
            self._body.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(data.shape),
            "data_offsets": [self.nbytes, self.nbytes + size],
        }
        self.names.append(name)
        self.nbytes += size

    def close(self) -> None:
        """Write the header, then the body after it; remove the body file."""
        self._body.close()
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        header.update(self._entries)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-(len(encoded) + 8) % _ALIGN)
        with open(self.path, "wb") as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(body, out, 16 * 1024 * 1024)
        os.unlink(self._body_path)

    def abort(self) -> None:
        """Drop what was written (the caller's temporary folder goes too, this is tidiness)."""
        self._body.close()
        self._body_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors (all, when ``names`` is None) of a safetensors file, each read straight
    into its own tensor."""
    return read_file(path, names)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    path = Path(path)
    with open(path, "rb") as handle:
        _, _, header = _read_header(handle, path)
    return _metadata(header)


def read_file(
    path: Path, names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_tensors` and :func:`read_metadata` in one pass over the file."""
    path = Path(path)
    with open(path, "rb") as handle:
        length, size, header = _read_header(handle, path)
        wanted = [k for k in header if k != "__metadata__"] if names is None else names
        tensors = {}
        for name in wanted:
            entry = header.get(name)
            if not isinstance(entry, dict) or entry.get("dtype") not in _FROM_NAME:
                raise ExportError(f"{path}: no readable tensor {name!r} in the file")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_FROM_NAME[entry["dtype"]])
            nbytes = tensor.numel() * tensor.element_size()
            if end - begin != nbytes or 8 + length + end > size:
                raise ExportError(f"{path}: tensor {name} has inconsistent byte offsets")
            handle.seek(8 + length + begin)
            target = tensor.reshape(-1).view(torch.uint8).numpy().data
            if nbytes and handle.readinto(target) != nbytes:
                raise ExportError(f"{path}: tensor {name} is truncated")
            tensors[name] = tensor
    return tensors, _metadata(header)


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    return dict(metadata) if isinstance(metadata, dict) else {}


def _read_header(handle: BinaryIO, path: Path) -> tuple[int, int, dict[str, Any]]:
    """(header length, file size, parsed header) of an open safetensors file."""
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ExportError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", prefix)
    size = os.fstat(handle.fileno()).st_size
    if length > size - 8:
        raise ExportError(f"{path}: safetensors header of {length} bytes is past the end")
    try:
        header = json.loads(handle.read(length))
    except ValueError as error:
        raise ExportError(f"{path}: safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: safetensors header is not a JSON object")
    return length, size, header
