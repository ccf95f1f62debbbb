import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.int import IntFormat, cpu, kernels, quantize_int
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight

# (out, in, group): dims not multiples of 64, a group that is not a power of two, per-channel
SHAPES = [(24, 72, 24), (17, 100, None), (64, 96, 32), (3, 40, 8)]


def make(out_features, in_features, fmt, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    codes, scales, zeros = quantize_int(linear.weight, fmt)
    record = QuantizedWeight(codes, scales, zeros, fmt)
    return linear, record, QuantLinear.from_record(linear, record)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_forward_matches_dense_dequantized(bits, symmetric, shape, batch):
    out_features, in_features, group = shape
    linear, record, module = make(out_features, in_features, IntFormat(bits, group, symmetric))
    x = torch.randn(batch, in_features)
    expected = F.linear(x, record.dequantize(), linear.bias)
    assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-6)


def test_buffers_are_the_stored_tensors():
    _, record, module = make(24, 72, IntFormat(3, 24, False))
    buffers = dict(module.named_buffers())
    assert set(buffers) == {"qweight", "scales", "qzeros"}
    assert buffers["qweight"].shape == (24, 27) and buffers["qweight"].dtype == torch.uint8
    assert buffers["scales"].shape == (24, 3) and buffers["scales"].dtype == torch.float16
    assert buffers["qzeros"].shape == (27,)  # 24 rows x 3 zero points x 3 bits = 27 bytes
    assert not any(p.dim() == 2 for p in module.parameters())  # no dense weight
    assert torch.equal(module.codes(), record.codes)
    assert torch.equal(module.zeros(), record.zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_features", [64, 80])
def test_torch_int8_kernel_matches_reference(dtype, batch, in_features, monkeypatch):
    monkeypatch.setattr(cpu, "native", lambda: None)  # torch_int8 is the no-compiler fallback
    _, _, module = make(40, in_features, IntFormat(8, None, True))
    x = torch.randn(2, batch, in_features, dtype=dtype)
    assert module._select(rows=2 * batch, dtype=dtype) == "torch_int8"
    fast = kernels.KERNELS["torch_int8"](x, module.packed()).float()
    reference = kernels.KERNELS["reference"](x, module.packed()).float()
    assert fast.shape == (2, batch, 40)
    assert torch.allclose(fast, reference, rtol=2e-2, atol=2e-2)


# Input widths torch 2.13's _weight_int8pack_mm crashes on (segfault) or gets wrong with bf16
# activations: anything that is not a multiple of 16.
INT8_BAD_WIDTHS = [72, 24, 100, 17, 584]


def test_torch_int8_is_not_chosen_for_widths_the_op_cannot_take(monkeypatch):
    monkeypatch.setattr(cpu, "native", lambda: None)
    int8 = IntFormat(8, None, True)
    for k in INT8_BAD_WIDTHS:
        for rows in (1, 2, 3, 16):
            assert kernels.select(int8, k, rows=rows, dtype=torch.bfloat16) == "reference", k
    for k in (64, 80, 576):
        assert kernels.select(int8, k, rows=2, dtype=torch.bfloat16) == "torch_int8", k


_INT8_CHILD = """
import torch
from torch import nn
from compress.formats.int import kernels
from compress.formats.int.linear import QuantLinear
from compress.formats.int import IntFormat, quantize_int
from compress.ir import QuantizedWeight

fmt = IntFormat(8, None, True)
for k in {widths}:
    torch.manual_seed(0)
    linear = nn.Linear(k, 40)
    codes, scales, zeros = quantize_int(linear.weight, fmt)
    module = QuantLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, fmt))
    for rows in (1, 2, 3, 8):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        got = module(x).float()
        want = kernels.KERNELS["reference"](x, module.packed()).float()
        err = float((got - want).norm() / want.norm())
        assert err < 2e-2, (k, rows, err)
    print("ok", k, module.kernel, flush=True)
"""


def test_forward_survives_int8_widths_that_crash_torch():
    """Without the native build, int8 per-channel bf16 forwards at widths that are not a multiple
    of 16 must not reach torch's op (it kills the process). Run in a child process, so a
    regression fails this test instead of taking pytest down."""
    env = {**os.environ, "COMPRESS_NATIVE": "0"}
    env.pop("COMPRESS_KERNEL", None)
    done = subprocess.run(
        [sys.executable, "-c", _INT8_CHILD.format(widths=INT8_BAD_WIDTHS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (
        f"child exited with {done.returncode} (negative: killed by signal {-done.returncode})\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )
    assert done.stdout.count("ok ") == len(INT8_BAD_WIDTHS)


def test_forced_torch_int8_refuses_widths_the_op_cannot_take(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_LOGGED", set())
    _, _, module = make(40, 72, IntFormat(8, None, True))
    x = torch.randn(2, 72, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="compress.formats.int.kernels"):
        got = kernels.KERNELS["torch_int8"](x, module.packed())
    assert torch.equal(got, kernels.KERNELS["reference"](x, module.packed()))
    assert "not a multiple of 16" in caplog.text


def test_kernel_selection_and_override(monkeypatch):
    monkeypatch.setattr(cpu, "native", lambda: None)  # with the native build: test_kernels_cpu
    int8 = IntFormat(8, None, True)
    assert kernels.select(int8, 64, rows=1, dtype=torch.bfloat16) == "torch_int8"
    assert kernels.select(int8, 64, rows=1, dtype=torch.float32) == "reference"
    assert kernels.select(int8, 64, rows=512, dtype=torch.bfloat16) == "reference"
    assert kernels.select(IntFormat(4, 32), 64, rows=1, dtype=torch.bfloat16) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select(int8, 64, rows=1, dtype=torch.bfloat16) == "reference"
