"""Streamed safetensors shards read back bit-exactly by the safetensors library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compress.errors import ExportError
from compress.utils.safetensors_io import ShardWriter


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "bf16": torch.randn(7, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 3, generator=generator).half(),
        "u8": torch.randint(0, 256, (33,), dtype=torch.uint8, generator=generator),
        "i64": torch.arange(-4, 5),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(6, 4, generator=generator).T,  # not contiguous
        "f8": torch.randn(9, generator=generator).to(torch.float8_e4m3fn),
    }


def test_shard_round_trips_every_dtype_bit_exactly(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardWriter(tmp_path / "x.safetensors", {"format": "pt"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.close()
    assert not list(tmp_path.glob("*.body")), "the body file must be gone after close"
    assert writer.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert set(handle.keys()) == set(tensors)
        for name, tensor in tensors.items():
            loaded = handle.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
            expected = tensor.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(loaded.contiguous().reshape(-1).view(torch.uint8), expected), name


def test_header_is_padded_to_eight_bytes(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a_name_of_odd_length", torch.ones(3))
    writer.close()
    raw = (tmp_path / "x.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    assert json.loads(raw[8 : 8 + length])["a_name_of_odd_length"]["data_offsets"] == [0, 12]
    assert len(raw) == 8 + length + 12


def test_duplicate_names_and_unstorable_dtypes_are_refused(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a", torch.ones(2))
    with pytest.raises(ExportError, match="written twice"):
        writer.add("a", torch.ones(2))
    with pytest.raises(ExportError, match="complex64"):
        writer.add("c", torch.ones(2, dtype=torch.complex64))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_read_tensors_matches_safe_open(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from compress.utils.safetensors_io import read_tensors

    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    names = ["bf16", "empty", "strided", "f8", "scalar"]
    read = read_tensors(tmp_path / "x.safetensors", names)
    assert list(read) == names
    for name in names:
        assert read[name].dtype == tensors[name].dtype, name
        assert read[name].shape == tensors[name].shape, name
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (read[name], tensors[name])]
        assert torch.equal(*as_bytes), name


def test_read_tensors_refuses_bad_files(tmp_path: Path) -> None:
    from compress.utils.safetensors_io import read_tensors

    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a", torch.arange(10, dtype=torch.float32))
    writer.close()
    with pytest.raises(ExportError, match="no readable tensor 'b'"):
        read_tensors(tmp_path / "x.safetensors", ["b"])
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(ExportError, match="inconsistent byte offsets"):
        read_tensors(tmp_path / "cut.safetensors", ["a"])
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ExportError, match="shorter than 8 bytes"):
        read_tensors(tmp_path / "tiny.safetensors", ["a"])


def test_read_all_tensors_and_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from compress.utils.safetensors_io import read_metadata, read_tensors

    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"after_layer": "3"})
    read = read_tensors(tmp_path / "x.safetensors")
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in (read[name], tensor)]
        assert torch.equal(*as_bytes), name
    assert read_metadata(tmp_path / "x.safetensors") == {"after_layer": "3"}
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert read_metadata(tmp_path / "plain.safetensors") == {}
