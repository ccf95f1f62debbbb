"""Packed modules run under torch.inference_mode() on every path and thread count (the
evaluation and generate() use it; worker threads do not inherit it)."""

import pytest
import torch
from torch import nn

from compress.formats.int import IntFormat
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight


@pytest.mark.parametrize("rows", [1, 9, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_under_inference_mode_with_threads(rows, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, bias=True)
    fmt = IntFormat(4, 64, False)
    module = QuantLinear.from_record(linear, QuantizedWeight(*fmt.quantize(linear.weight), fmt))
    module.bias.data = module.bias.data.to(dtype)
    x = torch.randn(rows, 256, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            inside = module(x)
        outside = module(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(inside, outside)
