import pytest
import torch

from compress.formats.packing import pack_codes, packed_row_bytes, unpack_codes

AWKWARD_SHAPES = [(1, 1), (3, 7), (2, 9), (5, 64), (17, 576), (4, 1001), (1, 4099)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", AWKWARD_SHAPES)
def test_round_trip_is_bit_exact(bits, shape):
    generator = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_is_dense(bits):
    """No wasted bits: 8 codes of b bits fill exactly b bytes."""
    codes = torch.zeros(3, 64, dtype=torch.uint8)
    assert pack_codes(codes, bits).numel() == 3 * 64 * bits // 8


@pytest.mark.parametrize("bits", range(2, 9))
def test_layout_is_a_little_endian_bit_stream(bits):
    """The layout contract kernels rely on, checked against a bit-by-bit model."""
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1, 13), dtype=torch.uint8, generator=generator)
    stream = [(int(code) >> i) & 1 for code in codes[0] for i in range(bits)]
    expected = [
        sum(bit << i for i, bit in enumerate(stream[start : start + 8]))
        for start in range(0, len(stream), 8)
    ]
    assert pack_codes(codes, bits)[0].tolist() == expected


def test_extreme_codes():
    for bits in range(2, 9):
        codes = torch.full((2, 11), 2**bits - 1, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 11), codes)


def test_wrong_width_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 3, dtype=torch.uint8), 1)
