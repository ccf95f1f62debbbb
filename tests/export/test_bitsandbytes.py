"""The bitsandbytes export: NF4 / FP4 that stock transformers + bitsandbytes load, no compress.

The loading tests run in a subprocess that never imports compress, so what loads is transformers'
own bitsandbytes quantizer reading our files. They skip, saying why, where bitsandbytes is not
installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import ExportError
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats.fp4 import FP4Format, quantize_fp4
from compress.formats.fp4.packed import pack_fp4_codes
from compress.ir import get_quantized
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext
from tests.quant.test_gptq import calibration

needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install bitsandbytes; it is in the dev extra)",
)

_STOCK_LOAD = """
import sys, json
import torch
from bitsandbytes.functional import dequantize_4bit
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("compress") for name in sys.modules), "compress was imported"
projections = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
kinds = sorted({type(m).__name__ for m in projections.values()})
# the weights bitsandbytes decodes, read before the first forward (which, on CPUs with
# AVX512-BF16, repacks them for its bf16 kernel)
weights = {n: dequantize_4bit(m.weight.data, m.weight.quant_state) for n, m in projections.items()}
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
torch.save({"weights": weights, "logits": logits}, sys.argv[3])
print(json.dumps({"kinds": kinds, "lm_head": type(model.lm_head).__name__}))
"""


def stock_load(folder: Path, ids: torch.Tensor, out: Path) -> dict[str, object]:
    """Load ``folder`` in a fresh interpreter without compress; what it saw (module kinds), and
    in ``out`` the decoded weights and the logits on ``ids``."""
    done = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(folder), json.dumps(ids.tolist()), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@needs_bitsandbytes
def test_our_nf4_codes_are_bitsandbytes_own():
    """Round-to-nearest NF4 gives bitsandbytes' bytes (after the nibble swap) and absmax."""
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(48, 192, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    fmt = FP4Format("nf4", 64)
    codes, scales, _ = quantize_fp4(weight, fmt)
    ours = pack_fp4_codes(codes)
    assert torch.equal((((ours & 0x0F) << 4) | (ours >> 4)).reshape(-1), packed.reshape(-1))
    assert torch.equal(scales.reshape(-1), state.absmax)
    assert torch.equal(fmt.table, state.code)


@needs_bitsandbytes
@pytest.mark.parametrize("method", ["gptq", "rtn-fp4"])
def test_export_loads_in_stock_transformers_with_the_same_logits(tiny_llama, tmp_path, method):
    model = copy.deepcopy(tiny_llama)
    if method == "gptq":  # calibrated NF4, which bitsandbytes cannot make itself
        gptq(
            model, GPTQConfig(format="nf4", scale_block=64), PassContext(calibration=calibration())
        )
    else:
        rtn(model, RTNConfig(format="fp4", scale_block=64), PassContext())
    folder = export_model(model, None, tmp_path / "bnb", format="bitsandbytes")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["llm_int8_skip_modules"] == [
        "lm_head"
    ]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = stock_load(folder, ids, tmp_path / "loaded.pt")
    assert seen == {"kinds": ["Linear4bit"], "lm_head": "Linear"}
    loaded = torch.load(tmp_path / "loaded.pt")
    for name, weight in loaded["weights"].items():  # the very weights we quantized to
        record = get_quantized(model.get_submodule(name))
        assert record is not None and torch.equal(weight, record.dequantize(weight.dtype)), name
    with torch.no_grad():
        expected = model(ids).logits
    # bitsandbytes computes in bf16 on AVX512-BF16 CPUs, in fp32 elsewhere: bf16's tolerance
    scale = float(expected.abs().max())
    assert torch.allclose(loaded["logits"], expected, rtol=0, atol=2e-2 * scale)
    summary = summarize_export(folder, verify=True)
    assert summary.per_module


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 4, "group_size": 32}, "holds bitsandbytes' nf4 and fp4 only"),
        ({"format": "mxfp4"}, "holds bitsandbytes' nf4 and fp4 only"),
        ({"format": "nf4", "scale_block": 32}, "blocks of 32: bitsandbytes takes 64"),
    ],
)
def test_what_bitsandbytes_cannot_hold_is_refused_before_writing(
    tiny_llama, tmp_path, settings, message
):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(**settings), PassContext())
    with pytest.raises(ExportError, match=message):
        export_model(model, None, tmp_path / "bnb", format="bitsandbytes")
    assert not (tmp_path / "bnb").exists()


def test_one_quant_type_per_model(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(format="nf4", targets=["*.mlp.*"]), PassContext())
    rtn(model, RTNConfig(format="fp4", targets=["*.self_attn.*"]), PassContext())
    with pytest.raises(ExportError, match="mix 4-bit types"):
        export_model(model, None, tmp_path / "bnb", format="bitsandbytes")
    assert not (tmp_path / "bnb").exists()
